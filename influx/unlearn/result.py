"""What an unlearning method returns: the model, the compute it spent, and its trajectory."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["TrajectoryPoint", "UnlearnResult"]


@dataclass(frozen=True)
class TrajectoryPoint:
    """The state after ``step`` steps (0 = the model before unlearning) and ``spent`` evaluations.

    ``state_dict``: a detached CPU copy of the model's state (None unless states were kept);
    ``metrics``: what the ``on_checkpoint(model, step)`` callback returned (empty without one).
    """

    step: int
    spent: int
    state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class UnlearnResult:
    """The outcome of one unlearning method.

    - ``model``: the unlearned model (a copy unless the method ran with ``inplace=True``), on the
      device of the model passed in, in the train/eval mode it had.
    - ``spent``: per-example gradient evaluations actually spent (see :mod:`influx.unlearn.budget`);
      ``budget``: the limit it ran under (``math.inf`` for none; the retrain oracle ignores it).
    - ``steps``: optimizer (or Newton) steps taken; ``method`` and ``options``: what ran.
    - ``trajectory``: one :class:`TrajectoryPoint` per recorded step (``record_every=k``).
    """

    model: nn.Module
    method: str
    spent: int
    budget: float
    steps: int
    options: dict[str, Any]
    trajectory: list[TrajectoryPoint] = field(default_factory=list)
    seconds: float = 0.0

    def metric(self, name: str) -> list[Any]:
        """The callback's ``name`` along the trajectory, one value per recorded step."""
        return [point.metrics.get(name) for point in self.trajectory]

    def __repr__(self) -> str:
        budget = "inf" if math.isinf(self.budget) else f"{self.budget:.0f}"
        return (
            f"UnlearnResult(method={self.method!r}, steps={self.steps}, spent={self.spent}, "
            f"budget={budget}, trajectory={len(self.trajectory)} points, "
            f"seconds={self.seconds:.2f})"
        )
