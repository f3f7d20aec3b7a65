"""Membership inference: signals, ROC statistics and LiRA against direct evaluations."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn
from utils import IndexedDataset

from influx.audit.mia import (
    GLOBAL_VARIANCE_BELOW,
    _gaussian_fit,
    confidence_from_logits,
    ensemble_confidence,
    lira,
    lira_scores,
    logit_confidence,
    loss_attack,
    loss_attack_from_model,
    membership_metrics,
    per_example_losses,
    shadow_masks,
)
from influx.data import as_tensors, load
from influx.ensembles import fit_weighted
from influx.errors import InfluxValueError
from influx.models import mlp
from influx.train import cross_entropy_per_example

# ------------------------------------------------------------------------------------------
# Signals
# ------------------------------------------------------------------------------------------


def test_confidence_matches_its_definition():
    logits = torch.randn(50, 7, dtype=torch.float64) * 3
    targets = torch.randint(0, 7, (50,))
    p = torch.softmax(logits, dim=1)[torch.arange(50), targets]
    # Moderate logits: the naive float64 formula is accurate to ~1e-15 relative here.
    expected = torch.log(p) - torch.log1p(-p)
    torch.testing.assert_close(
        confidence_from_logits(logits, targets), expected, rtol=1e-12, atol=1e-12
    )
    # A leading model dimension [K, B, C] with targets [B].
    stacked = torch.stack([logits, 2 * logits])
    assert torch.allclose(confidence_from_logits(stacked, targets)[1],
                          confidence_from_logits(2 * logits, targets))  # fmt: skip


def test_confidence_stays_finite_at_the_extremes():
    # p_y = 1 - 2e^-100 and p_y = e^-100 / (1 + e^-100 ...): the naive formula gives inf / -inf.
    logits = torch.tensor([[100.0, 0.0, 0.0], [0.0, 100.0, 0.0]])
    targets = torch.tensor([0, 0])
    got = confidence_from_logits(logits, targets)
    # z_y - log sum_{j != y} exp z_j exactly: 100 - log 2, and 0 - log(e^100 + 1).
    expected = torch.tensor([100.0 - math.log(2.0), -(100.0 + math.log1p(math.exp(-100.0)))])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    with pytest.raises(InfluxValueError, match="C >= 2"):
        confidence_from_logits(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))


def test_confidence_takes_whole_class_indices_one_per_row():
    logits = torch.randn(4, 3, dtype=torch.float64)
    whole = torch.tensor([0, 2, 1, 2])
    # Float labels holding whole numbers are the same classes.
    assert torch.equal(
        confidence_from_logits(logits, whole.double()), confidence_from_logits(logits, whole)
    )
    # A cast to int64 would have read 1.7 as class 1.
    with pytest.raises(InfluxValueError, match=r"whole class indices; positions \[1\]"):
        confidence_from_logits(logits, torch.tensor([0.0, 1.7, 1.0, 2.0]))
    with pytest.raises(InfluxValueError, match=r"class indices \[B\] = \[4\].*got \(3,\)"):
        confidence_from_logits(logits, whole[:3])
    with pytest.raises(InfluxValueError, match=r"got \(4, 1\)"):
        confidence_from_logits(logits, whole[:, None])
    with pytest.raises(InfluxValueError, match=r"lie in \[0, 3\)"):
        confidence_from_logits(logits, torch.tensor([0, 3, 1, 2]))


def test_logit_confidence_of_a_model_follows_the_data_and_eval_mode():
    model = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 4)).double()
    model.train()
    inputs = torch.randn(23, 5, dtype=torch.float64)
    targets = torch.randint(0, 4, (23,))
    indices = torch.randperm(100)[:23]
    values, got_indices = logit_confidence(
        model, IndexedDataset(inputs, targets, indices), batch_size=4, return_indices=True
    )
    model.eval()
    expected = torch.stack([
        confidence_from_logits(model(inputs[i : i + 1]), targets[i : i + 1])[0] for i in range(23)
    ])  # fmt: skip
    torch.testing.assert_close(values, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(got_indices, indices)
    assert model.training is False  # we switched it; logit_confidence restores what it found
    model.train()
    logit_confidence(model, (inputs, targets))
    assert model.training
    losses = per_example_losses(model, cross_entropy_per_example, (inputs, targets), batch_size=5)
    model.eval()
    torch.testing.assert_close(
        losses, cross_entropy_per_example(model(inputs), targets), rtol=1e-12, atol=1e-12
    )


def test_logit_confidence_rejects_non_finite_outputs():
    model = nn.Linear(3, 2)
    inputs = torch.randn(6, 3)
    inputs[4, 0] = torch.nan
    with pytest.raises(InfluxValueError, match=r"dataset indices \[4\]"):
        logit_confidence(model, (inputs, torch.zeros(6, dtype=torch.long)))


def test_ensemble_confidence_matches_each_model():
    model = mlp(in_features=6, hidden=(8,), num_classes=3)
    inputs, targets = torch.randn(17, 6), torch.randint(0, 3, (17,))
    params = {n: torch.stack([p + 0.1 * k for k in range(4)]) for n, p in model.named_parameters()}
    got = ensemble_confidence(model, params, (inputs, targets), batch_size=5)
    for k in range(4):
        single = copy.deepcopy(model)
        single.load_state_dict({n: v[k] for n, v in params.items()})
        # float32, same operations batched differently: a few ulps.
        torch.testing.assert_close(got[k], logit_confidence(single, (inputs, targets)),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip


# ------------------------------------------------------------------------------------------
# ROC statistics
# ------------------------------------------------------------------------------------------


def direct_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(member score > non-member score) + P(equal) / 2 over all pairs."""
    members, others = scores[labels], scores[~labels]
    wins = sum((m > o) + 0.5 * (m == o) for m in members for o in others)
    return wins / (len(members) * len(others))


def direct_tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, target: float) -> float:
    """Best TPR over thresholds "member if score >= t" (t a score or +inf) with FPR <= target."""
    best = 0.0
    for t in [*np.unique(scores), np.inf]:
        predicted = scores >= t
        fpr = predicted[~labels].mean()
        if fpr <= target:
            best = max(best, predicted[labels].mean())
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_membership_metrics_match_their_definitions(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.4
    # Rounded scores: many ties within and across the two groups.
    scores = np.round(rng.normal(0.6 * labels, 1.0), 1)
    result = membership_metrics(scores, labels, fprs=(0.0, 0.01, 0.05, 0.3, 1.0))
    assert result.auc == pytest.approx(direct_auc(scores, labels), abs=1e-12)
    for target, rate in result.tpr_at_fpr.items():
        assert rate == direct_tpr_at_fpr(scores, labels, target), target
    assert result.tpr_at_fpr[1.0] == 1.0
    assert result.num_members == labels.sum()


def test_tpr_at_fpr_without_ties_reaches_the_exact_point():
    # Non-members 0..99, members 50.5..149.5. FPR <= 1/100 allows one non-member (99) above the
    # threshold: the lowest such threshold is the member score 98.5, with 52 members at or above
    # it. FPR <= 1/200 allows none: threshold 99.5, 51 members.
    nonmembers = np.arange(100.0)
    members = np.arange(100.0) + 50.5
    result = membership_metrics(
        np.concatenate([members, nonmembers]),
        np.r_[np.ones(100, bool), np.zeros(100, bool)],
        fprs=(0.01, 0.005),
    )
    assert result.tpr_at_fpr == {0.01: 0.52, 0.005: 0.51}


def test_loss_attack_scores_negated_losses():
    rng = np.random.default_rng(3)
    member_losses, nonmember_losses = rng.exponential(0.5, 80), rng.exponential(1.0, 120)
    result = loss_attack(member_losses, nonmember_losses)
    scores = -np.concatenate([member_losses, nonmember_losses])
    labels = np.r_[np.ones(80, bool), np.zeros(120, bool)]
    assert result.auc == pytest.approx(direct_auc(scores, labels), abs=1e-12)
    assert result.tpr_at_fpr[0.01] == direct_tpr_at_fpr(scores, labels, 0.01)

    model = nn.Linear(4, 3).double()
    members = (torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,)))
    nonmembers = (torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,)))
    from_model = loss_attack_from_model(model, cross_entropy_per_example, members, nonmembers)
    with torch.no_grad():
        direct = loss_attack(
            cross_entropy_per_example(model(members[0]), members[1]),
            cross_entropy_per_example(model(nonmembers[0]), nonmembers[1]),
        )
    assert from_model.auc == direct.auc and from_model.tpr_at_fpr == direct.tpr_at_fpr


def test_membership_metrics_errors():
    with pytest.raises(InfluxValueError, match="both members and non-members"):
        membership_metrics([0.1, 0.2], [True, True])
    with pytest.raises(InfluxValueError, match="same size"):
        membership_metrics([0.1, 0.2, 0.3], [True, False])
    with pytest.raises(InfluxValueError, match=r"NaN or inf at positions \[1\]"):
        membership_metrics([0.1, np.nan], [True, False])
    with pytest.raises(InfluxValueError, match="FPR must lie"):
        membership_metrics([0.1, 0.2], [True, False], fprs=(1.5,))


@pytest.mark.parametrize("labels", [[1, 2, 0], [0.5, 1.0, 0.0], [1.0, np.nan, 0.0], ["a", "b", ""]])
def test_membership_labels_must_be_bools_or_zero_one(labels):
    # As bools, 2 and 0.5 would count as members without a word.
    with pytest.raises(InfluxValueError, match="is_member must hold bools or 0 / 1"):
        membership_metrics([0.1, 0.2, 0.3], labels)


def test_membership_labels_as_zero_one_numbers_equal_bools():
    scores = [0.1, 0.4, 0.35, 0.8]
    as_bools = membership_metrics(scores, [False, True, False, True])
    for labels in ([0, 1, 0, 1], np.array([0.0, 1.0, 0.0, 1.0]), torch.tensor([0, 1, 0, 1])):
        assert membership_metrics(scores, labels).auc == as_bools.auc


# ------------------------------------------------------------------------------------------
# LiRA
# ------------------------------------------------------------------------------------------


def test_shadow_masks_put_each_example_in_half_the_shadows():
    masks = shadow_masks(10, 500, seed=4)
    assert masks.dtype == torch.bool and masks.shape == (10, 500)
    assert (masks.sum(0) == 5).all()
    assert torch.equal(masks, shadow_masks(10, 500, seed=4))
    assert not torch.equal(masks, shadow_masks(10, 500, seed=5))
    # Over examples each shadow is IN about half the time (binomial(500, 1/2): sd ~11).
    assert (masks.sum(1) - 250).abs().max() < 60
    assert (shadow_masks(7, 100, fraction=0.3).sum(0) == 2).all()
    with pytest.raises(InfluxValueError, match="no IN or no OUT"):
        shadow_masks(3, 10, fraction=0.2)


def direct_lira(target, shadows, mask, *, online, pooled):
    """Per example, Gaussians fitted with numpy and scored with scipy.stats.norm."""
    k, n = shadows.shape
    mu_in, mu_out = np.empty(n), np.empty(n)
    sd_in, sd_out = np.empty(n), np.empty(n)
    for i in range(n):
        ins, outs = shadows[mask[:, i], i], shadows[~mask[:, i], i]
        mu_in[i], mu_out[i] = ins.mean(), outs.mean()
        sd_in[i], sd_out[i] = ins.std(), outs.std()
    if pooled:
        deviations_in = [shadows[mask[:, i], i] - mu_in[i] for i in range(n)]
        deviations_out = [shadows[~mask[:, i], i] - mu_out[i] for i in range(n)]
        sd_in[:] = np.sqrt(np.mean(np.concatenate(deviations_in) ** 2))
        sd_out[:] = np.sqrt(np.mean(np.concatenate(deviations_out) ** 2))
    if not online:
        return (target - mu_out) / sd_out
    return norm.logpdf(target, mu_in, sd_in) - norm.logpdf(target, mu_out, sd_out)


@pytest.mark.parametrize("online", [True, False], ids=["online", "offline"])
@pytest.mark.parametrize("pooled", [True, False], ids=["global", "per-example"])
def test_lira_scores_match_scipy(online, pooled):
    rng = np.random.default_rng(5)
    k, n = 12, 40
    mask = rng.random((k, n)) < 0.5
    mask[:2] = True  # at least two IN and two OUT shadows per example
    mask[2:4] = False
    centres = rng.normal(0, 2, n)
    shadows = centres + 1.5 * mask + rng.normal(0, 1, (k, n)) * rng.uniform(0.5, 2, n)
    target = centres + rng.normal(0, 1.5, (3, n))
    got = lira_scores(target, shadows, mask, online=online, global_variance=pooled)
    expected = direct_lira(target, shadows, mask, online=online, pooled=pooled)
    # float64 throughout; the two sides sum in different orders: ~1e-15 relative.
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-10)
    one = lira_scores(torch.from_numpy(target[0]), torch.from_numpy(shadows), torch.from_numpy(mask),
                      online=online, global_variance=pooled)  # fmt: skip
    assert one.shape == (n,) and torch.allclose(one, got[0])


def test_lira_variance_auto_and_errors():
    rng = np.random.default_rng(6)
    for k in (GLOBAL_VARIANCE_BELOW - 2, GLOBAL_VARIANCE_BELOW):
        mask = shadow_masks(k, 10, seed=0).numpy()
        shadows = rng.normal(size=(k, 10))
        auto = lira_scores(shadows[0], shadows, mask)
        pooled = k < GLOBAL_VARIANCE_BELOW
        assert torch.equal(auto, lira_scores(shadows[0], shadows, mask, global_variance=pooled))
    shadows = rng.normal(size=(4, 3))
    mask = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=bool)
    with pytest.raises(InfluxValueError, match=r"positions \[1, 2\] have a single IN"):
        lira_scores(shadows[0], shadows, mask, global_variance=False)
    lira_scores(shadows[0], shadows, mask, global_variance=True)
    mask[:, 0] = True
    with pytest.raises(InfluxValueError, match=r"positions \[0\] have no OUT"):
        lira_scores(shadows[0], shadows, mask, global_variance=True)
    flat = shadows.copy()
    flat[:, 1] = 3.0
    with pytest.raises(InfluxValueError, match="zero variance"):
        lira_scores(flat[0], flat, np.array([[1, 1, 0], [1, 1, 1], [0, 0, 1], [0, 0, 0]], bool),
                    global_variance=False)  # fmt: skip
    with pytest.raises(InfluxValueError, match="bool"):
        lira_scores(shadows[0], shadows, mask.astype(int))
    with pytest.raises(InfluxValueError, match=r"\[N\] or \[T, N\]"):
        lira_scores(shadows[0, :2], shadows, mask)
    with pytest.raises(InfluxValueError, match="global_variance"):
        lira_scores(shadows[0], shadows, mask, global_variance="yes")


def test_lira_with_two_shadows_names_the_real_problem():
    # two shadows: each example has one IN and one OUT shadow, whose spread is 0 even pooled;
    # asking for global_variance=True again would not help
    rng = np.random.default_rng(3)
    mask = shadow_masks(2, 6, seed=0)
    shadows = rng.normal(size=(2, 6))
    for pooled in (True, "auto"):
        with pytest.raises(
            InfluxValueError, match="single OUT shadow.*at least 4 shadows"
        ) as error:
            lira_scores(shadows[0], shadows, mask, global_variance=pooled)
        assert "global_variance=True" not in str(error.value)
    with pytest.raises(InfluxValueError, match="pooled IN variance is 0.*at least 4"):
        _gaussian_fit(torch.as_tensor(shadows), mask, True, "IN")
    # shadows that agree exactly everywhere, pooled
    flat = np.ones((4, 3))
    with pytest.raises(InfluxValueError, match="agree exactly on every example"):
        lira_scores(flat[0], flat, shadow_masks(4, 3, seed=0), global_variance=True)


def test_out_of_range_labels_name_the_examples_by_dataset_index():
    model = nn.Linear(3, 2)
    inputs, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 0])
    data = (inputs, labels, torch.arange(10, 16))
    with pytest.raises(InfluxValueError, match=r"\[0, 2\).*example indices \[12\].*targets \[2\]"):
        logit_confidence(model, data)
    with pytest.raises(InfluxValueError, match=r"example indices \[12\]"):
        per_example_losses(model, cross_entropy_per_example, data)
    # accuracy too: a label no output can match is a broken label, not a miss
    from influx.audit import accuracy

    with pytest.raises(InfluxValueError, match=r"example indices \[12\]"):
        accuracy(model, data)


@pytest.fixture
def one_thread():
    # The models are tiny: intra-op threads only add synchronization (3x slower on a busy CPU).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_lira_separates_members_on_digits(one_thread):
    # 200 digits, a 64-32-10 MLP; 2 targets and 8 shadows, each trained on a random half by
    # full-batch Adam (150 steps, lr 0.02: training accuracy ~100%, so members are fitted better).
    # Under the null (no membership signal), the AUC over 200 members / 200 non-members has sd
    # sqrt((n1 + n0 + 1) / (12 n1 n0)) ~ 0.029 (0.041 if the two targets' scores were fully
    # dependent), so 0.65 is more than 3.6 sd above chance; the seeded run measures ~0.78 online
    # and ~0.74 offline.
    x, y, _ = as_tensors(load("digits", max_examples=200))
    model = mlp(hidden=(32,))
    target_members = shadow_masks(2, 200, seed=123)
    loss = cross_entropy_per_example
    targets = fit_weighted(model, loss, (x, y), target_members.float(), steps=150, lr=0.02)
    settings = dict(num_shadows=8, steps=150, lr=0.02, seed=1)
    online = lira(model, loss, (x, y), targets, target_members=target_members, **settings)
    assert online.global_variance  # 8 < 64 shadows
    assert online.scores.shape == (2, 200) and online.shadow_signals.shape == (8, 200)
    assert online.auc > 0.65, online.metrics

    # The same shadows, trained here and handed over: the default trainer is fit_weighted on
    # shadow_masks(8, 200, seed=1).
    shadow_params = fit_weighted(
        model, loss, (x, y), shadow_masks(8, 200, seed=1).float(), steps=150, lr=0.02
    )
    reuse = dict(settings, shadow_trainer=lambda masks: shadow_params)
    offline = lira(model, loss, (x, y), targets, target_members=target_members, online=False,
                   **reuse)  # fmt: skip
    torch.testing.assert_close(offline.shadow_signals, online.shadow_signals, rtol=0, atol=0)
    assert offline.auc > 0.65, offline.metrics

    # A target given as a module scores like its row of the stacked targets.
    first = copy.deepcopy(model)
    first.load_state_dict({n: v[0] for n, v in targets.items()})
    single = lira(model, loss, (x, y), first, **reuse)
    assert single.metrics is None and single.scores.shape == (1, 200)
    torch.testing.assert_close(single.scores[0], online.scores[0], rtol=1e-6, atol=1e-6)
