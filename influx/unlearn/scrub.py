"""SCRUB (Kurmanji et al. 2023, "Towards Unbounded Machine Unlearning").

A student (the model being unlearned) moves away from a frozen teacher on the forget set and stays
close to it on the retain set. With per-example distillation divergence at temperature T,

    d(x) = T^2 * KL(softmax(t(x) / T) || softmax(s(x) / T))        (t = teacher, s = student logits),

a *max-step* on a forget batch minimizes ``- mean_F d`` and a *min-step* on a retain batch minimizes
``kl_weight * mean_R d + ce_weight * mean_R loss_fn``. A round is ``max_steps_per_round`` max-steps
(default: one pass over the forget set) followed by ``min_steps_per_round`` min-steps (default: one
pass over the retain set); only the first ``max_rounds`` rounds have max-steps. Defaults follow the
authors' released code (T = 4, kl_weight = 0.001, ce_weight = 0.99).

The teacher is the model as passed in (a frozen copy), unless ``teacher`` is given. As in the
authors' code (``train_distill``), the teacher runs in eval mode and the student in train mode.
Without train-mode randomness a student equal to the teacher has the same logits, d and its
gradient are zero, and the first max-steps leave the student unchanged (up to rounding; a
``weight_decay`` still shrinks it). With dropout the student's logits differ from the teacher's
from the first step, so d > 0 and the first max-steps already move the student (measured on a
small MLP with dropout 0.5: parameters change by up to 4e-3 after one step at lr 0.05).

Budget: each step costs 2 per example: 1 for the student's forward + backward and 1 for the
teacher's forward (a forward alone is cheaper; counting it as a full evaluation keeps the budget
an upper bound on the compute).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from influx.data import LossFn
from influx.errors import InfluxValueError
from influx.unlearn.loop import Session, Step
from influx.unlearn.result import UnlearnResult

__all__ = ["distillation_kl", "scrub"]


def distillation_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Per-example ``T^2 * KL(softmax(t / T) || softmax(s / T))`` [N] from logits [N, C]."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(1)
    return kl * temperature**2


def scrub(
    model: nn.Module,
    loss_fn: LossFn,
    forget,
    retain,
    *,
    budget=None,
    train_compute=None,
    teacher: nn.Module | None = None,
    temperature: float = 4.0,
    kl_weight: float = 0.001,
    ce_weight: float = 0.99,
    max_rounds: int | None = None,
    max_steps_per_round: int | None = None,
    min_steps_per_round: int | None = None,
    **options,
) -> UnlearnResult:
    """SCRUB: alternate max-steps on the forget set and min-steps on the retain set (module doc).

    ``max_rounds``: rounds with max-steps (default: all). The budget decides how many steps run.
    """
    if not temperature > 0:
        raise InfluxValueError(f"temperature must be > 0; got {temperature!r}")
    if kl_weight < 0 or ce_weight < 0:
        raise InfluxValueError(
            f"kl_weight and ce_weight must be >= 0; got {kl_weight!r}, {ce_weight!r}"
        )
    for name, value in (("max_rounds", max_rounds), ("max_steps_per_round", max_steps_per_round),
                        ("min_steps_per_round", min_steps_per_round)):  # fmt: skip
        if value is not None and (not isinstance(value, int) or value < 0):
            raise InfluxValueError(f"{name} must be an integer >= 0 or None; got {value!r}")
    session = Session("scrub", model, loss_fn, forget, retain, budget=budget,
                      train_compute=train_compute, options=options)  # fmt: skip
    frozen = copy.deepcopy(model if teacher is None else teacher).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    forget_stream, retain_stream = session.stream("forget"), session.stream("retain", offset=1)
    forget_steps = max_steps_per_round
    if forget_steps is None:
        forget_steps = math.ceil(forget_stream.n / forget_stream.size)
    retain_steps = min_steps_per_round
    if retain_steps is None:
        retain_steps = math.ceil(retain_stream.n / retain_stream.size)
    if forget_steps + retain_steps == 0:
        raise InfluxValueError("max_steps_per_round and min_steps_per_round are both 0")

    def divergence(batch) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets, indices = batch
        inputs = inputs.to(session.device)
        student = session.model(inputs)
        with torch.no_grad():
            teacher_logits = frozen(inputs)
        kl = session.checked(distillation_kl(student, teacher_logits, temperature), indices)
        return kl, student

    def max_objective(batch) -> torch.Tensor:
        return -divergence(batch)[0].mean()

    def min_objective(batch) -> torch.Tensor:
        kl, student = divergence(batch)
        ce = session.loss(student, batch)
        return kl_weight * kl.mean() + ce_weight * ce.mean()

    def plan() -> Iterator[Step]:
        round_index = 0
        while True:
            if max_rounds is None or round_index < max_rounds:
                for _ in range(forget_steps):
                    batch = forget_stream.next()
                    yield Step(2 * forget_stream.size, lambda b=batch: max_objective(b))
            for _ in range(retain_steps):
                batch = retain_stream.next()
                yield Step(2 * retain_stream.size, lambda b=batch: min_objective(b))
            round_index += 1
            if retain_steps == 0 and max_rounds is not None and round_index >= max_rounds:
                return

    extra = dict(temperature=temperature, kl_weight=kl_weight, ce_weight=ce_weight,
                 max_rounds=max_rounds, max_steps_per_round=forget_steps,
                 min_steps_per_round=retain_steps, teacher="given" if teacher is not None else "model")  # fmt: skip
    return session.run(plan(), typical_cost=2 * retain_stream.size, extra=extra)
