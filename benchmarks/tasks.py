"""The reference task "digits-MLP" used by the influence tests and benchmarks (not part of the library).

scikit-learn digits (inputs / 16), 10% of the training labels flipped (seeded), 1,600 train / 197
test; a 64-64-10 tanh MLP (4,810 parameters) trained full-batch with Adam (lr 1e-2, 300 steps);
checkpoints at steps 100 / 200 / 300 (plus the initial weights, for retraining); the first 50 test
points are the queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from influx.grads.common import LossFn


@dataclass(repr=False)
class InfluenceTask:
    """A trained model with its data, checkpoints and the facts an evaluation needs.

    ``train`` / ``test`` / ``query`` are ``(inputs, targets)``; ``flipped`` [F] the train indices
    whose label was flipped; ``checkpoints`` the state dicts w_t and ``learning_rates`` eta_t
    (TracIn); ``initial_state`` the weights before training; ``steps`` / ``lr`` the recipe.
    """

    name: str
    model: nn.Module
    loss_fn: LossFn
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    query: tuple[torch.Tensor, torch.Tensor]
    flipped: torch.Tensor
    checkpoints: list[dict] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    initial_state: dict | None = None
    steps: int = 0
    lr: float = 0.0

    def __repr__(self) -> str:
        return (
            f"InfluenceTask({self.name!r}, train={self.train[0].shape[0]}, query={self.query[0].shape[0]}, "
            f"parameters={sum(p.numel() for p in self.model.parameters())}, flipped={self.flipped.numel()})"
        )


def digits_mlp(
    *,
    seed: int = 0,
    num_queries: int = 50,
    steps: int = 300,
    lr: float = 1e-2,
    flip_fraction: float = 0.1,
    checkpoint_steps: tuple[int, ...] = (100, 200, 300),
    hidden: int = 64,
    num_train: int | None = None,
) -> InfluenceTask:
    """Build and train the digits-MLP reference task (a few seconds on a CPU core).

    ``hidden`` and ``num_train`` (the first examples of the training split) shrink it for tests.
    """
    from influx import data, models, train

    train_set = data.load("digits", split="train", flip_fraction=flip_fraction, seed=seed)
    test_set = data.load("digits", split="test")
    train_inputs, train_targets, _ = data.as_tensors(train_set)
    test_inputs, test_targets, _ = data.as_tensors(test_set)
    # [N, 1, 8, 8] -> [N, 64]: the features of the MLP, kept flat so every tool sees plain rows.
    train_inputs, test_inputs = train_inputs.flatten(1), test_inputs.flatten(1)
    flipped = train_set.flipped.clone()
    if num_train is not None:
        train_inputs, train_targets = train_inputs[:num_train], train_targets[:num_train]
        flipped = flipped[flipped < num_train]
    torch.manual_seed(seed)
    model = models.mlp(in_features=64, hidden=(hidden,), num_classes=10, activation="tanh")
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = train.train(
        model,
        (train_inputs, train_targets),
        loss_fn="cross_entropy",
        optimizer="adam",
        lr=lr,
        steps=steps,
        batch_size=None,
        seed=seed,
        checkpoints=list(checkpoint_steps),
        progress=False,
    )
    return InfluenceTask(
        name="digits-MLP"
        if hidden == 64 and num_train is None
        else f"digits-MLP-{hidden}x{num_train}",
        model=model,
        loss_fn=train.cross_entropy_per_example,
        train=(train_inputs, train_targets),
        test=(test_inputs, test_targets),
        query=(test_inputs[:num_queries], test_targets[:num_queries]),
        flipped=flipped,
        checkpoints=[c.state_dict for c in result.checkpoints],
        learning_rates=[float(c.lr) for c in result.checkpoints],
        initial_state=initial,
        steps=steps,
        lr=lr,
    )
