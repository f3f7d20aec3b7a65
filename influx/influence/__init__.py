"""Influence functions I_z, TracIn and self-influence: every estimator behind one interface.

    from influx import influence
    fitted = influence.fit(model, loss_fn, train, method="ekfac")
    scores = fitted.scores(query)            # Scores; .values is [Q, N]
    s = fitted.self_influence()              # [N], O(N)
    fitted.scores(query, measurement=margin) # the query through margin(outputs, targets) -> [Q]

``train`` and ``query`` are tuples, Datasets or DataLoaders, streamed batch by batch.

Sign convention (Koh & Liang): ``I_up,loss(z, z_test) = - grad l(z_test)^T H^-1 grad l(z)`` with H
the Hessian (or GGN) of the mean training loss (1/N) sum_i l(z_i) plus damping I; removing z
changes the test loss by about ``-(1/N) I_up,loss``. Self-influence ``s(z) = grad l(z)^T H^-1
grad l(z)``. TracIn ``(z, z') = sum_t eta_t grad l(w_t, z) . grad l(w_t, z')``. See
:mod:`influx.influence.api` for the details and :func:`describe` for each method's options.
"""

from influx.influence.api import METHODS, Influence, describe, fit, load
from influx.influence.scores import Scores, TopK, read_stored

__all__ = [
    "METHODS",
    "Influence",
    "Scores",
    "TopK",
    "describe",
    "fit",
    "lds",
    "load",
    "mislabel_auc",
    "read_stored",
    "retrain_ground_truth",
    "strongest_pairs",
]


def __getattr__(name: str):
    # The evaluation helpers pull in the trainer and scipy: import them on first use.
    if name in ("lds", "mislabel_auc", "retrain_ground_truth", "strongest_pairs"):
        from influx.influence import evaluate

        return getattr(evaluate, name)
    raise AttributeError(f"module 'influx.influence' has no attribute {name!r}")
