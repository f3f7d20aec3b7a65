"""``method="kfac"`` / ``"ekfac"``: Kronecker-factored curvature per matmul layer.

For a Linear / Conv layer (inputs a and output gradients b captured by
``influx.grads.capture_matmul_layers``; a Conv's a holds unfolded patches, T positions per example)
with per-example gradient G_n = b_n^T a_n ([d_out, d_in(+1)], a bias folded in as a
column of ones), the Fisher / GGN block of the mean loss is approximated by A (x) S with
A = (1/N) sum_n a_n^T a_n and S = (1/(N T)) sum_n b_n^T b_n (K-FAC, Martens & Grosse 2015; the
1/T over a conv's positions as in KFC, Grosse & Martens 2016; Kronfluence divides both factors
by N T, which scales each conv block down T-fold and so reweights layers in K-FAC). EK-FAC
(George et al. 2018) keeps the Kronecker eigenbasis Q_S, Q_A but refits the eigenvalues to
(1/N) sum_n ((Q_S^T G_n Q_A)_ij)^2. Layers are independent (block-diagonal curvature), so
per-layer scores are exact shares of the total.

``fisher="sampled"`` draws labels from softmax(outputs), so the factors estimate the true Fisher =
the GGN of *softmax cross-entropy* (and only of that loss); ``"empirical"`` uses the training
labels and fits any loss. ``"auto"`` checks the loss rather than assuming it: ``loss_fn`` is
evaluated on the first batch and compared with ``F.cross_entropy``; when they agree it samples,
with real-valued targets it takes the empirical Fisher, and with class targets under another loss
it raises and asks for the choice. Damping ``"auto"`` is 0.1 times the mean eigenvalue of each
block. Scores are I_up,loss (sign -1), as for the other influence estimators.

Coverage. Every selected parameter is scored (``params=``, default: all trainable). Linear / Conv
weights (with their biases) get Kronecker blocks; every other parameter (GroupNorm / LayerNorm
affine parameters, a bias whose weight is not selected, grouped convolutions, ...) gets a
*diagonal* block per module, F = diag((1/N) sum_n g_n^2) from the same captured per-sample
gradients (the engine's rules compute them from the same backward), for K-FAC and EK-FAC alike.
``others="exclude"`` leaves those parameters out instead (Kronfluence's choice: Linear / Conv
only). ``diagnostics["coverage"]`` names the parameters in each kind of block.

Feature basis. Each Kronecker layer's features are its per-example gradients either in the
parameter basis (G_n = b_n^T a_n; the preconditioner rotates, divides and rotates back) or in the
Kronecker eigenbasis (Q_S^T G_n Q_A, computed from the captures as (b_n Q_S)^T (a_n Q_A) when a
layer has few tokens, so G_n is never formed; the preconditioner only divides). Inner products
are the same in both (the rotation is orthogonal), so scores, self-influence and per-layer shares
do not depend on the choice, only the cost does: ``feature_basis="auto"`` takes the eigenbasis
where it is cheaper for scoring one query per :data:`TRAIN_PER_QUERY` train examples.

Streaming. Every pass (factors, eigenvalue refit, features) hands each block over *during* the
backward (``influx.grads.capture.capture_streaming``), so a layer's inputs and output gradients
are dropped as soon as its block is done. Scoring a train set too large to cache contracts each
block with the preconditioned queries right there (:meth:`KFACEstimator.score_batch`), and
self-influence sums each block's squares (:meth:`KFACEstimator.self_influence_batch`): no train
features [B, K] are formed. The queries are preconditioned block by block as they arrive.

Saving and splitting. :meth:`KFACEstimator.state` / :meth:`KFACEstimator.from_state` hold
everything a fit computed (see ``influx.influence.factors_io``). With ``split_ranks=True`` under
torchrun, every rank passes the same train set, fits the factor batches ``i % world_size ==
rank`` and the sums are all-reduced before finalizing: factors are sums over examples.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from influx.checks import check_integer
from influx.curvature import (
    FACTORED_LAYERS,  # noqa: F401 - re-exported: the one definition is in influx.curvature.factors
    FISHER_DRAWS_TOTAL,
    MAX_FISHER_DRAWS,
    DiagonalFactors,
    KroneckerFactors,
    Spectrum,
    accumulate_diagonal_factors,
    accumulate_ekfac_eigenvalues,
    accumulate_kronecker_factors,
    all_reduce_ekfac_sums,
    all_reduce_factor_sums,
    check_damped_spectrum,
    eigenbasis_gradients,
    finalize_diagonal_factors,
    finalize_ekfac_eigenvalues,
    finalize_kronecker_factors,
    fisher_draws,
    is_factored,
    resolve_damping,
    sample_labels,
)
from influx.errors import InfluxValueError, UnsupportedModelError
from influx.grads.capture import capture_streaming
from influx.grads.common import LossFn, check_model, flat_rows, select_parameters
from influx.grads.engine import plan_layers
from influx.grads.rules import rule_for
from influx.influence import stream
from influx.influence.base import (
    Block,
    Estimator,
    FeatureLayout,
    check_choice,
    check_damping,
    option,
)

# feature_basis="auto" assumes one query per this many train examples: the query side is
# preconditioned once, the train side is featurized per example.
TRAIN_PER_QUERY = 20


@dataclass(frozen=True)
class Coverage:
    """Which selected parameters each kind of block covers.

    ``kronecker``: layer -> (weight name, bias name or None); ``diagonal``: module -> parameter
    names; ``excluded``: selected parameters left out (``others="exclude"``).
    """

    kronecker: dict[str, tuple[str, str | None]]
    diagonal: dict[str, tuple[str, ...]]
    excluded: tuple[str, ...]

    @classmethod
    def of(cls, model: nn.Module, params, others: str) -> Coverage:
        kronecker, diagonal, excluded = {}, {}, []
        # the engine's plan: each selected parameter with the module whose rule covers it
        for layer in plan_layers(model, select_parameters(model, params)):
            owned = layer.params
            if is_factored(layer.module) and "weight" in owned:
                kronecker[layer.name] = (owned["weight"], owned.get("bias"))
            elif others == "diagonal":
                diagonal[layer.name] = tuple(owned.values())
            else:
                excluded += owned.values()
        if excluded and params is not None:
            raise InfluxValueError(
                f"others='exclude' leaves parameters outside Linear/Conv layers out, but params= "
                f"names {excluded[:5]}: drop them from params=, or use others='diagonal'"
            )
        if not kronecker and not diagonal:
            raise UnsupportedModelError(
                f"others='exclude' leaves nothing to score: the selected parameters "
                f"{excluded[:5]} are all outside Linear/Conv layers; use others='diagonal'"
            )
        return cls(kronecker, diagonal, tuple(excluded))

    def names(self) -> dict[str, list[str]]:
        return {
            "kronecker": [n for pair in self.kronecker.values() for n in pair if n is not None],
            "diagonal": [n for names in self.diagonal.values() for n in names],
            "excluded": list(self.excluded),
        }


class _LayerCapture:
    """One batch of one Kronecker layer: ``a`` [N, T, d_in(+1)] (a bias as a column of ones),
    ``b`` [N, T, d_out], both built on first access; ``gradients()`` [N, d_out, d_in(+1)] by the
    engine's rule (per kernel offset for wide convs: no unfolded patches)."""

    def __init__(self, module, calls, weight_name: str, bias_name: str | None):
        self.module, self.calls, self.rule = module, calls, rule_for(module)
        self.weight_name, self.bias_name = weight_name, bias_name
        d_in = module.weight[0].numel() + (bias_name is not None)
        tokens = sum(c.grad_output[0].numel() // module.weight.shape[0] for c in calls)
        self.dims = (tokens, d_in, module.weight.shape[0])

    @cached_property
    def _forms(self):
        """(a [N, T, d_in] without the bias column, b [N, T, d_out])."""
        a, b = self.rule.forms(self.module, self.calls)
        return a[:, 0], b[:, 0]

    @property
    def a(self) -> torch.Tensor:
        a = self._forms[0]
        if self.bias_name is None:
            return a
        return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)

    def activation_gram(self) -> torch.Tensor:
        """sum over examples and tokens of a^T a [d_in(+1), d_in(+1)]; the bias column of ones
        enters the product, not a copy of the (unfolded, large) inputs."""
        a = self._forms[0].reshape(-1, self._forms[0].shape[-1])
        gram = a.T @ a
        if self.bias_name is None:
            return gram
        d, sums = a.shape[1], a.sum(0)
        out = gram.new_empty(d + 1, d + 1)
        out[:d, :d], out[:d, d], out[d, :d], out[d, d] = gram, sums, sums, a.shape[0]
        return out

    @property
    def b(self) -> torch.Tensor:
        return self._forms[1]

    def gradients(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """Per-example [weight | bias] gradients [N, d_out, d_in(+1)], written to ``out`` if given."""
        weight = self.rule.weight_grads(self.module, self.calls)
        n, d_out = weight.shape[0], weight.shape[1]
        weight = weight.reshape(n, d_out, -1)
        if self.bias_name is None:
            if out is None:
                return weight
            out.copy_(weight)
            return out
        if out is None:
            out = weight.new_empty(n, d_out, weight.shape[2] + 1)
        out[:, :, :-1] = weight
        out[:, :, -1] = self.rule.bias_grads(self.module, self.calls)
        return out


class _Stream:
    """One forward + backward over a batch, handing each block's captures to a callback *as the
    backward produces them* (``influx.grads.capture.capture_streaming``): a Kronecker layer as a
    :class:`_LayerCapture`, a diagonal block as its flat per-example gradients [N, numel] in
    coverage order. A block is dropped once handled, so no batch ever holds every layer's inputs
    and output gradients at once."""

    def __init__(self, model: nn.Module, loss_fn, coverage: Coverage):
        modules = dict(model.named_modules())
        self.modules = {name: modules[name] for name in (*coverage.kronecker, *coverage.diagonal)}
        named = dict(model.named_parameters())
        kinds = coverage.names()
        self.parameters = [named[n] for n in kinds["kronecker"] + kinds["diagonal"]]
        self.model, self.loss_fn, self.coverage = model, loss_fn, coverage

    def run(self, inputs, targets, on_block, *, offset: int = 0, loss_fn=None) -> None:
        """``on_block(name, captured)`` for every block the batch uses; the gradients are those of
        ``loss_fn`` (default: the training loss; a query's measurement otherwise)."""

        def on_module(name: str, calls) -> None:
            module = self.modules[name]
            if name in self.coverage.kronecker:
                weight, bias = self.coverage.kronecker[name]
                on_block(name, _LayerCapture(module, calls, weight, bias))
                return
            grads = rule_for(module).grads(module, calls)
            prefix = f"{name}." if name else ""
            names = self.coverage.diagonal[name]
            on_block(name, torch.cat([flat_rows(grads[n[len(prefix) :]]) for n in names], dim=1))

        capture_streaming(
            self.model,
            loss_fn or self.loss_fn,
            inputs,
            targets,
            self.modules,
            on_module,
            self.parameters,
            offset=offset,
        )


@dataclass(frozen=True)
class KFACOptions:
    damping: float | str = option(
        "auto", "number >= 0, or 'auto' = 0.1 * mean eigenvalue per layer"
    )
    fisher: str = option(
        "auto",
        "'sampled' (labels from softmax(outputs): the GGN of softmax cross-entropy), 'empirical' "
        "(train labels, any loss) or 'auto' (sampled when loss_fn is checked to be cross-entropy)",
    )
    batch_size: int = option(512, "train examples per factor-estimation batch")
    seed: int = option(0, "seed for the sampled labels")
    params: tuple[str, ...] | None = option(
        None, "parameter names to differentiate (default: all trainable)"
    )
    others: str = option(
        "diagonal",
        "parameters outside Linear/Conv layers (norm affine, lone biases): 'diagonal' (a diagonal "
        "Fisher block each) or 'exclude' (score Linear/Conv weights and biases only)",
    )
    feature_basis: str = option(
        "auto",
        "basis of each Kronecker layer's features: 'eigen', 'parameter' or 'auto' (the cheaper); "
        "scores are the same",
    )
    fisher_draws: int | str = option(
        "auto",
        "labels drawn per example for fisher='sampled' (each factor pass), or 'auto' = one, and "
        f"more only for small models: up to {MAX_FISHER_DRAWS} each and {FISHER_DRAWS_TOTAL} per "
        "pass while the extra passes cost little (influx.curvature.fisher_draws)",
    )
    split_ranks: bool = option(
        False,
        "under torchrun: each rank fits every world_size-th factor batch of the same train set "
        "and the factor sums are all-reduced",
    )

    def __post_init__(self):
        check_damping(self.damping)
        check_choice("fisher", self.fisher, ("auto", "sampled", "empirical"))
        check_choice("others", self.others, ("diagonal", "exclude"))
        check_choice("feature_basis", self.feature_basis, ("auto", "eigen", "parameter"))
        check_integer("batch_size", self.batch_size, minimum=1)
        if self.fisher_draws != "auto":
            check_integer("fisher_draws", self.fisher_draws, minimum=1)


def _is_cross_entropy(model, loss_fn, inputs, targets) -> bool:
    """Whether ``loss_fn`` is softmax cross-entropy on this batch (outputs [B, C], labels [B])."""
    if targets.is_floating_point() or targets.dim() != 1 or inputs.shape[0] == 0:
        return False
    with torch.no_grad():
        outputs = model(inputs)
        if outputs.dim() != 2:
            return False
        losses = loss_fn(outputs, targets)
        reference = F.cross_entropy(outputs, targets, reduction="none")
    return losses.shape == reference.shape and bool(
        torch.allclose(losses, reference, rtol=1e-5, atol=1e-6)
    )


def resolve_fisher(fisher: str, model, loss_fn, inputs, targets, *, fallback=None) -> str:
    """'sampled' or 'empirical' for ``fisher`` (see the module docstring for ``'auto'``); where
    'auto' cannot decide, ``fallback`` if given (a preconditioner only has to be close)."""
    if fisher == "sampled" and (targets.is_floating_point() or targets.dim() != 1):
        raise InfluxValueError(
            "fisher='sampled' draws class labels from softmax(outputs) and needs integer class "
            f"targets [N]; got {targets.dtype} of shape {tuple(targets.shape)}: use fisher='empirical'"
        )
    if fisher != "auto":
        return fisher
    if targets.is_floating_point():
        return "empirical"
    if _is_cross_entropy(model, loss_fn, inputs, targets):
        return "sampled"
    if fallback is not None:
        return fallback
    raise InfluxValueError(
        "fisher='auto' samples labels from softmax(outputs), which is the Fisher of softmax "
        "cross-entropy only, and loss_fn does not match F.cross_entropy(outputs, targets, "
        "reduction='none') on the first batch: pass fisher='empirical' (the train labels, any "
        "loss) or fisher='sampled' (if the loss is a softmax cross-entropy after all)"
    )


class KFACEstimator(Estimator):
    """(K-FAC or EK-FAC + damping I)^-1 per block; features: per-example gradients, one block per
    Kronecker layer (in its parameter basis or its eigenbasis) and per diagonal module."""

    contracts_layers = True  # see ``score_batch`` / ``self_influence_batch``

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data,
        options: KFACOptions,
        *,
        eigen_corrected: bool,
        fisher_fallback: str | None = None,
        _state: dict | None = None,
    ):
        check_model(model)
        self.model, self.loss_fn, self.params = model, loss_fn, options.params
        self.options, self.eigen_corrected = options, eigen_corrected
        self.coverage = Coverage.of(model, options.params, options.others)
        self._stream = _Stream(model, loss_fn, self.coverage)
        self._cast: dict = {}
        if _state is not None:  # from_state: nothing to fit
            self.factors, self.diagonal = _state["factors"], _state["diagonal"]
            self.tokens, fisher = _state["tokens"], _state["fisher"]
        else:
            fisher = self._fit(data, options, fisher_fallback)
        self.dampings = {}
        for name, f in (*self.factors.items(), *self.diagonal.items()):
            spectrum = Spectrum.of_eigenvalues(f.eigenvalues.flatten())
            self.dampings[name] = resolve_damping(options.damping, spectrum)
            check_damped_spectrum(spectrum, self.dampings[name], what=f"K-FAC block of {name}")
        self.basis = {name: self._basis_of(name) for name in self.factors}
        self.layout, self.shapes = self._layout()
        self._blocks = {blk.layer: blk for blk in self.layout.blocks}
        self.diagnostics = {
            "fisher": fisher,
            "damping": self.dampings,
            "layers": list(self.factors),
            "diagonal_blocks": list(self.diagonal),
            "coverage": self.coverage.names(),
            "feature_basis": dict(self.basis),
        }

    # ---------------------------------------------------------------------------------- fitting

    def _fit(self, data, options: KFACOptions, fallback: str | None) -> str:
        num_train = stream.size(data)
        if num_train == 0:
            raise InfluxValueError("the training set is empty: K-FAC needs at least one example")
        batch_size = options.batch_size
        rank, world, reduce_sum = _ranks(options.split_ranks)
        generator = torch.Generator().manual_seed(options.seed)
        fisher, draws = None, 1

        def draw() -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
            """This rank's batches as the data streams, one per label draw when the Fisher is
            sampled (the factors are means over examples and draws). The first batch of the
            first pass resolves ``fisher='auto'`` (no read of its own)."""
            nonlocal fisher, draws
            start = 0
            for number, (x, y, _) in enumerate(stream.batches(data, batch_size)):
                if fisher is None:
                    fisher = resolve_fisher(
                        options.fisher, self.model, self.loss_fn, x, y, fallback=fallback
                    )
                    if fisher == "sampled":
                        draws = fisher_draws(options.fisher_draws, num_train, self.model, x)
                labels = [y]
                if fisher == "sampled":
                    # Every rank draws every batch's labels: the draws do not depend on the split.
                    labels = sample_labels(self.model, x, generator, draws=draws, offset=start).to(
                        device=y.device, dtype=y.dtype
                    )
                if number % world == rank:
                    for drawn in labels:
                        yield start, x, drawn
                start += x.shape[0]

        self.factors: dict[str, KroneckerFactors] = {}
        self.diagonal: dict[str, DiagonalFactors] = {}
        self.tokens: dict[str, int] = {}

        def accumulate(name: str, captured) -> None:
            if name in self.coverage.kronecker:
                self.tokens[name] = captured.dims[0]
                accumulate_kronecker_factors(self.factors, {name: captured})
            else:
                names = self.coverage.diagonal[name]
                numels = tuple(self.model.get_parameter(n).numel() for n in names)
                accumulate_diagonal_factors(self.diagonal, name, names, numels, captured)

        for start, x, y in draw():
            self._stream.run(x, y, accumulate, offset=start)
        # Blocks arrive in backward order: keep the coverage's (module) order for the layout.
        self.factors = {n: self.factors[n] for n in self.coverage.kronecker if n in self.factors}
        self.diagonal = {n: self.diagonal[n] for n in self.coverage.diagonal if n in self.diagonal}
        if world > 1:
            all_reduce_factor_sums(self.factors, self.diagonal, reduce_sum)
        # Sums over examples and draws -> sums over examples (``count`` stays the examples).
        for f in self.factors.values():
            f.activation, f.gradient = f.activation / draws, f.gradient / draws
            f.count //= draws
        for f in self.diagonal.values():
            f.diagonal, f.count = f.diagonal / draws, f.count // draws
        finalize_kronecker_factors(self.factors, compact=self.dtype)
        _row_major_bases(self.factors)
        finalize_diagonal_factors(self.diagonal)
        if self.eigen_corrected:
            # The refit draws labels of its own. Refitted on the draws that chose the eigenbasis,
            # the eigenvalues re-measure those draws' noise (the top ones too large, the bottom
            # ones too small: a sample covariance's eigenvalues are spread wider than the
            # Fisher's) and EK-FAC scores stayed at K-FAC's; fresh draws give unbiased
            # eigenvalues in that basis (Kronfluence resamples each pass too).
            sums: dict[str, torch.Tensor] = {}

            def refit(name: str, captured) -> None:
                if name in self.factors:
                    accumulate_ekfac_eigenvalues(self.factors, {name: captured}, sums)

            # A second pass: with fresh draws when sampled, else the train labels again.
            for start, x, y in draw():
                self._stream.run(x, y, refit, offset=start)
            if world > 1:
                for name, f in self.factors.items():  # a rank may have seen no call of a layer
                    sums.setdefault(name, torch.zeros_like(f.eigenvalues))
                all_reduce_ekfac_sums(sums, reduce_sum)
            finalize_ekfac_eigenvalues(self.factors, {k: v / draws for k, v in sums.items()})
        return fisher

    def _basis_of(self, name: str) -> str:
        """'eigen' or 'parameter' for a Kronecker layer's features (see the module docstring)."""
        if self.options.feature_basis != "auto":
            return self.options.feature_basis
        d_out, d_in = self.factors[name].eigenvalues.shape
        tokens = self.tokens.get(name, 1)
        formed = tokens * d_in * d_out  # G_n = b_n^T a_n
        turn = d_in * d_out * (d_in + d_out)  # Q_S^T G Q_A, or back
        rotated = min(tokens * (d_in**2 + d_out**2 + d_in * d_out), formed + turn)
        # Train examples are featurized one by one, queries also preconditioned: in the parameter
        # basis that rotates there and back, in the eigenbasis it only divides.
        eigen = (TRAIN_PER_QUERY + 1) * rotated
        parameter = (TRAIN_PER_QUERY + 1) * formed + 2 * turn
        return "eigen" if eigen < parameter else "parameter"

    def _layout(self):
        blocks, shapes, start = [], {}, 0
        for name, f in self.factors.items():
            shape = tuple(f.eigenvalues.shape)
            blocks.append(Block(name, start, start + shape[0] * shape[1]))
            shapes[name] = shape
            start += shape[0] * shape[1]
        for name, f in self.diagonal.items():
            blocks.append(Block(name, start, start + f.diagonal.numel()))
            shapes[name] = (f.diagonal.numel(),)
            start += f.diagonal.numel()
        return FeatureLayout(start, tuple(blocks)), shapes

    # ---------------------------------------------------------------------- features and solves

    def _tensors(self, name: str, dtype, device):
        """(Q_S, Q_A, 1 / (eigenvalues + damping)) of a block in ``dtype``, cast once."""
        key = (name, dtype, device)
        if key not in self._cast:
            if name in self.factors:
                f = self.factors[name]
                bases = (f.gradient_basis, f.activation_basis)
            else:
                f, bases = self.diagonal[name], (None, None)
            inverse = 1.0 / (f.eigenvalues + self.dampings[name])
            self._cast[key] = tuple(
                t if t is None else t.to(device=device, dtype=dtype) for t in (*bases, inverse)
            )
        return self._cast[key]

    def _block_features(self, name: str, captured, dtype) -> torch.Tensor:
        """One block's per-example features [N, block size] in its feature basis."""
        if name in self.diagonal:
            return captured.to(dtype)
        if self.basis[name] == "eigen":
            q_s, q_a, _ = self._tensors(name, dtype, captured.b.device)
            return eigenbasis_gradients(captured, q_s, q_a).to(dtype).flatten(1)
        return captured.gradients().to(dtype).flatten(1)

    def features(self, inputs, targets, loss_fn=None):
        """Per-example gradients, flat, block by block: a Kronecker layer's [d_out, d_in(+1)]
        in its feature basis, a diagonal block's parameters in coverage order."""
        out = self.new_features(inputs.shape[0], inputs)  # a block the batch skips stays 0
        dtype = out.dtype

        def write(name: str, captured) -> None:
            blk = self._blocks[name]
            out[:, blk.start : blk.stop] = self._block_features(name, captured, dtype)

        self._stream.run(inputs, targets, write, loss_fn=loss_fn)
        return out

    def score_batch(self, queries, inputs, targets, *, per_layer: bool = False):
        """<queries, f(z)> for the batch's examples z, [Q, B], contracted block by block while
        the backward produces each block's gradients: no [B, K] features are formed. With
        ``per_layer`` also each block's share {layer: [Q, B]}."""
        total = queries.new_zeros(queries.shape[0], inputs.shape[0])
        shares: dict[str, torch.Tensor] | None = {} if per_layer else None

        def contract(name: str, captured) -> None:
            blk = self._blocks[name]
            block = self._block_features(name, captured, queries.dtype)
            share = queries[:, blk.start : blk.stop] @ block.T
            total.add_(share)
            if shares is not None:
                shares[name] = share

        self._stream.run(inputs, targets, contract)
        return total, shares

    def self_influence_batch(self, inputs, targets) -> torch.Tensor:
        """:meth:`self_influence_of` the batch's features, block by block as the backward
        produces them (rotated into the eigenbasis whatever the feature basis): [B]."""
        dtype = self.dtype
        total = inputs.new_zeros(inputs.shape[0], dtype=dtype)

        def add(name: str, captured) -> None:
            q_s, q_a, inverse = self._tensors(name, dtype, total.device)
            if name in self.diagonal:
                rotated = captured.to(dtype)
            else:
                rotated = eigenbasis_gradients(captured, q_s, q_a).flatten(1)
            total.add_(rotated.square() @ inverse.flatten())

        self._stream.run(inputs, targets, add)
        return total

    def _rotated(self, features, blk):
        """A parameter-basis block of ``features`` in the eigenbasis [M, d_out, d_in(+1)]."""
        q_s, q_a, _ = self._tensors(blk.layer, features.dtype, features.device)
        grads = features[:, blk.start : blk.stop].reshape(-1, *self.shapes[blk.layer])
        return q_s.T @ grads @ q_a

    def _precondition_block(self, name: str, block: torch.Tensor) -> torch.Tensor:
        """One block [M, size] of features, in its feature basis, times its damped inverse."""
        q_s, q_a, inverse = self._tensors(name, block.dtype, block.device)
        if name in self.diagonal or self.basis[name] == "eigen":
            return block * inverse.flatten()
        grads = block.reshape(-1, *self.shapes[name])
        return (q_s @ ((q_s.T @ grads @ q_a) * inverse) @ q_a.T).flatten(1)

    def precondition(self, features):
        out = torch.empty_like(features)
        for blk in self.layout.blocks:
            out[:, blk.start : blk.stop] = self._precondition_block(
                blk.layer, features[:, blk.start : blk.stop]
            )
        return out

    @property
    def dtype(self) -> torch.dtype:
        """The model's dtype: features, factors and eigenbases are held in it."""
        return next(self.model.parameters()).dtype

    def new_features(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        """Zero features [rows, K] in the model's dtype on ``like``'s device."""
        return like.new_zeros(rows, self.layout.size, dtype=self.dtype)

    def preconditioned_features(
        self, inputs, targets, check=lambda rows: None, out=None, *, loss_fn=None
    ):
        """``precondition(features(batch))``, each block preconditioned as the backward produces
        it into ``out`` (zeros from :meth:`new_features`; allocated when not given): no second
        [B, K] buffer. The blocks act on each row alone, so ``check`` sees a bad gradient's row
        in the result."""
        out = self.new_features(inputs.shape[0], inputs) if out is None else out
        dtype = out.dtype

        def write(name: str, captured) -> None:
            blk = self._blocks[name]
            block = self._block_features(name, captured, dtype)
            out[:, blk.start : blk.stop] = self._precondition_block(name, block)

        self._stream.run(inputs, targets, write, loss_fn=loss_fn)
        check(out)
        return out

    def self_influence_of(self, features):
        """<f, precondition(f)> per row [M]: sum of rotated squares over (eigenvalue + damping)."""
        total = features.new_zeros(features.shape[0])
        for blk in self.layout.blocks:
            _, _, inverse = self._tensors(blk.layer, features.dtype, features.device)
            if blk.layer in self.diagonal or self.basis[blk.layer] == "eigen":
                rotated = features[:, blk.start : blk.stop]
            else:
                rotated = self._rotated(features, blk).flatten(1)
            total += rotated.square() @ inverse.flatten()
        return total

    # ------------------------------------------------------------------------------ save / load

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything the fit computed: tensors (name -> tensor) and JSON-able metadata."""
        tensors, layers, diagonal = {}, {}, {}
        for name, f in self.factors.items():
            for field in (
                "activation", "gradient", "activation_basis", "gradient_basis", "eigenvalues"
            ):  # fmt: skip
                tensors[f"kronecker/{name}/{field}"] = getattr(f, field)
            layers[name] = {
                "weight": f.weight_name,
                "bias": f.bias_name,
                "count": f.count,
                "tokens": self.tokens.get(name, 1),
            }
        for name, f in self.diagonal.items():
            tensors[f"diagonal/{name}/diagonal"] = f.diagonal
            diagonal[name] = {"names": list(f.names), "numels": list(f.numels), "count": f.count}
        meta = {
            "eigen_corrected": self.eigen_corrected,
            "options": {**asdict(self.options), "params": _listed(self.options.params)},
            "fisher": self.diagnostics["fisher"],
            "kronecker": layers,
            "diagonal": diagonal,
        }
        return tensors, meta

    @classmethod
    def from_state(
        cls, model: nn.Module, loss_fn: LossFn, tensors: dict, meta: dict
    ) -> KFACEstimator:
        """The estimator of a saved fit, without refitting (see :meth:`state`)."""
        options = dict(meta["options"])
        if options.get("params") is not None:
            options["params"] = tuple(options["params"])
        factors = {}
        for name, layer in meta["kronecker"].items():
            get = lambda field, name=name: tensors[f"kronecker/{name}/{field}"]  # noqa: E731
            factors[name] = KroneckerFactors(
                layer["weight"],
                layer["bias"],
                get("activation"),
                get("gradient"),
                layer["count"],
                get("activation_basis"),
                get("gradient_basis"),
                get("eigenvalues"),
            )
        diagonal = {
            name: DiagonalFactors(
                tuple(block["names"]),
                tuple(block["numels"]),
                tensors[f"diagonal/{name}/diagonal"],
                block["count"],
            )
            for name, block in meta["diagonal"].items()
        }
        state = {
            "factors": factors,
            "diagonal": diagonal,
            "tokens": {name: layer["tokens"] for name, layer in meta["kronecker"].items()},
            "fisher": meta["fisher"],
        }
        return cls(
            model,
            loss_fn,
            None,
            KFACOptions(**options),
            eigen_corrected=meta["eigen_corrected"],
            _state=state,
        )


def _row_major_bases(factors) -> None:
    """Hold the eigenbases row-major, as a saved file does. eigh returns them column-major, and
    products with the two layouts round differently: a reloaded fit would score 1 ulp apart."""
    for f in factors.values():
        f.activation_basis = f.activation_basis.contiguous()
        f.gradient_basis = f.gradient_basis.contiguous()


def _listed(params):
    return None if params is None else list(params)


def _ranks(split: bool):
    """(rank, world size, all-reduce sum) for ``split_ranks``; one process when not split."""
    if not split:
        return 0, 1, None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0, 1, None
    return dist.get_rank(), dist.get_world_size(), dist.all_reduce
