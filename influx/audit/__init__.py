"""Auditing unlearning: does the model still carry what it was asked to forget?

- :mod:`influx.audit.gus`: the Gaussian Unlearning Score of Gaussian poisons (Pawelczyk et al.
  2024): per-point ``I_z``, exactly N(0, 1) for a model that never saw the noise.
- :mod:`influx.audit.mia`: membership inference, by loss threshold and LiRA (Carlini et al. 2022).
- :mod:`influx.audit.forgetting`: the (eps, delta) forgetting quality of the NeurIPS 2023
  unlearning competition, by the rules of its released evaluation.
- :mod:`influx.audit.utility`: forget / retain / test accuracies and the tug-of-war score.
"""

from influx.audit.forgetting import (
    ForgettingQuality,
    bucket_points,
    bucket_scores,
    example_epsilons,
    final_score,
    forgetting_quality,
)
from influx.audit.gus import GusResult, gus, gus_of
from influx.audit.mia import (
    LiraResult,
    MembershipResult,
    confidence_from_logits,
    ensemble_confidence,
    lira,
    lira_scores,
    logit_confidence,
    loss_attack,
    loss_attack_from_model,
    membership_metrics,
    per_example_losses,
    shadow_masks,
)
from influx.audit.utility import SPLITS, accuracy, correct, splits_accuracy, tug_of_war

__all__ = [
    "SPLITS",
    "ForgettingQuality",
    "GusResult",
    "LiraResult",
    "MembershipResult",
    "accuracy",
    "bucket_points",
    "bucket_scores",
    "confidence_from_logits",
    "correct",
    "ensemble_confidence",
    "example_epsilons",
    "final_score",
    "forgetting_quality",
    "gus",
    "gus_of",
    "lira",
    "lira_scores",
    "logit_confidence",
    "loss_attack",
    "loss_attack_from_model",
    "membership_metrics",
    "per_example_losses",
    "shadow_masks",
    "splits_accuracy",
    "tug_of_war",
]
