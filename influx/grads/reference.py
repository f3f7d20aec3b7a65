"""The public reference for per-sample gradients (torch.func and a plain per-example loop).

Use it to check the fast engine on your own layers::

    from influx.grads import reference
    slow = reference.per_sample_grads(model, loss_fn, x, y)
"""

from influx.grads.common import flatten_per_sample
from influx.grads.functional import naive_per_sample_grads, per_sample_grads

__all__ = ["flatten_per_sample", "naive_per_sample_grads", "per_sample_grads"]
