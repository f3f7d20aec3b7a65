"""The scores ``influx-score`` computes: one registry, each entry a call into the library.

Nothing is computed here that the library does not define: the basic scores come from the
gradient engine, self-influence and TracIn from :func:`influx.influence.fit`, the commutator
from :func:`influx.commutator.reference_bracket_norms`, memorization proxies, GUS and the
unlearnability rank from their modules. A :class:`Scorer` computes the columns of one score
group for one chunk of training positions (or, for whole-set scores, for every example).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import default_collate

from influx import data as datasets
from influx.errors import InfluxRuntimeError, InfluxValueError
from influx.grads import per_sample_norms
from influx.train import cross_entropy_per_example

# Examples per forward/backward while scoring: bounds memory for ResNet-18 on 32x32 inputs.
SCORE_BATCH_SIZE = 256
# The commutator statistic brackets each example with one seeded reference batch of this size.
COMMUTATOR_REFERENCE = 32
# Per-example [B, P] buffers of the commutator statistic stay under this many floats.
COMMUTATOR_FLOATS = 1 << 25
# Columns that are defined only for some examples (NaN elsewhere, by design).
_PARTIAL_COLUMNS = ("gus_iz",)


@dataclass(frozen=True)
class Chunk:
    """The training examples at ``positions`` [M], on the scoring device."""

    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor


@dataclass(frozen=True)
class Score:
    """One requestable score: the ``columns`` it writes, what it is, the shard ``group`` that
    computes it (scores of one group share one pass) and the library call ``compute(scorer,
    chunk, method) -> {column: [M]}``. A ``whole_set`` score compares every example with the
    others, so it is computed once over all of them (chunk None)."""

    columns: tuple[str, ...]
    description: str
    group: str
    compute: Callable[..., dict[str, torch.Tensor]]
    whole_set: bool = False

    # (columns, description) as a pair, as the registry's entries were
    def __getitem__(self, item: int):
        return (self.columns, self.description)[item]


def margins(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """True-class logit minus the largest other logit: logits [N, C], targets [N] -> [N]."""
    true_logit = logits.gather(1, targets[:, None]).squeeze(1)
    others = logits.scatter(1, targets[:, None], float("-inf"))
    return true_logit - others.max(dim=1).values


def score_batch(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Loss, per-sample gradient norm and margin of each example: each [B].

    One forward pass: the loss function handed to the engine keeps the logits it is called with.
    """
    seen: list[torch.Tensor] = []

    def loss_keeping_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seen.append(logits.detach())
        return cross_entropy_per_example(logits, targets)

    grad_norms = per_sample_norms(model, loss_keeping_logits, inputs, targets)
    logits = torch.cat(seen)
    losses = cross_entropy_per_example(logits, targets)
    return {"loss": losses, "grad_norm": grad_norms, "margin": margins(logits, targets)}


def commutator_norms(model, loss_fn, inputs, targets, reference) -> torch.Tensor:
    """Deprecated: :func:`influx.commutator.reference_bracket_norms` on ``(inputs, targets)``."""
    from influx import commutator

    warnings.warn(
        "influx.cli.commutator_norms is deprecated; call "
        "influx.commutator.reference_bracket_norms(model, loss_fn, data, reference)",
        DeprecationWarning,
        stacklevel=2,
    )
    return commutator.reference_bracket_norms(model, loss_fn, (inputs, targets), reference)


# ------------------------------------------------------------------------------------------------
# The registry: each entry calls the library
# ------------------------------------------------------------------------------------------------


def _basic(scorer: Scorer, chunk: Chunk, method: str | None) -> dict[str, torch.Tensor]:
    parts = [
        score_batch(scorer.model, x, y)
        for x, y in zip(chunk.inputs.split(SCORE_BATCH_SIZE), chunk.targets.split(SCORE_BATCH_SIZE))
    ]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _self_influence(scorer: Scorer, chunk: Chunk, method: str) -> dict[str, torch.Tensor]:
    with scorer.seeded():
        values = scorer.fitted(method).self_influence((chunk.inputs, chunk.targets))
    return {f"self_influence_{method}": values}


def _tracin(scorer: Scorer, chunk: Chunk, method: str | None) -> dict[str, torch.Tensor]:
    values = scorer.fitted("tracin").self_influence((chunk.inputs, chunk.targets))
    return {"tracin": values}


def _commutator(scorer: Scorer, chunk: Chunk, method: str | None) -> dict[str, torch.Tensor]:
    from influx import commutator

    values = commutator.reference_bracket_norms(
        scorer.model, scorer.loss_fn, (chunk.inputs, chunk.targets), scorer.reference()
    )
    return {"commutator": values}


def _memorization(scorer: Scorer, chunk: Chunk, method: str | None) -> dict[str, torch.Tensor]:
    from influx import memorization

    data = (chunk.inputs, chunk.targets)
    states = [state for state, _ in scorer.checkpoints] or [scorer.model.state_dict()]
    record = memorization.record(scorer.model, scorer.loss_fn, data, states)
    # Probes seeded per chunk: a rerun (or another rank) draws the same vectors.
    input_curvature = memorization.curvature(
        scorer.model, scorer.loss_fn, data, checkpoints=states,
        seed=scorer.config["seed"] * 1_000_003 + int(chunk.positions[0]),
    )  # fmt: skip
    return {
        "mem_confidence": memorization.confidence(record),
        "mem_cumulative_loss": memorization.cumulative_loss(record),
        "mem_curvature": input_curvature,
    }


def _gus(scorer: Scorer, chunk: Chunk, method: str | None) -> dict[str, torch.Tensor]:
    """Per-point I_z of the poisoned examples in the chunk (influx.audit.gus); NaN elsewhere."""
    from influx.audit.gus import gus

    poison, positions, device = scorer.poison, chunk.positions, scorer.device
    mask = poison.mask.cpu()[positions]
    # Rows of the poisoned examples in this chunk, in the poison's own order.
    row_of = {int(p): r for r, p in enumerate(poison.dataset.positions.tolist())}
    rows = [row_of[int(p)] for p in positions[mask].tolist()]
    values = torch.full((positions.shape[0],), float("nan"), dtype=torch.float64, device="cpu")
    if rows:
        chosen = torch.tensor(rows, dtype=torch.long, device="cpu")
        result = gus(
            scorer.model,
            scorer.loss_fn,
            poison.base_inputs.cpu()[chosen].to(device),
            poison.targets.cpu()[chosen].to(device),
            poison.noise.cpu()[chosen].to(device),
            poison.noise_std,
        )
        values[mask] = result.scores.detach().double().cpu()
    return {"poisoned": mask.double(), "gus_iz": values}


def _unlearnable(scorer: Scorer, chunk: None, method: str | None) -> dict[str, torch.Tensor]:
    from influx import unlearnable

    with scorer.seeded():
        ranking = unlearnable.rank(scorer.model, scorer.loss_fn, scorer.train_data())
    return {"unlearnable": ranking.score}


SCORES: dict[str, Score] = {
    "loss": Score(("loss",), "cross-entropy of the trained model (eval mode)", "basic", _basic),
    "margin": Score(("margin",), "true-class logit minus the largest other logit", "basic", _basic),
    "grad_norm": Score(
        ("grad_norm",), "per-sample gradient norm ||grad l(z)|| (influx.grads)", "basic", _basic
    ),
    "self_influence": Score(
        ("self_influence_{method}",),
        "s(z) = grad l(z)^T (H + damping I)^-1 grad l(z) by influx.influence (:method, default "
        "ekfac)",
        "self_influence_{method}",
        _self_influence,
    ),
    "tracin": Score(
        ("tracin",),
        "TracIn self-influence sum_t eta_t ||grad l(w_t, z)||^2 (influx.influence, "
        "method='tracin')",
        "tracin",
        _tracin,
    ),
    "commutator": Score(
        ("commutator",),
        f"||H_z g_R - H_R g_z||: the step bracket of z with a seeded reference batch R of "
        f"{COMMUTATOR_REFERENCE} training examples (influx.commutator.reference_bracket_norms)",
        "commutator",
        _commutator,
    ),
    "memorization": Score(
        ("mem_confidence", "mem_cumulative_loss", "mem_curvature"),
        "influx.memorization proxies over the checkpoints: confidence, cumulative loss, "
        "input-loss curvature",
        "memorization",
        _memorization,
    ),
    "gus": Score(
        ("poisoned", "gus_iz"),
        "Gaussian-poison per-point statistic I_z (poisoned points; needs --poison)",
        "gus",
        _gus,
    ),
    "unlearnable": Score(
        ("unlearnable",),
        "influx.unlearnable.rank score: weighted mean rank of memorization, self-influence, "
        "out-of-distribution, entanglement and ascent-residual components (high = resists "
        "unlearning)",
        "unlearnable",
        _unlearnable,
        whole_set=True,
    ),
}
# group -> the registry entry that computes it (self_influence_<method> groups share one)
_BY_GROUP = {entry.group: entry for entry in SCORES.values()}


def entry_of(group: str) -> tuple[Score, str | None]:
    """The registry entry computing ``group`` and its influence method, if any."""
    if group.startswith("self_influence_"):
        return SCORES["self_influence"], group[len("self_influence_") :]
    if group not in _BY_GROUP:
        raise InfluxValueError(f"unknown score group {group!r}")
    return _BY_GROUP[group], None


def whole_set_groups() -> tuple[str, ...]:
    """Groups computed once over the whole training set (rank 0) rather than chunk by chunk."""
    return tuple(entry.group for entry in SCORES.values() if entry.whole_set)


# ------------------------------------------------------------------------------------------------
# The scorer: what the entries share
# ------------------------------------------------------------------------------------------------


def _on_device(device: torch.device) -> Callable:
    def collate(items):
        inputs, targets, indices = default_collate(items)
        return inputs.to(device), targets.to(device), indices

    return collate


class Scorer:
    """Computes each score group on a chunk of training positions.

    Holds what the groups share and builds it on first use: the fitted influence estimators
    (TracIn's included), the commutator reference batch, the poison. The training set is
    handed to the library as it is, streamed batch by batch, never concatenated.
    """

    def __init__(self, model, train_set, config, checkpoints, poison=None):
        self.model = model
        self.train_set = train_set
        self.config = config
        self.device = torch.device(config["device"])
        self.checkpoints = checkpoints
        self.poison = poison
        self.loss_fn = cross_entropy_per_example
        self._fitted: dict[str, Any] = {}
        self._reference: tuple[torch.Tensor, torch.Tensor] | None = None

    def train_data(self):
        """The training set as the library reads it: the Dataset itself on the CPU, a loader
        that moves each batch to the device otherwise."""
        if self.device.type == "cpu":
            return self.train_set
        return DataLoader(
            self.train_set, batch_size=SCORE_BATCH_SIZE, collate_fn=_on_device(self.device)
        )

    def _chunk(self, positions: torch.Tensor) -> Chunk:
        inputs, targets = [], []
        for x, y, _ in datasets.iter_ordered_batches(self.train_set, positions, SCORE_BATCH_SIZE):
            inputs.append(x)
            targets.append(y)
        return Chunk(
            torch.cat(inputs).to(self.device), torch.cat(targets).to(self.device), positions
        )

    @contextlib.contextmanager
    def seeded(self):
        """Randomness inside a score (sampled labels, projections) drawn from the run's seed,
        leaving the global generator as it was."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.config["seed"])
            yield

    def fitted(self, method: str):
        """``influx.influence.fit(..., method=method)`` on the training set, once."""
        if method not in self._fitted:
            from influx import influence

            options: dict[str, Any] = {}
            if method == "tracin":
                options = {
                    "checkpoints": [state for state, _ in self.checkpoints],
                    "learning_rates": [lr for _, lr in self.checkpoints],
                }
            with self.seeded():
                self._fitted[method] = influence.fit(
                    self.model, self.loss_fn, self.train_data(), method=method, **options
                )
        return self._fitted[method]

    def reference_positions(self) -> torch.Tensor:
        """The commutator's reference batch [R], sorted, fixed by the seed (known without any
        shard being computed, so a resumed run reports it too)."""
        n = len(self.train_set)
        generator = torch.Generator(device="cpu").manual_seed(self.config["seed"])
        return (
            torch.randperm(n, generator=generator, device="cpu")[:COMMUTATOR_REFERENCE]
            .sort()
            .values
        )

    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._reference is None:
            chunk = self._chunk(self.reference_positions())
            self._reference = (chunk.inputs, chunk.targets)
        return self._reference

    def compute(self, group: str, positions: torch.Tensor) -> dict[str, np.ndarray]:
        """Columns of score ``group`` for the examples at ``positions`` [M]: name -> [M]."""
        entry, method = entry_of(group)
        values = entry.compute(self, self._chunk(positions), method)
        return {k: v.detach().double().cpu().numpy() for k, v in values.items()}

    def compute_whole_set(self, group: str) -> dict[str, np.ndarray]:
        """Columns of a whole-set score ``group`` for every training example: name -> [N]."""
        entry, method = entry_of(group)
        values = entry.compute(self, None, method)
        return {k: v.detach().double().cpu().numpy() for k, v in values.items()}

    def unlearnable(self) -> np.ndarray:
        """influx.unlearnable's combined rank score of every training example [N]."""
        return self.compute_whole_set("unlearnable")["unlearnable"]


def check_finite(group: str, columns: dict[str, np.ndarray], indices: np.ndarray, config) -> None:
    """Raise naming the examples whose scores are NaN/inf (training or a fit diverged)."""
    for name, values in columns.items():
        if name in _PARTIAL_COLUMNS:
            continue
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            shown = ", ".join(str(int(i)) for i in indices[bad[:8]])
            raise InfluxRuntimeError(
                f"score {name} is NaN/inf for {bad.size} of {values.size} examples (indices "
                f"{shown}{', ...' if bad.size > 8 else ''}): the model or the {group} computation "
                f"diverged; lower --lr (now {config['lr']:g}) or --epochs, or drop {name} from "
                "--scores"
            )
