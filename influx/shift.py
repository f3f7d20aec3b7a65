"""Model shift: how much of the poisoning shift an unlearning update removes, and in which geometry.

With ``reference`` the clean model (the retrain oracle), ``poisoned`` the model trained with the
poisons and ``unlearned`` the model after unlearning, all as parameter vectors:

- poisoning shift ``d_p = poisoned - reference``; unlearning update ``d_u = unlearned - poisoned``;
- removed fraction ``<d_u, -d_p> / ||d_p||^2`` (1 = the update undoes the shift along it, 0 = no
  progress, < 0 = it adds to the shift); ``cosine`` between ``d_u`` and ``-d_p``;
- orthogonal norm ``||d_u - c d_p||`` with ``c = <d_u, d_p> / ||d_p||^2`` (the part of the update
  that does nothing about the shift); remaining distance ``||unlearned - reference|| =
  ||d_p + d_u||``.

Every inner product can be taken in a metric ``<a, b>_M = a^T M b``: the identity (Euclidean,
:func:`decompose` default) or the Fisher of the model's predictive distribution (:func:`fisher`),
``F = E_x[J^T (diag(p) - p p^T) J]`` at the reference model, which is the generalized Gauss-Newton
of softmax cross-entropy. ``0.5 d^T F d`` is the second-order expansion of the mean
``KL(p_reference(.|x) || p_{reference+d}(.|x))`` over the probe inputs: the information in nats that
poisoning added (``kl_poison``), that remains after unlearning (``kl_remaining``) and that the
update moved (``kl_update``). :func:`analyze` reports it next to the exact mean KL of the
predictions on probe sets, so one sees where the quadratic picture holds.

Fisher products: ``"exact"`` is matrix-free (``influx.curvature.ggn_vp`` with cross-entropy, two
products per decomposition, any model size, cost ~4 backward passes per probe example);
``"kfac"`` / ``"ekfac"`` use Kronecker factors with labels sampled from the model (the true
Fisher), block-diagonal over Linear / Conv layers of one group, fitted by
``influx.curvature.fit_sampled_kronecker_factors``, the rule of the influence estimators' K-FAC:
``fisher_draws("auto")`` labels per probe example (several only while a pass is cheap: small
probes of small models; one otherwise), fresh draws for the EK-FAC eigenvalue refit. Parameters of other layers (normalization affine,
embeddings, grouped convolutions) are left out of the Fisher quantities and listed in
``Decomposition.excluded``. Both are the true Fisher, with labels drawn from the model, not the
empirical Fisher of the observed labels: ``"exact"`` takes the expectation over labels in closed
form (hence equals the GGN), K-FAC samples it. The probe streams batch by batch
(``influx.data.iter_batches``) in every pass, as do the predictions of :func:`predictive_kl`,
:func:`predictive_entropy` and :func:`analyze`.

Refused: a zero poisoning shift (poisoned equals reference: every ratio would be 0 / 0) and NaN /
inf parameters in any of the three states.

States and modes. Predictions (:func:`predictive_kl`, :func:`predictive_entropy`, the KL and
entropies of :func:`analyze`) and the Fisher at ``at`` evaluate ``model`` holding the state's own
parameters, frozen ones included, and its own buffers (BatchNorm running statistics), in eval
mode: dropout off, BatchNorm on its running statistics. A state dict may omit frozen parameters
and buffers and a flat vector (over all of ``named_parameters()`` or over the trainable ones)
holds parameters only; those come from ``model``. ``model`` itself is left as it was: its
modules' modes are restored and its buffers are not touched. Which parameters count: the
Euclidean quantities of :func:`analyze` (and of :func:`decompose` on models) run over every
parameter, frozen ones included; the Fisher quantities run over the trainable ones (the
coordinates of F), so a shift of a frozen layer changes the predictions and their exact KL but
not ``kl_poison``.

Per layer (``Decomposition.per_layer``, when the inputs are models or state dicts):
``poison_sq``, ``update_sq``, ``inner`` (= <d_u, -d_p>), ``remaining_sq``, ``orthogonal_sq`` (the
layer's slice of the *global* orthogonal part) and ``removed_share`` (``inner / ||d_p||^2``) are
*additive*: they sum over layers to the totals (squared norms, inner products, removed fraction).
The layer's own ``removed_fraction`` and ``cosine`` are not additive. With the exact Fisher, which
couples layers, a layer's part of ``<a, b>_F`` is ``0.5 (a_l . (F b)_l + b_l . (F a)_l)``: additive,
but it can be negative.

Trajectories (:func:`trajectory`): the same at each checkpoint of an unlearning run, from an
``influx.unlearn.UnlearnResult`` (its trajectory states) or a list of models / state dicts / flat
vectors.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from influx.checks import check_choice
from influx.curvature import (
    KroneckerFactors,
    ParamSpace,
    fit_sampled_kronecker_factors,
    ggn_vp,
)
from influx.data import first_batch, iter_batches, num_examples
from influx.errors import InfluxValueError
from influx.grads.common import fixed_state
from influx.train import cross_entropy_per_example

__all__ = [
    "Decomposition",
    "FisherMetric",
    "LayerShift",
    "ShiftReport",
    "ShiftTrajectory",
    "analyze",
    "decompose",
    "fisher",
    "predictive_entropy",
    "predictive_kl",
    "trajectory",
]

State = nn.Module | Mapping[str, torch.Tensor] | torch.Tensor


# --------------------------------------------------------------------------------------------------
# States as named flat pieces
# --------------------------------------------------------------------------------------------------


def _names_of(states: Sequence[State], params: Iterable[str] | None) -> list[str] | None:
    """Parameter names shared by the states (None when all are flat vectors)."""
    if params is not None:
        return list(params)
    for s in states:
        if isinstance(s, nn.Module):
            return [n for n, _ in s.named_parameters()]
    for s in states:
        if isinstance(s, Mapping):
            return [k for k, v in s.items() if torch.is_tensor(v) and v.is_floating_point()]
    return None


def _pieces(state: State, names: list[str] | None, sizes: list[int] | None) -> list[torch.Tensor]:
    """The state as flat float64 pieces, one per name (one piece for a flat vector)."""
    if isinstance(state, nn.Module):
        state = dict(state.named_parameters())
    if torch.is_tensor(state):
        if state.dim() != 1:
            raise InfluxValueError(
                f"a flat parameter vector must be 1-D; got shape {tuple(state.shape)}"
            )
        flat = state.detach().to(torch.float64)
        if names is None:
            return [flat]
        if flat.numel() != sum(sizes):
            raise InfluxValueError(
                f"flat vector has {flat.numel()} entries; the parameters {names[:3]}... have "
                f"{sum(sizes)}: pass vectors in named_parameters() order"
            )
        return list(torch.split(flat, sizes))
    if isinstance(state, Mapping):
        missing = [n for n in names if n not in state]
        if missing:
            raise InfluxValueError(
                f"state dict lacks parameters {missing[:5]}: all states must share the reference's "
                "parameter names (or pass params=)"
            )
        return [state[n].detach().reshape(-1).to(torch.float64) for n in names]
    raise InfluxValueError(
        f"a state must be an nn.Module, a state dict or a flat tensor; got {type(state).__name__}"
    )


def _as_pieces(
    states: Sequence[State], params=None, space: ParamSpace | None = None
) -> tuple[list[str] | None, list[list]]:
    """Named flat pieces of each state; ``space`` (a model's parameters) fixes names and sizes."""
    names = list(space.names) if space is not None else _names_of(states, params)
    sizes = list(space.numels) if space is not None else None
    if names is not None and sizes is None:
        first = next((s for s in states if not torch.is_tensor(s)), None)
        first = dict(first.named_parameters()) if isinstance(first, nn.Module) else first
        sizes = [first[n].numel() for n in names]
    pieces = [_pieces(s, names, sizes) for s in states]
    device = pieces[0][0].device
    pieces = [[p.to(device) for p in ps] for ps in pieces]
    for ps in pieces[1:]:
        shapes = [p.shape for p in ps]
        if shapes != [p.shape for p in pieces[0]]:
            raise InfluxValueError(
                "the states have different parameter shapes: they must be the same architecture"
            )
    return names, pieces


def _flat_state(model: nn.Module, vector: torch.Tensor) -> dict[str, torch.Tensor]:
    """A flat vector over all of ``model.named_parameters()``, or over its trainable ones."""
    everything = dict(model.named_parameters())
    trainable = {n: p for n, p in everything.items() if p.requires_grad}
    for names in (everything, trainable):
        sizes = [p.numel() for p in names.values()]
        if vector.dim() == 1 and vector.numel() == sum(sizes):
            pieces = torch.split(vector.detach(), sizes)
            return {n: v.view(p.shape) for (n, p), v in zip(names.items(), pieces)}
    raise InfluxValueError(
        f"a flat state must be 1-D with one entry per parameter, in named_parameters() order: "
        f"{sum(p.numel() for p in everything.values())} (all) or "
        f"{sum(p.numel() for p in trainable.values())} (trainable); got shape {tuple(vector.shape)}"
    )


def _full_state(model: nn.Module, state: State) -> dict[str, torch.Tensor]:
    """``state`` as the full state a functional call of ``model`` needs: its own parameters
    (frozen ones included) and buffers, and ``model``'s for the names it does not hold (a flat
    vector holds parameters only; a state dict may omit frozen parameters and buffers)."""
    template = fixed_state(model, ())
    if isinstance(state, nn.Module):
        own = fixed_state(state, ())
    elif isinstance(state, Mapping):
        own = {k: v for k, v in state.items() if k in template}
    elif torch.is_tensor(state):
        own = _flat_state(model, state)
    else:
        raise InfluxValueError(
            "a state must be an nn.Module, a state dict or a flat tensor; got "
            f"{type(state).__name__}"
        )
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in own]
    if missing:
        raise InfluxValueError(
            f"the state lacks parameters {missing[:5]}: every state must hold the model's "
            "trainable parameters under their named_parameters() names"
        )
    wrong = [n for n, v in own.items() if v.shape != template[n].shape]
    if wrong:
        raise InfluxValueError(
            f"the state's {wrong[:5]} differ in shape from the model's: the states must be the "
            "model's architecture"
        )
    return {n: own.get(n, t).detach() for n, t in template.items()}


def _same_state(model: nn.Module, a: State, b: State) -> bool:
    """Whether two states agree in every parameter (frozen ones too) and buffer."""
    full_a, full_b = _full_state(model, a), _full_state(model, b)
    return all(torch.equal(full_a[n], full_b[n].to(full_a[n].device)) for n in full_a)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode for the duration (dropout off, BatchNorm on its running statistics, which then
    stay as they are), each submodule's own mode restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _model_at(model: nn.Module, state: State) -> nn.Module:
    """A private eval-mode copy of ``model`` holding ``state``'s parameters and buffers."""
    full = _full_state(model, state)
    copied = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, tensor in fixed_state(copied, ()).items():
            tensor.copy_(full[name])
    return copied


# --------------------------------------------------------------------------------------------------
# The decomposition
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerShift:
    """One layer's parts (module docstring: which are additive over layers)."""

    poison_sq: float
    update_sq: float
    inner: float
    remaining_sq: float
    orthogonal_sq: float
    removed_share: float
    removed_fraction: float
    cosine: float


@dataclass(frozen=True)
class Decomposition:
    """Poisoning shift vs unlearning update in one metric (``"euclidean"`` or ``"fisher-..."``).

    ``kl_*`` (Fisher metrics only): ``0.5 ||d||_F^2`` in nats for d = d_p (poison), d_u (update)
    and d_p + d_u (remaining).
    """

    metric: str
    poison_norm: float
    update_norm: float
    removed_fraction: float
    cosine: float
    orthogonal_norm: float
    remaining_distance: float
    per_layer: dict[str, LayerShift] | None = field(default=None, repr=False)
    kl_poison: float | None = None
    kl_update: float | None = None
    kl_remaining: float | None = None
    excluded: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        out = {
            k: getattr(self, k)
            for k in (
                "metric", "poison_norm", "update_norm", "removed_fraction", "cosine",
                "orthogonal_norm", "remaining_distance", "kl_poison", "kl_update", "kl_remaining",
            )
        }  # fmt: skip
        if self.per_layer is not None:
            out["per_layer"] = {n: vars(layer) for n, layer in self.per_layer.items()}
        if self.excluded:
            out["excluded"] = list(self.excluded)
        return out


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def _decompose_pieces(
    names: list[str] | None,
    poison: list[torch.Tensor],
    update: list[torch.Tensor],
    metric_poison: list[torch.Tensor],
    metric_update: list[torch.Tensor],
    metric: str,
    excluded: tuple[str, ...] = (),
) -> Decomposition:
    """All quantities from d_p, d_u and their metric images M d_p, M d_u (lists of pieces)."""

    def part(a, ma, b, mb):
        # The layer's symmetric share of <a, b>_M (the exact share for block-diagonal M).
        return 0.5 * (float(a @ mb) + float(b @ ma))

    pp = [part(p, mp, p, mp) for p, mp in zip(poison, metric_poison)]
    uu = [part(u, mu, u, mu) for u, mu in zip(update, metric_update)]
    pu = [part(p, mp, u, mu) for p, mp, u, mu in zip(poison, metric_poison, update, metric_update)]
    total_pp, total_uu, total_pu = sum(pp), sum(uu), sum(pu)
    c = _ratio(total_pu, total_pp) if total_pp > 0 else 0.0
    # The orthogonal part r = d_u - c d_p and the remainder d_p + d_u, formed explicitly so that
    # their norms carry no cancellation (|| . ||^2 = uu - pu^2 / pp would lose half the digits).
    orth = [part(u - c * p, mu - c * mp, u - c * p, mu - c * mp)
            for p, mp, u, mu in zip(poison, metric_poison, update, metric_update)]  # fmt: skip
    remaining = [part(p + u, mp + mu, p + u, mp + mu)
                 for p, mp, u, mu in zip(poison, metric_poison, update, metric_update)]  # fmt: skip
    sqrt = lambda v: math.sqrt(max(v, 0.0))
    per_layer = None
    if names is not None:
        per_layer = {
            name: LayerShift(
                poison_sq=pp[i],
                update_sq=uu[i],
                inner=-pu[i],
                remaining_sq=remaining[i],
                orthogonal_sq=orth[i],
                removed_share=_ratio(-pu[i], total_pp),
                removed_fraction=_ratio(-pu[i], pp[i]),
                cosine=_ratio(-pu[i], sqrt(pp[i]) * sqrt(uu[i])),
            )
            for i, name in enumerate(names)
        }
    fisher_metric = metric != "euclidean"
    return Decomposition(
        metric=metric,
        poison_norm=sqrt(total_pp),
        update_norm=sqrt(total_uu),
        removed_fraction=_ratio(-total_pu, total_pp),
        cosine=_ratio(-total_pu, sqrt(total_pp) * sqrt(total_uu)),
        orthogonal_norm=sqrt(sum(orth)),
        remaining_distance=sqrt(sum(remaining)),
        per_layer=per_layer,
        kl_poison=0.5 * total_pp if fisher_metric else None,
        kl_update=0.5 * total_uu if fisher_metric else None,
        kl_remaining=0.5 * sum(remaining) if fisher_metric else None,
        excluded=excluded,
    )


def _check_finite_states(names: list[str] | None, states) -> None:
    """Refuse NaN / inf parameters (every quantity would be NaN), naming the state and parameter."""
    for role, pieces in zip(_MODELS, states):
        for i, piece in enumerate(pieces):
            if not bool(torch.isfinite(piece).all()):
                where = f" ({names[i]})" if names is not None else ""
                raise InfluxValueError(
                    f"shift.decompose: the {role} parameters hold NaN or inf{where}; pass a model "
                    "whose parameters are finite (a diverged training run cannot be decomposed)"
                )


def _refuse_a_zero_shift() -> None:
    """A zero poisoning shift leaves every ratio 0 / 0: refused instead of returning NaN."""
    raise InfluxValueError(
        "shift.decompose: the poisoning shift is zero (poisoned equals reference), so there is "
        "nothing to remove; pass the model trained with the poisons as poisoned="
    )


def decompose(
    reference: State,
    poisoned: State,
    unlearned: State,
    *,
    metric: FisherMetric | None = None,
    params: Iterable[str] | None = None,
) -> Decomposition:
    """Decompose the unlearning update against the poisoning shift (module docstring).

    ``reference``, ``poisoned``, ``unlearned``: models, state dicts or flat parameter vectors
    (mixed is fine; flat vectors are in ``named_parameters()`` order). ``metric``: None for the
    Euclidean geometry, or a :class:`FisherMetric` from :func:`fisher`. ``params`` restricts the
    parameters (default: the parameters of the first model, or the floating-point entries of the
    first state dict). ``per_layer`` is set unless all three are flat vectors.
    """
    if metric is not None:
        return metric.decompose(reference, poisoned, unlearned)
    names, (ref, poi, unl) = _as_pieces([reference, poisoned, unlearned], params)
    _check_finite_states(names, (ref, poi, unl))
    poison = [p - r for p, r in zip(poi, ref)]
    if not any(bool(piece.any()) for piece in poison):
        _refuse_a_zero_shift()
    update = [u - p for u, p in zip(unl, poi)]
    return _decompose_pieces(names, poison, update, poison, update, "euclidean")


# --------------------------------------------------------------------------------------------------
# Fisher metric
# --------------------------------------------------------------------------------------------------


def _layer_matrix(factor: KroneckerFactors, named: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A layer's weight (and bias) as [d_out, d_in(+1)], the layout of its K-FAC factors: a Conv
    weight [out, in, kh, kw] flattens like its unfolded patches, the bias is the last column."""
    weight = named[factor.weight_name]
    matrix = weight.reshape(weight.shape[0], -1)
    if factor.bias_name:
        matrix = torch.cat([matrix, named[factor.bias_name].reshape(-1, 1)], dim=1)
    return matrix


class FisherMetric:
    """The Fisher of a classifier's predictive distribution at one state, as a metric on shifts.

    Build it with :func:`fisher`. ``apply(vector [P]) -> F vector`` over the trainable
    parameters in ``self.names`` (flat, ``named_parameters()`` order). ``at_model`` is a private
    eval-mode copy of the model holding all of ``at``'s state; the products are taken there.
    """

    def __init__(
        self,
        model: nn.Module,
        at: State,
        probe,
        *,
        curvature: str = "exact",
        batch_size: int = 256,
        seed: int = 0,
    ):
        check_choice("curvature", curvature, ("exact", "kfac", "ekfac"))
        if not isinstance(model, nn.Module):
            raise InfluxValueError("fisher needs the model (architecture) as an nn.Module")
        self.model, self.curvature, self.batch_size = model, curvature, batch_size
        # The probe streams batch by batch (``influx.data.iter_batches``) on every pass.
        _, targets, _ = first_batch(probe, batch_size)
        if targets.is_floating_point() or targets.dim() != 1:
            raise InfluxValueError(
                "the Fisher of a categorical predictive distribution needs integer class targets "
                f"[N] in the probe data; got {targets.dtype} of shape {tuple(targets.shape)}"
            )
        self.probe, self.examples = probe, num_examples(probe)
        self.space = ParamSpace.of(model)
        self.names = list(self.space.names)
        # The Fisher at ``at``: a private eval-mode copy holds all of its state (frozen parameters
        # and buffers included), so neither the template's values nor its mode leak in.
        self.at_model = _model_at(model, at)
        self.theta = self.space.current(self.at_model).to(torch.float64)
        self.excluded: tuple[str, ...] = ()
        if curvature != "exact":
            self._fit_kronecker(seed)

    # -- K-FAC / EK-FAC --------------------------------------------------------------------------

    def _fit_kronecker(self, seed: int) -> None:
        # The one fitter of sampled-Fisher factors (influx.curvature.factors): labels drawn from
        # the model as influx.influence's K-FAC draws them, fresh ones for the EK-FAC refit.
        self.factors: dict[str, KroneckerFactors] = fit_sampled_kronecker_factors(
            self.at_model,
            cross_entropy_per_example,
            self.probe,
            batch_size=self.batch_size,
            seed=seed,
            eigen_corrected=self.curvature == "ekfac",
        )
        covered = set()
        for f in self.factors.values():
            covered |= {f.weight_name} | ({f.bias_name} if f.bias_name else set())
        self.excluded = tuple(n for n in self.names if n not in covered)
        if self.excluded:
            warnings.warn(
                f"K-FAC covers Linear/Conv layers only: parameters {list(self.excluded)[:5]} are "
                "left out of the Fisher quantities; use curvature='exact' to include them",
                stacklevel=4,  # the user's call of fisher()
            )

    def _apply_kronecker(self, vector: torch.Tensor) -> torch.Tensor:
        named = self.space.unflatten(vector)
        out = {n: torch.zeros_like(v) for n, v in named.items()}
        for f in self.factors.values():
            matrix = _layer_matrix(f, named).to(f.activation.dtype)
            product = f.unrotate(f.rotate(matrix) * f.eigenvalues).to(vector.dtype)
            if f.bias_name:
                out[f.bias_name] = product[:, -1].reshape(named[f.bias_name].shape)
                product = product[:, :-1]
            out[f.weight_name] = product.reshape(named[f.weight_name].shape)
        return self.space.flatten(out)

    # -- products --------------------------------------------------------------------------------

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        """F v for v [P] or [K, P] (float64)."""
        vectors = vectors.to(torch.float64)
        if self.curvature != "exact":
            if vectors.dim() == 1:
                return self._apply_kronecker(vectors)
            return torch.stack([self._apply_kronecker(v) for v in vectors])
        n = self.examples
        total = torch.zeros_like(vectors)
        for x, y, *_ in iter_batches(self.probe, self.batch_size):
            # F of the mean over the probe set = size-weighted mean of the batch means.
            theta = self.theta.to(x.dtype)
            product = ggn_vp(self.at_model, cross_entropy_per_example, (x, y), vectors.to(x.dtype),
                             theta=theta)  # fmt: skip
            total += product.to(torch.float64) * (x.shape[0] / n)
        return total

    def decompose(self, reference: State, poisoned: State, unlearned: State) -> Decomposition:
        _, pieces = _as_pieces([reference, poisoned, unlearned], space=self.space)
        _check_finite_states(self.names, pieces)
        ref, poi, unl = (torch.cat(p).to(self.theta.device) for p in pieces)
        poison, update = poi - ref, unl - poi
        # A shift of frozen parameters or buffers alone is no shift in F's coordinates but moves
        # the predictions (kl_poison = 0 is the answer); identical states are refused.
        if not bool(poison.any()) and _same_state(self.model, reference, poisoned):
            _refuse_a_zero_shift()
        keep = torch.ones_like(poison)
        if self.excluded:
            for name, piece in self.space.unflatten(keep).items():
                if name in self.excluded:
                    piece.zero_()
        poison, update = poison * keep, update * keep
        metric_poison, metric_update = self.apply(torch.stack([poison, update]))
        split = lambda v: list(torch.split(v, list(self.space.numels)))
        return _decompose_pieces(
            self.names, split(poison), split(update), split(metric_poison), split(metric_update),
            f"fisher-{self.curvature}", self.excluded,
        )  # fmt: skip


def fisher(
    model: nn.Module,
    at: State,
    probe,
    *,
    curvature: str = "exact",
    batch_size: int = 256,
    seed: int = 0,
) -> FisherMetric:
    """The Fisher of ``model``'s predictive distribution at the parameters ``at`` over ``probe``.

    ``F = (1/N) sum_x J_x^T (diag(p_x) - p_x p_x^T) J_x`` (the GGN of softmax cross-entropy; the
    probe's labels are not used except by K-FAC's shape checks). ``curvature``: ``"exact"``
    (matrix-free products), ``"kfac"`` or ``"ekfac"`` (Kronecker factors from labels sampled with
    ``seed``). ``at`` is normally the reference (clean) model, so that ``0.5 d^T F d`` approximates
    ``KL(p_reference || p_{reference + d})``; its frozen parameters and buffers are used with its
    trainable ones, in eval mode (module docstring).
    """
    return FisherMetric(model, at, probe, curvature=curvature, batch_size=batch_size, seed=seed)


# --------------------------------------------------------------------------------------------------
# Predictions: exact KL and entropy
# --------------------------------------------------------------------------------------------------


def _per_example(model: nn.Module, states: Mapping[str, State], data, batch_size: int, of):
    """``of(log_probs)`` [B] per batch, concatenated to [N], where ``log_probs`` maps each state's
    name to the eval-mode log-probabilities [B, C] of ``model`` holding all of that state (frozen
    parameters and buffers included). ``data`` streams batch by batch; ``model`` itself is left
    as it was, mode and buffers alike. Row by row, so the values do not depend on the batching."""
    fulls, rows = None, []
    with torch.no_grad(), _eval_mode(model):
        for inputs, *_ in iter_batches(data, batch_size):
            if fulls is None:
                fulls = {
                    key: {
                        name: t.to(device=inputs.device, dtype=_dtype_for(t, inputs))
                        for name, t in _full_state(model, state).items()
                    }
                    for key, state in states.items()
                }
            log_probs = {
                key: torch.log_softmax(
                    torch.func.functional_call(model, full, (inputs,)).to(torch.float64), dim=-1
                )
                for key, full in fulls.items()
            }
            rows.append(of(log_probs))
    if not rows:
        raise InfluxValueError("the probe data is empty: pass at least one example")
    return torch.cat(rows)


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _entropy_rows(log_p: torch.Tensor) -> torch.Tensor:
    return -(log_p.exp() * log_p).sum(-1)


def _dtype_for(tensor: torch.Tensor, inputs: torch.Tensor) -> torch.dtype:
    # Floating state in the inputs' precision (a float64 state evaluates a float32 model's
    # inputs); integer buffers, and the state of a model taking token ids, keep their dtype.
    if tensor.is_floating_point() and inputs.is_floating_point():
        return inputs.dtype
    return tensor.dtype


def predictive_kl(model: nn.Module, p: State, q: State, data, *, batch_size: int = 512) -> float:
    """Mean over the inputs of ``KL(p(.|x) || q(.|x))`` in nats (``model`` gives the architecture)."""
    rows = _per_example(model, {"p": p, "q": q}, data, batch_size,
                        lambda logs: _kl_rows(logs["p"], logs["q"]))  # fmt: skip
    return float(rows.mean())


def predictive_entropy(model: nn.Module, state: State, data, *, batch_size: int = 512) -> float:
    """Mean over the inputs of the entropy ``-sum_c p_c log p_c`` of the predictions, in nats."""
    rows = _per_example(
        model, {"p": state}, data, batch_size, lambda logs: _entropy_rows(logs["p"])
    )
    return float(rows.mean())


# --------------------------------------------------------------------------------------------------
# Reports and trajectories
# --------------------------------------------------------------------------------------------------

_MODELS = ("reference", "poisoned", "unlearned")
_PAIRS = {
    "reference||poisoned": ("reference", "poisoned"),
    "reference||unlearned": ("reference", "unlearned"),
    "poisoned||unlearned": ("poisoned", "unlearned"),
}


@dataclass(frozen=True)
class ShiftReport:
    """Euclidean and Fisher decompositions, exact KL and predictive entropy on each probe set.

    ``kl[probe][pair]``: mean exact KL in nats, pairs ``"reference||poisoned"``,
    ``"reference||unlearned"``, ``"poisoned||unlearned"``; ``entropy[probe][model]``: mean
    predictive entropy of ``"reference"``, ``"poisoned"``, ``"unlearned"``, with
    ``entropy_change[probe]`` = unlearned - poisoned and ``poison_entropy_change[probe]`` =
    poisoned - reference.
    """

    euclidean: Decomposition
    fisher: Decomposition | None
    kl: dict[str, dict[str, float]]
    entropy: dict[str, dict[str, float]]

    @property
    def entropy_change(self) -> dict[str, float]:
        return {p: e["unlearned"] - e["poisoned"] for p, e in self.entropy.items()}

    @property
    def poison_entropy_change(self) -> dict[str, float]:
        return {p: e["poisoned"] - e["reference"] for p, e in self.entropy.items()}

    def as_dict(self) -> dict:
        return {
            "euclidean": self.euclidean.as_dict(),
            "fisher": None if self.fisher is None else self.fisher.as_dict(),
            "kl": self.kl,
            "entropy": self.entropy,
            "entropy_change": self.entropy_change,
            "poison_entropy_change": self.poison_entropy_change,
        }


def analyze(
    model: nn.Module,
    reference: State,
    poisoned: State,
    unlearned: State,
    probes: Mapping[str, object] | None = None,
    *,
    metric: FisherMetric | None = None,
    batch_size: int = 512,
) -> ShiftReport:
    """Everything at once: :func:`decompose` (Euclidean, and Fisher when ``metric`` is given), and
    on each probe set (e.g. ``{"train": ..., "forget": ..., "retain": ..., "test": ...}``) the
    exact mean KL between the three models' predictions and their predictive entropies."""
    states = dict(zip(_MODELS, (reference, poisoned, unlearned)))
    kl, entropy = {}, {}
    columns = [*_PAIRS, *_MODELS]  # a KL per pair, then an entropy per model

    def rows(logs):
        kls = [_kl_rows(logs[a], logs[b]) for a, b in _PAIRS.values()]
        return torch.stack([*kls, *(_entropy_rows(logs[m]) for m in _MODELS)], dim=1)

    for probe, data in (probes or {}).items():
        table = _per_example(model, states, data, batch_size, rows)
        # Each column's mean over a contiguous copy: the same sums as a [N] tensor's.
        means = {c: float(table[:, k].contiguous().mean()) for k, c in enumerate(columns)}
        kl[probe] = {pair: means[pair] for pair in _PAIRS}
        entropy[probe] = {m: means[m] for m in _MODELS}
    return ShiftReport(
        euclidean=decompose(
            reference, poisoned, unlearned, params=[n for n, _ in model.named_parameters()]
        ),
        fisher=None if metric is None else metric.decompose(reference, poisoned, unlearned),
        kl=kl,
        entropy=entropy,
    )


@dataclass(frozen=True)
class ShiftTrajectory:
    """One :class:`ShiftReport` per checkpoint; ``series("fisher.kl_remaining")`` etc. give arrays."""

    steps: list[int]
    reports: list[ShiftReport]

    def series(self, key: str) -> list[float | None]:
        """A dotted path into each report's ``as_dict()``, e.g. ``"euclidean.cosine"``,
        ``"kl.forget.reference||unlearned"``, ``"entropy.test.unlearned"``."""
        values = []
        for report in self.reports:
            node = report.as_dict()
            for part in _split_key(key):
                node = None if node is None else node.get(part)
            values.append(node)
        return values

    def as_dict(self) -> dict:
        return {"steps": self.steps, "reports": [r.as_dict() for r in self.reports]}


def _split_key(key: str) -> list[str]:
    # KL pair names contain no dots; split on dots only.
    return key.split(".")


def _checkpoints(checkpoints) -> tuple[list[int], list[State]]:
    """(steps, states) from an UnlearnResult-like object (``.trajectory`` of points with ``.step``
    and ``.state_dict``) or a sequence of states."""
    points = getattr(checkpoints, "trajectory", None)
    if points is not None:
        kept = [p for p in points if getattr(p, "state_dict", None) is not None]
        if not kept:
            raise InfluxValueError(
                "the unlearning result kept no states: run the method with record_every=k and "
                "keep_states=True"
            )
        return [int(p.step) for p in kept], [p.state_dict for p in kept]
    states = list(checkpoints)
    if not states:
        raise InfluxValueError("checkpoints is empty: pass at least one state")
    return list(range(len(states))), states


def trajectory(
    model: nn.Module,
    reference: State,
    poisoned: State,
    checkpoints,
    probes: Mapping[str, object] | None = None,
    *,
    metric: FisherMetric | None = None,
    batch_size: int = 512,
) -> ShiftTrajectory:
    """:func:`analyze` at every checkpoint of an unlearning run (each checkpoint as ``unlearned``).

    ``checkpoints``: an ``influx.unlearn.UnlearnResult`` run with ``record_every`` (its kept
    states; ``steps`` are its step numbers) or a list of models / state dicts / flat vectors
    (``steps`` 0, 1, ...). The Fisher metric is fitted once (at the reference) and reused.
    """
    steps, states = _checkpoints(checkpoints)
    reports = [
        analyze(model, reference, poisoned, s, probes, metric=metric, batch_size=batch_size)
        for s in states
    ]
    return ShiftTrajectory(steps, reports)
