"""The per-sample gradient engine.

``per_sample_grads``, ``per_sample_norms`` and ``per_sample_projected`` capture per-layer inputs
and output gradients from one batched backward and apply a rule per layer type; layers without a
rule fall back to ``torch.func``. ``influx.grads.reference`` is the slow, obviously correct path.
"""

from influx.grads import reference
from influx.grads.common import flatten_per_sample, select_parameters
from influx.grads.engine import (
    MatmulCapture,
    MatmulCaptures,
    capture_matmul_layers,
    per_sample_grads,
    per_sample_gram,
    per_sample_norms,
    per_sample_projected,
)
from influx.grads.rules import LayerRule, register_rule

__all__ = [
    "LayerRule",
    "MatmulCapture",
    "MatmulCaptures",
    "capture_matmul_layers",
    "flatten_per_sample",
    "per_sample_gram",
    "per_sample_grads",
    "per_sample_norms",
    "per_sample_projected",
    "reference",
    "register_rule",
    "select_parameters",
]
