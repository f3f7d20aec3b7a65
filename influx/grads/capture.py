"""Capture per-layer inputs and output gradients from ONE batched forward and backward.

For every captured call of a module we keep its inputs ``a`` (detached) and the gradient of the
*summed* per-example losses with respect to its output, ``b``. Because example i only touches
loss i, ``b[i]`` is exactly the gradient of loss i: per-sample gradients follow from (a, b) layer
by layer without a per-example backward.

The backward asks autograd only for the gradients at the captured outputs (``GradientEdge``s
recorded during the forward), so no parameter gradient is computed or accumulated into
``.grad``, and an in-place operation after a layer (``ReLU(inplace=True)``) cannot corrupt
what was recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode

from influx.errors import UnsupportedModelError
from influx.grads.common import (
    LossFn,
    call_loss,
    check_batch,
    check_finite,
    check_model,
    check_per_example_losses,
)


@dataclass
class LayerCall:
    """One call of a module during the forward pass."""

    args: tuple  # the positional inputs, tensors detached
    grad_output: torch.Tensor  # [N, *output.shape[1:]], d(sum of losses)/d(output)
    kwargs: dict = field(default_factory=dict)  # the keyword inputs, tensors detached


def _detached(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def detach(value):
        return value.detach() if isinstance(value, torch.Tensor) else value

    return tuple(map(detach, args)), {key: detach(value) for key, value in kwargs.items()}


def first_output(output):
    """A module's output as the rules differentiate it: a tuple's first element (the capture
    refuses a loss that depends on the others)."""
    return output[0] if isinstance(output, tuple) and output else output


def _outputs(name: str, module: nn.Module, output, batch: int):
    """(the output the rules differentiate, the other tensors of a tuple output that carry
    gradients): a tuple's first element is the output, and the loss must not depend on the rest
    (checked after the backward, see :func:`_check_unused`)."""
    others = []
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        others = [t for t in _tensors(output[1:]) if t.requires_grad]
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise UnsupportedModelError(
            f"module {name} ({type(module).__name__}) returns {type(output).__name__}; "
            "per-sample rules need a tensor output (or a tuple whose first element is one) from "
            "each module that owns parameters: make the module return one, or leave its "
            "parameters out with params="
        )
    if output.dim() == 0 or output.shape[0] != batch:
        # Rules read example i at index i of the output gradient: anything else (a weight
        # computed by a parametrization, a sequence-first layout) would mix examples silently.
        raise UnsupportedModelError(
            f"module {name} ({type(module).__name__}) returned shape {tuple(output.shape)} for "
            f"a batch of {batch}; per-sample rules need one row per example in every output of a "
            "module that owns parameters: use batch-first layouts (e.g. batch_first=True), "
            "compute an output shared by the batch per example (a positional embedding as "
            "wpe(positions.expand(N, -1)), not wpe(positions)), remove a parametrization "
            "(torch.nn.utils.parametrize), or leave the parameters out with params="
        )
    return output, [(name, module, get_gradient_edge(t)) for t in others]


def _tensors(value):
    """The tensors in nested tuples and lists (an LSTM returns (output, (h, c)))."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def _check_unused(others, grads) -> None:
    """Refuse a tuple output other than the first that the loss depends on."""
    for (name, module, _), grad in zip(others, grads):
        if grad is not None:
            raise UnsupportedModelError(
                f"the loss depends on an output of module {name} ({type(module).__name__}) "
                "other than its first; per-sample rules differentiate a module through its "
                "first output only: use only that one, or leave its parameters out with params="
            )


class _ParameterUseWatch(TorchFunctionMode):
    """Refuses a selected parameter read by an operation while no module owning it is running.

    Per-sample rules see the calls of the modules that own the parameters. A parameter read
    elsewhere (an output layer computing ``F.linear(h, self.embedding.weight)``, a parent module
    reading a child's weight) has a gradient the rules never see: its per-sample gradients would
    be silently wrong. A module whose rule covers its submodules (nn.MultiheadAttention and its
    ``out_proj``) owns their parameters here too.
    """

    def __init__(self, modules: Mapping[str, nn.Module], parameters):
        super().__init__()
        self.modules = modules
        selected = {id(p) for p in parameters}
        # id(parameter) -> the watched modules owning it: on each path from a watched module
        # down to the parameter, the nearest watched module above it (a module whose rule covers
        # its submodules is watched in their place)
        self.owners: dict[int, list[str]] = {}
        self.names: dict[int, str] = {}
        for name, module in modules.items():
            prefix = f"{name}." if name else ""
            for local, p in module.named_parameters(remove_duplicate=False):
                path = (prefix + local).split(".")[:-1]
                nearest = next(
                    ".".join(path[:k])
                    for k in range(len(path), -1, -1)
                    if ".".join(path[:k]) in modules
                )
                if id(p) in selected and nearest == name:
                    self.owners.setdefault(id(p), []).append(name)
                    self.names.setdefault(id(p), prefix + local)
        self.running = dict.fromkeys(modules, 0)

    @contextmanager
    def watching(self):
        """The mode on, with each owner's running calls counted (its first pre-hook, so that
        a pre-hook computing the weight, as weight_norm's does, counts as inside the call)."""

        def enter(name, *_):
            self.running[name] += 1

        def leave(name, *_):
            self.running[name] -= 1

        handles = []
        for name, module in self.modules.items():
            handles.append(module.register_forward_pre_hook(partial(enter, name), prepend=True))
            handles.append(module.register_forward_hook(partial(leave, name)))
        try:
            with self:
                yield
        finally:
            for handle in handles:
                handle.remove()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        outside = [
            id(t)
            for value in (*args, *kwargs.values())
            for t in (value if isinstance(value, (list, tuple)) else (value,))
            if isinstance(t, nn.Parameter) and id(t) in self.owners and not self._running(id(t))
        ]
        result = func(*args, **kwargs)
        # only a read that carries gradient back to the parameter escapes the rules: its shape,
        # dtype or device, a detached copy or a computation under no_grad do not
        if outside and any(t.requires_grad for t in _tensors(result)):
            self._refuse(outside[0])
        return result

    def _running(self, key: int) -> bool:
        return any(self.running[name] for name in self.owners[key])

    def _refuse(self, key: int) -> None:
        owner = type(self.modules[self.owners[key][0]]).__name__
        raise UnsupportedModelError(
            f"parameter {self.names[key]!r} is read outside a call of the {owner} that owns it "
            "(as an output layer reading an embedding's weight, or a parent module reading a "
            "child's), so per-sample rules would miss part of its gradient: call "
            "the module instead (tie weights by sharing the Parameter between two modules, "
            "e.g. out.weight = embedding.weight), or leave it out with params= (a read that "
            "does not feed the loss can go under torch.no_grad())"
        )


def _watched(modules, parameters, offset: int):
    """The parameter-use watch for the first chunk of a pass (offset 0): a model reads its
    parameters the same way for every batch, and the watch costs Python work per operation."""
    return _ParameterUseWatch(modules, parameters).watching() if offset == 0 else nullcontext()


@contextmanager
def _requiring_grad(parameters):
    """Temporarily make the selected parameters require grad (a frozen one may be selected)."""
    frozen = [p for p in parameters if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def capture(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    modules: Mapping[str, nn.Module],
    parameters=(),
    *,
    offset: int = 0,
    indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, list[LayerCall]]]:
    """Run forward + backward once; return the per-example losses [N] and the calls per module.

    ``modules`` maps names to the modules to watch; ``parameters`` are made to require grad for
    the duration, so the watched outputs are part of the graph. A NaN / inf loss (or a class
    target out of range) raises an error naming the example before the backward: its dataset
    index from ``indices`` [N], else its position in ``inputs`` plus ``offset``. ``offset`` 0
    marks the first batch of a pass, which the parameter-use watch inspects.
    """
    check_batch(inputs, targets)
    check_model(model)
    pending: list[tuple[str, tuple, dict, torch.autograd.graph.GradientEdge, torch.Tensor]] = []
    others: list = []  # (name, module, edge) of tuple outputs past the first

    def watch(name: str):
        def hook(module, args, kwargs, output):
            output, more = _outputs(name, module, output, inputs.shape[0])
            others.extend(more)
            if output.requires_grad:
                args, kwargs = _detached(args, kwargs)
                pending.append((name, args, kwargs, get_gradient_edge(output), output))

        return hook

    handles = [
        module.register_forward_hook(watch(name), with_kwargs=True)
        for name, module in modules.items()
    ]
    try:
        with torch.enable_grad(), _requiring_grad(list(parameters)):
            with _watched(modules, parameters, offset):
                losses = call_loss(loss_fn, model(inputs), targets, indices=indices, offset=offset)
            check_per_example_losses(losses, inputs.shape[0])
            check_finite(losses.detach(), "losses", indices=indices, offset=offset)
            if pending or others:
                edges = [edge for *_, edge, _ in pending] + [edge for *_, edge in others]
                grads = torch.autograd.grad(losses.sum(), edges, allow_unused=True)
                _check_unused(others, grads[len(pending) :])
            else:
                grads = []
    finally:
        for handle in handles:
            handle.remove()

    calls: dict[str, list[LayerCall]] = {name: [] for name in modules}
    for (name, args, kwargs, _, output), g in zip(pending, grads):
        calls[name].append(LayerCall(args, torch.zeros_like(output) if g is None else g, kwargs))
    return losses.detach(), calls


def capture_streaming(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    modules: Mapping[str, nn.Module],
    on_module: Callable[[str, list[LayerCall]], None],
    parameters=(),
    *,
    offset: int = 0,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`capture`, but each module's calls go to ``on_module(name, calls)`` *during* the
    backward, as soon as the last of them has its output gradient, and are not kept.

    :func:`capture` holds every watched layer's inputs and output gradients until the backward
    ends (about twice the forward's activations); here a layer's inputs are released once its
    gradient has arrived and been handed over, so the peak is the forward's activations plus
    one layer's work. Returns the per-example losses [N].

    The backward asks for the gradient of the inputs (when they are floating point; every layer
    that depends on them is reached on the way) and of the outputs of calls whose inputs need no
    gradient (an embedding of token ids). A call that still got no gradient (its output reaches
    the loss only through parameters, or not at all) is handed over after the backward, by one
    more :func:`capture` of its modules.
    """
    check_batch(inputs, targets)
    check_model(model)
    # per call: (args, kwargs, zeros), then its LayerCall once the gradient has arrived
    pending: dict[str, list] = {name: [] for name in modules}
    roots: list[torch.autograd.graph.GradientEdge] = []
    others: list = []  # (name, module, edge) of tuple outputs past the first

    def arrived(name: str, index: int, output_nr: int, grad_outputs) -> None:
        calls = pending[name]
        args, kwargs, zeros = calls[index]
        grad = grad_outputs[output_nr]
        calls[index] = LayerCall(args, grad if grad is not None else zeros(), kwargs)
        if all(isinstance(call, LayerCall) for call in calls):
            del pending[name]
            on_module(name, calls)

    def watch(name: str):
        def hook(module, args, kwargs, output):
            if name not in pending:  # handed over already: a rule replaying the module
                return
            output, more = _outputs(name, module, output, inputs.shape[0])
            others.extend(more)
            if not output.requires_grad:
                return
            zeros = partial(torch.zeros, output.shape, dtype=output.dtype, device=output.device)
            pending[name].append((*_detached(args, kwargs), zeros))
            edge = get_gradient_edge(output)
            edge.node.register_prehook(
                partial(arrived, name, len(pending[name]) - 1, edge.output_nr)
            )
            inputs_of_call = (*args, *kwargs.values())
            if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in inputs_of_call):
                roots.append(edge)

        return hook

    handles = [
        module.register_forward_hook(watch(name), with_kwargs=True)
        for name, module in modules.items()
    ]
    leaf = inputs.detach().requires_grad_() if inputs.is_floating_point() else None
    try:
        with torch.enable_grad(), _requiring_grad(list(parameters)):
            with _watched(modules, parameters, offset):
                outputs = model(inputs if leaf is None else leaf)
                losses = call_loss(loss_fn, outputs, targets, indices=indices, offset=offset)
            check_per_example_losses(losses, inputs.shape[0])
            check_finite(losses.detach(), "losses", indices=indices, offset=offset)
            wanted = ([] if leaf is None else [leaf]) + roots + [edge for *_, edge in others]
            if wanted and (any(pending.values()) or others):
                grads = torch.autograd.grad(losses.sum(), wanted, allow_unused=True)
                _check_unused(others, grads[len(wanted) - len(others) :])
    finally:
        for handle in handles:
            handle.remove()
    unreached = {name: modules[name] for name, calls in pending.items() if calls}
    if unreached:
        for name, calls in capture(
            model, loss_fn, inputs, targets, unreached, parameters, offset=offset, indices=indices
        )[1].items():
            on_module(name, calls)
    return losses.detach()
