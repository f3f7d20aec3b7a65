"""Public per-sample gradient functions, built on one batched forward + backward.

Shapes: N examples, P parameters, K projected dims. ``loss_fn(outputs, targets)`` returns the
per-example losses [N]; gradients are those of each example's own loss (not of the mean).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from influx.checks import check_choice, check_count_or_none
from influx.data import iter_batches, num_examples
from influx.errors import InfluxValueError, UnsupportedModelError
from influx.grads.capture import LayerCall, capture
from influx.grads.common import (
    LossFn,
    check_batch,
    flat_rows,
    select_parameters,
)
from influx.grads.projection import Projector, dense_project
from influx.grads.rules import LayerRule, MatmulRule, rule_for
from influx.kernels import pairwise_grad_dot


@dataclass
class PlannedLayer:
    """A module that owns selected parameters, the rule that serves it, and their full names."""

    name: str
    module: nn.Module
    rule: LayerRule
    params: dict[str, str] = field(default_factory=dict)  # local name -> full name


def plan_layers(model: nn.Module, selected: dict[str, nn.Parameter]) -> list[PlannedLayer]:
    """Every module that owns selected parameters, in registration order, with its rule. A rule
    for a whole module (``LayerRule.whole_module``) owns the parameters of its submodules too,
    which are then not planned on their own (nn.MultiheadAttention reads ``out_proj``'s weight
    without calling it)."""
    full_name_of = {id(p): name for name, p in selected.items()}
    layers, claimed = [], []
    for module_name, module in model.named_modules():
        if any(module_name.startswith(prefix) for prefix in claimed):
            continue
        rule = rule_for(module)
        if rule.whole_module:
            claimed.append(f"{module_name}." if module_name else "")
        owned = {
            local: full_name_of[id(p)]
            for local, p in rule.owned_parameters(module).items()
            if id(p) in full_name_of
        }
        if owned:
            layers.append(PlannedLayer(module_name, module, rule, owned))
    return layers


def tied_parameters(layers: list[PlannedLayer]) -> set[str]:
    """Full names of parameters registered in more than one module (weight tying)."""
    seen, tied = set(), set()
    for layer in layers:
        for full in layer.params.values():
            (tied if full in seen else seen).add(full)
    return tied


# Examples per chunk when a Dataset or DataLoader is streamed with chunk_size=None (a tensor or a
# tuple of tensors is then taken whole, as it already is in memory).
STREAM_CHUNK = 256


def data_chunks(
    data, targets, chunk_size: int | None, device: torch.device
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(offset, inputs, targets, dataset indices) of each chunk of at most ``chunk_size`` examples.

    ``data`` is inputs [N, ...] with ``targets`` [N] (the indices are then None: errors name
    positions), or a data argument (a tuple, Dataset or DataLoader, streamed by
    :func:`influx.data.iter_batches`, each example read once, each chunk moved to ``device``).
    """
    chunk_size = check_count_or_none("chunk_size", chunk_size)
    if isinstance(data, torch.Tensor):
        if targets is None:
            raise InfluxValueError(
                "inputs given as a tensor need their targets: pass (model, loss_fn, inputs, "
                "targets), or the data as one argument (inputs, targets) / a Dataset"
            )
        check_batch(data, targets)
        n = data.shape[0]
        step = n if chunk_size is None else chunk_size
        for start in range(0, n, max(step, 1)):
            yield start, data[start : start + step], targets[start : start + step], None
        return
    if targets is not None:
        raise InfluxValueError(
            "targets goes with inputs given as a tensor; data given as a tuple, Dataset or "
            "DataLoader carries its own targets: leave targets out"
        )
    if chunk_size is None:
        chunk_size = num_examples(data) if isinstance(data, (tuple, list)) else STREAM_CHUNK
    offset = 0
    for inputs, labels, indices in iter_batches(data, max(chunk_size, 1)):
        yield offset, inputs.to(device), labels.to(device), indices
        offset += inputs.shape[0]


def _capture_chunk(
    model, loss_fn, inputs, targets, layers, offset: int = 0, indices=None
) -> dict[str, list[LayerCall]]:
    modules = {layer.name: layer.module for layer in layers}
    params = dict(model.named_parameters())
    wanted = [params[full] for layer in layers for full in layer.params.values()]
    _, calls = capture(
        model, loss_fn, inputs, targets, modules, wanted, offset=offset, indices=indices
    )
    return calls


def _accumulate(total: dict, name: str, value: torch.Tensor) -> None:
    total[name] = total[name] + value if name in total else value


def _empty_grads(selected) -> dict[str, torch.Tensor]:
    return {name: p.new_zeros((0, *p.shape)) for name, p in selected.items()}


def _layer_grads(layers, calls) -> Iterator[tuple[str, torch.Tensor]]:
    """(full name, [N, *shape]) of each selected parameter, layer by layer, for the layers that
    took part; a layer's captured calls are released once its gradients are formed. A tied
    parameter comes once per module that uses it."""
    for layer in layers:
        layer_calls = calls.pop(layer.name)
        if not layer_calls:
            continue
        for local, g in layer.rule.grads(layer.module, layer_calls).items():
            if local in layer.params:
                yield layer.params[local], g


def _grads_of_chunk(
    model, loss_fn, inputs, targets, layers, selected, offset, indices=None
) -> dict[str, torch.Tensor]:
    calls = _capture_chunk(model, loss_fn, inputs, targets, layers, offset, indices)
    out: dict[str, torch.Tensor] = {}
    for name, g in _layer_grads(layers, calls):
        _accumulate(out, name, g)
    n = inputs.shape[0]
    # a selected parameter that did not take part in this forward has zero gradient
    return {
        name: out[name] if name in out else p.new_zeros((n, *p.shape))
        for name, p in selected.items()
    }


def _reference(selected: dict[str, nn.Parameter]) -> torch.Tensor:
    return next(iter(selected.values()))


def per_sample_grads(
    model: nn.Module,
    loss_fn: LossFn,
    data,
    targets: torch.Tensor | None = None,
    *,
    params: Iterable[str] | None = None,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample gradients of every selected parameter: name -> [N, *param.shape].

    ``params`` selects parameter names (default: all that require grad); ``chunk_size`` bounds
    memory by processing that many examples per forward/backward. ``data`` is the inputs [N, ...]
    with ``targets`` [N] next, or one data argument (a tuple ``(inputs, targets[, indices])``, a
    Dataset or a DataLoader; ``targets`` left out) streamed ``chunk_size`` examples at a time (a
    Dataset 256 when None, a DataLoader its own batches), each example read once, errors naming
    its dataset indices; rows follow the order the data yields its examples.
    """
    selected = select_parameters(model, params)
    layers = plan_layers(model, selected)
    device = _reference(selected).device
    parts = [
        _grads_of_chunk(model, loss_fn, x, y, layers, selected, offset, indices)
        for offset, x, y, indices in data_chunks(data, targets, chunk_size, device)
    ]
    if not parts:
        return _empty_grads(selected)
    if len(parts) == 1:
        return parts[0]  # one chunk: no copy
    return {name: torch.cat([part[name] for part in parts]) for name in selected}


def _sqnorms_of_chunk(
    model, loss_fn, inputs, targets, layers, selected, offset, indices=None
) -> dict[str, torch.Tensor]:
    calls = _capture_chunk(model, loss_fn, inputs, targets, layers, offset, indices)
    tied = tied_parameters(layers)
    out: dict[str, torch.Tensor] = {}
    tied_grads: dict[str, torch.Tensor] = {}
    for layer in layers:
        if not calls[layer.name]:
            continue
        if tied & set(layer.params.values()):
            # the norm of a sum is not the sum of norms: tied parameters are materialized
            for local, g in layer.rule.grads(layer.module, calls[layer.name]).items():
                if local in layer.params:
                    _accumulate(tied_grads, layer.params[local], g)
            continue
        for local, sq in layer.rule.sqnorms(layer.module, calls[layer.name]).items():
            if local in layer.params:
                out[layer.params[local]] = sq
    for name, g in tied_grads.items():
        out[name] = flat_rows(g).square().sum(1)
    zeros = inputs.new_zeros(inputs.shape[0], dtype=next(iter(selected.values())).dtype)
    return {name: out.get(name, zeros) for name in selected}


def per_sample_norms(
    model: nn.Module,
    loss_fn: LossFn,
    data,
    targets: torch.Tensor | None = None,
    *,
    params: Iterable[str] | None = None,
    by_layer: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Per-sample L2 gradient norms [N] (or name -> [N] with ``by_layer=True``).

    Layers with a rule never materialize per-sample gradients: Linear/Conv use the ghost norm or
    the direct form, whichever is cheaper for that layer. ``data`` is the inputs [N, ...]
    with ``targets`` [N] next, or one data argument (a tuple ``(inputs, targets[, indices])``, a
    Dataset or a DataLoader; ``targets`` left out) streamed ``chunk_size`` examples at a time (a
    Dataset 256 when None, a DataLoader its own batches), each example read once, errors naming
    its dataset indices; rows follow the order the data yields its examples.
    """
    selected = select_parameters(model, params)
    layers = plan_layers(model, selected)
    reference = _reference(selected)
    parts = [
        _sqnorms_of_chunk(model, loss_fn, x, y, layers, selected, offset, indices)
        for offset, x, y, indices in data_chunks(data, targets, chunk_size, reference.device)
    ]
    if not parts:
        sqnorms = {name: reference.new_zeros(0) for name in selected}
    elif len(parts) == 1:
        sqnorms = parts[0]  # one chunk: no copies (a GPU launches each one)
    else:
        sqnorms = {name: torch.cat([p[name] for p in parts]) for name in selected}
    if by_layer:
        return {name: sq.sqrt() for name, sq in sqnorms.items()}
    return torch.stack(list(sqnorms.values())).sum(0).sqrt()


def per_sample_projected(
    model: nn.Module,
    loss_fn: LossFn,
    data,
    targets: torch.Tensor | None = None,
    *,
    dim: int,
    seed: int = 0,
    kind: str = "kronecker",
    params: Iterable[str] | None = None,
    chunk_size: int | None = None,
    by_layer: bool = False,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Randomly projected per-sample gradients [N, K].

    ``kind="kronecker"``: each module gets ``dim // (number of modules)`` dims; a Linear/Conv
    weight (with its bias, as the weight of a constant-1 input) is projected as
    ``P_out G_i P_in^T`` (LoGra-style) without forming ``G_i``; other parameters are projected
    densely, or kept whole when they are smaller than their share. K is the sum of the shares
    actually used: at most ``dim``, or the number of modules when ``dim`` is smaller (each
    module keeps at least one dim). ``kind="dense"``: one Gaussian JL matrix [dim, P] applied
    to the flat gradient (K = dim), ``chunk_size`` examples at a time, each layer's columns
    as soon as they are formed: memory holds one layer's per-sample gradients, never the flat
    [N, P]. Same ``seed``, same projection.
    ``by_layer=True`` (Kronecker only) returns module name -> [N, k_module] instead, in the order
    of the columns of the [N, K] result. ``data`` and ``targets`` as in :func:`per_sample_grads`.
    """
    check_choice("kind", kind, ("kronecker", "dense"))
    if dim < 1:
        raise InfluxValueError(f"dim must be >= 1; got {dim}")
    selected = select_parameters(model, params)
    reference = _reference(selected)
    chunks = data_chunks(data, targets, chunk_size, reference.device)
    if kind == "dense":
        if by_layer:
            raise InfluxValueError("by_layer=True needs kind='kronecker' (a dense JL mixes layers)")
        # Chunk by chunk (the matrix is regenerated per chunk: the same seed gives the same
        # projection), each chunk one layer at a time.
        layers = plan_layers(model, selected)
        blocks = [
            _dense_projected_chunk(model, loss_fn, x, y, layers, selected, offset, dim, seed, ids)
            for offset, x, y, ids in chunks
        ]
        return torch.cat(blocks) if blocks else reference.new_zeros(0, dim)
    layers = plan_layers(model, selected)
    if tied_parameters(layers):
        raise UnsupportedModelError(
            f"parameters {sorted(tied_parameters(layers))} are shared between modules; Kronecker projection "
            "needs one owner per weight: use kind='dense' or select the parameters with params="
        )
    projector = Projector(
        budget=max(1, dim // len(layers)), seed=seed, dtype=reference.dtype, device=reference.device
    )
    parts: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in layers}
    seen = 0
    for offset, x, y, ids in chunks:
        calls = _capture_chunk(model, loss_fn, x, y, layers, offset, ids)
        for layer in layers:
            parts[layer.name].append(
                _project_layer(layer, calls[layer.name], projector, x.shape[0])
            )
        seen += x.shape[0]
    if seen == 0:
        return {} if by_layer else reference.new_zeros(0, 0)
    blocks = {name: torch.cat(chunks) for name, chunks in parts.items()}
    return blocks if by_layer else torch.cat(list(blocks.values()), dim=1)


def _dense_projected_chunk(
    model, loss_fn, inputs, targets, layers, selected, offset, dim: int, seed: int, indices=None
) -> torch.Tensor:
    """``dense_project(flatten_per_sample(per_sample_grads(...)))`` of one chunk, [n, dim], with
    each layer's gradients projected as soon as they are formed and then dropped (with the
    layer's captured inputs): memory holds one layer's [n, p] gradients, never the flat [n, P].
    Tied parameters add up over their modules first."""
    columns, width = {}, 0
    for name, param in selected.items():
        columns[name], width = width, width + param.numel()
    calls = _capture_chunk(model, loss_fn, inputs, targets, layers, offset, indices)
    tied = tied_parameters(layers)
    out = next(iter(selected.values())).new_zeros(inputs.shape[0], dim)
    pending: dict[str, torch.Tensor] = {}

    def add(name: str, grads: torch.Tensor) -> None:
        out.add_(dense_project(flat_rows(grads), dim, seed=seed, start=columns[name], width=width))

    for name, grads in _layer_grads(layers, calls):  # a layer that took no part adds nothing
        if name in tied:
            _accumulate(pending, name, grads)
        else:
            add(name, grads)
    for name, grads in pending.items():
        add(name, grads)
    return out


def _project_layer(layer: PlannedLayer, calls, projector: Projector, n: int) -> torch.Tensor:
    everything_selected = set(layer.params) == set(layer.rule.owned_parameters(layer.module))
    if calls and everything_selected:
        return torch.cat(
            layer.rule.project(layer.module, calls, projector, layer.name + "."), dim=1
        )
    # a partial selection (e.g. weight without bias) or an unused layer: dense per parameter
    blocks = []
    grads = layer.rule.grads(layer.module, calls) if calls else {}
    share = max(1, projector.budget // len(layer.params))
    for local, full in layer.params.items():
        param = layer.module.get_parameter(local)
        g = flat_rows(grads.get(local, param.new_zeros(n, *param.shape)))
        blocks.append(projector.dense_block(full, g, share))
    return torch.cat(blocks, dim=1)


def per_sample_gram(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    other: tuple[torch.Tensor, torch.Tensor] | None = None,
    params: Iterable[str] | None = None,
) -> torch.Tensor:
    """Inner products of per-sample gradients, ``[N, M]`` with entry ``<g_i, g'_j>``.

    ``other`` is a second batch ``(inputs, targets)`` (default: the first, giving the N x N Gram
    matrix). Linear/Conv layers with short token axes use ``sum_ts (a_t.a'_s)(b_t.b'_s)`` without
    forming gradients; other layers are materialized one layer at a time.
    """
    selected = select_parameters(model, params)
    layers = plan_layers(model, selected)
    calls = _capture_chunk(model, loss_fn, inputs, targets, layers)
    calls2 = calls if other is None else _capture_chunk(model, loss_fn, *other, layers)
    n, m = inputs.shape[0], (inputs if other is None else other[0]).shape[0]
    gram = next(iter(selected.values())).new_zeros(n, m)
    tied = tied_parameters(layers)
    # materialized per-parameter gradients; tied parameters sum their uses before the product
    left: dict[str, torch.Tensor] = {}
    right: dict[str, torch.Tensor] = {}
    for layer in layers:
        first, second = calls[layer.name], calls2[layer.name]
        if not first or not second:
            continue  # a layer unused by either batch contributes zero
        if _pairwise_without_grads(layer, first, tied):
            a, b = _with_bias_column(layer, first)
            a2, b2 = (a, b) if other is None else _with_bias_column(layer, second)
            gram += pairwise_grad_dot(a, b, a2, b2)
            continue
        g1 = layer.rule.grads(layer.module, first)
        g2 = g1 if other is None else layer.rule.grads(layer.module, second)
        for local, full in layer.params.items():
            _accumulate(left, full, flat_rows(g1[local]))
            _accumulate(right, full, flat_rows(g2[local]))
    for name in left:
        gram += left[name] @ right[name].T
    return gram


def _pairwise_without_grads(layer: PlannedLayer, calls, tied: set[str]) -> bool:
    module, rule = layer.module, layer.rule
    return (
        isinstance(rule, MatmulRule)
        and getattr(module, "groups", 1) == 1
        and set(layer.params) == {k for k, _ in module.named_parameters(recurse=False)}
        and not tied & set(layer.params.values())
        and rule.ghost_is_cheaper(module, calls)
    )


def _with_bias_column(layer: PlannedLayer, calls) -> tuple[torch.Tensor, torch.Tensor]:
    # a bias is the weight of a constant-1 input: one more column of a covers it (when the
    # bias is among the selected parameters)
    a, b = layer.rule.forms(layer.module, calls)
    a, b = a[:, 0], b[:, 0]
    if getattr(layer.module, "bias", None) is not None and "bias" in layer.params:
        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
    return a, b


@dataclass
class MatmulCapture:
    """Captured matmul form of one Linear/Conv layer, for curvature factors (K-FAC).

    ``a`` [N, T, d_in(+1)]: input activations (or unfolded patches), with a trailing column of
    ones when the layer has a bias; ``b`` [N, T, d_out]: gradients of the summed per-example
    losses w.r.t. the layer outputs. Example i's gradient of ``[weight | bias]`` is ``b[i]^T a[i]``.
    """

    module: nn.Module
    a: torch.Tensor
    b: torch.Tensor
    weight_name: str
    bias_name: str | None


def capture_matmul_layers(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    params: Iterable[str] | None = None,
    offset: int = 0,
) -> MatmulCaptures:
    """Capture (a, b) for every Linear/Conv layer owning a selected weight, from one backward.

    A layer's bias column is there only when its bias is selected too. ``offset`` is added to
    the positions that an error about a NaN / inf loss names.
    """
    selected = select_parameters(model, params)
    layers = [
        layer
        for layer in plan_layers(model, selected)
        if isinstance(layer.rule, MatmulRule) and "weight" in layer.params
    ]
    calls = _capture_chunk(model, loss_fn, inputs, targets, layers, offset)
    called = {layer.name: layer for layer in layers if calls[layer.name]}
    for layer in called.values():
        if getattr(layer.module, "groups", 1) != 1:
            raise UnsupportedModelError(
                f"layer {layer.name} is a grouped convolution (groups={layer.module.groups}): its "
                "weight has no single Kronecker factorization; exclude it with params="
            )
    return MatmulCaptures(called, calls)


class MatmulCaptures(Mapping):
    """Layer name -> :class:`MatmulCapture`, built on access and not kept.

    A conv's ``a`` holds unfolded patches, k_h * k_w times the size of its input; building them
    per access means a caller that goes through the layers one by one holds one layer's at a time.
    """

    def __init__(self, layers: dict[str, PlannedLayer], calls):
        self._layers, self._calls = layers, calls

    def __getitem__(self, name: str) -> MatmulCapture:
        layer = self._layers[name]
        a, b = _with_bias_column(layer, self._calls[name])
        weight_name, bias_name = layer.params["weight"], layer.params.get("bias")
        return MatmulCapture(layer.module, a, b, weight_name, bias_name)

    def __iter__(self):
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)
