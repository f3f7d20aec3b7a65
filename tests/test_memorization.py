"""influx.memorization: the estimator against direct loops, resumable / split runs, proxies."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats
from torch.func import functional_call, grad, vmap
from utils import assert_close

from influx import data, memorization, models
from influx.errors import InfluxRuntimeError, InfluxValueError, UnsupportedModelError
from influx.memorization.proxies import _at, _probe_signs
from influx.train import cross_entropy_per_example, train

LOSS = cross_entropy_per_example


def _direct_from_runs(masks: np.ndarray, correct: np.ndarray):
    """Loop over examples: means of the in / out models and the Welch standard error."""
    mem, stderr = [], []
    for i in range(masks.shape[1]):
        inside, outside = correct[masks[:, i] == 1, i], correct[masks[:, i] == 0, i]
        mem.append(inside.mean() - outside.mean())
        stderr.append(
            np.sqrt(inside.var(ddof=1) / inside.size + outside.var(ddof=1) / outside.size)
        )
    return np.array(mem), np.array(stderr)


@pytest.mark.parametrize("kind", ["binary", "probabilities"])
def test_from_runs_matches_a_direct_loop(kind):
    rng = np.random.default_rng(1)
    masks = (rng.random((40, 25)) < 0.6).astype(np.int64)
    # Every example at least twice on each side, so every mean and variance is defined.
    masks[:2], masks[2:4] = 1, 0
    correct = rng.random((40, 25))
    if kind == "binary":
        correct = (correct < 0.7).astype(np.float64)
    tests = rng.random((40, 7)) < 0.5
    result = memorization.from_runs(masks, correct, test_correct=tests)
    mem, stderr = _direct_from_runs(masks, correct)
    # float64 sums of at most 40 terms: agreement to ~1e-15; 1e-12 leaves room for summation order.
    assert_close(result.mem, torch.from_numpy(mem), rtol=1e-12, name="mem")
    assert_close(result.stderr, torch.from_numpy(stderr), rtol=1e-12, name="stderr")
    assert torch.equal(result.n_in, torch.from_numpy(masks.sum(0)).double())
    influence = np.array([
        [tests[masks[:, i] == 1, j].mean() - tests[masks[:, i] == 0, j].mean() for j in range(7)]
        for i in range(25)
    ])  # fmt: skip
    influence_stderr = np.array([
        [
            np.sqrt(
                tests[masks[:, i] == 1, j].var(ddof=1) / masks[:, i].sum()
                + tests[masks[:, i] == 0, j].var(ddof=1) / (40 - masks[:, i].sum())
            )
            for j in range(7)
        ]
        for i in range(25)
    ])  # fmt: skip
    assert_close(result.influence, torch.from_numpy(influence), rtol=1e-12, name="influence")
    assert_close(
        result.influence_stderr, torch.from_numpy(influence_stderr), rtol=1e-12, name="infl se"
    )


def test_every_name_of_the_single_module_is_still_importable():
    old = (
        "Comparison Ensemble MemorizationResult TrainingRecord compare confidence cumulative_loss "
        "curvature estimate final_loss fit_ensemble from_runs margin merge record self_influence "
        "subset_masks tracin_self_influence train_and_record LOW_MEANS_MEMORIZED"
    ).split()
    assert all(hasattr(memorization, name) for name in old)
    # The functions win over the submodules of the same name.
    assert callable(memorization.estimate) and callable(memorization.compare)
    from influx.memorization.compare import Comparison
    from influx.memorization.estimate import MemorizationResult
    from influx.memorization.proxies import TrainingRecord

    assert (Comparison, MemorizationResult, TrainingRecord) == (
        memorization.Comparison, memorization.MemorizationResult, memorization.TrainingRecord
    )  # fmt: skip
    assert callable(memorization.estimate) and callable(memorization.compare)


def test_from_runs_marks_one_sided_examples_nan_with_a_warning():
    masks = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 0]])
    correct = torch.ones(3, 3, device="cpu")
    with pytest.warns(UserWarning, match="2 of 3 examples were never in"):
        result = memorization.from_runs(masks, correct)
    assert torch.isnan(result.mem[[0, 2]]).all() and result.mem[1] == 0.0


def test_from_runs_rejects_bad_input():
    with pytest.raises(InfluxValueError, match="one shape"):
        memorization.from_runs(torch.ones(3, 4, device="cpu"), torch.ones(3, 5, device="cpu"))
    with pytest.raises(InfluxValueError, match="0/1"):
        memorization.from_runs(
            torch.full((2, 2), 0.5, device="cpu"), torch.ones(2, 2, device="cpu")
        )
    correct = torch.ones(2, 4, device="cpu")
    correct[1, 3] = float("nan")
    with pytest.raises(InfluxValueError, match=r"train examples \[3\]"):
        memorization.from_runs(torch.eye(2, 4, device="cpu"), correct)
    # A NaN test run would make that test example's influence NaN without a word.
    tests = torch.ones(2, 3, device="cpu")
    tests[0, 1] = float("nan")
    with pytest.raises(
        InfluxValueError, match=r"test_correct holds NaN/inf for test examples \[1\]"
    ):
        memorization.from_runs(torch.eye(2, 4, device="cpu"), torch.ones(2, 4), test_correct=tests)


# --- the ensemble estimator ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_subset():
    inputs, targets, _ = data.as_tensors(data.load("digits"))
    return (inputs[:120], targets[:120]), (inputs[1500:1530], targets[1500:1530])


def _tiny_mlp():
    return models.mlp(64, (16,), 10)


SETUP = dict(n_models=6, subset_frac=0.5, epochs=3, lr=1e-2, batch_size=32, seed=3, chunk=2)


def _same(a: memorization.MemorizationResult, b: memorization.MemorizationResult) -> None:
    for name in ("mem", "stderr", "n_in", "influence"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num())


@pytest.fixture(scope="module")
def single_run(digits_subset):
    train_set, test_set = digits_subset
    with pytest.warns(UserWarning, match="never in"):
        return memorization.estimate(_tiny_mlp, LOSS, train_set, test=test_set, **SETUP)


@pytest.mark.slow
def test_estimate_is_finite_and_bounded(single_run):
    defined = (single_run.n_in > 0) & (single_run.n_out > 0)
    assert defined.sum() > 100 and single_run.complete and single_run.n_models == 6
    mem = single_run.mem[defined]
    assert torch.isfinite(mem).all() and (mem.abs() <= 1).all()
    # Trained models fit their own subset better than they generalize to the rest.
    assert mem.mean() > 0
    assert single_run.influence.shape == (120, 30)


@pytest.mark.slow
def test_estimate_resumes_to_the_same_result(digits_subset, single_run, tmp_path):
    train_set, test_set = digits_subset
    with pytest.warns(UserWarning, match="1 of 3 chunks"):
        partial = memorization.estimate(
            _tiny_mlp, LOSS, train_set, test=test_set, out=tmp_path, max_chunks=1, **SETUP
        )
    assert not partial.complete and partial.n_models == 2
    with pytest.warns(UserWarning, match="never in"):
        resumed = memorization.estimate(
            _tiny_mlp, LOSS, train_set, test=test_set, out=tmp_path, **SETUP
        )
    assert resumed.complete
    _same(resumed, single_run)
    # Another setup in the same folder is refused rather than mixed in.
    with pytest.raises(InfluxValueError, match=r"other settings \(lr: 0.01 -> 0.5\)"):
        memorization.estimate(
            _tiny_mlp, LOSS, train_set, test=test_set, out=tmp_path, **{**SETUP, "lr": 0.5}
        )


@pytest.mark.slow
def test_a_damaged_chunk_is_trained_again(digits_subset, single_run, tmp_path):
    train_set, test_set = digits_subset
    with pytest.warns(UserWarning, match="never in"):
        memorization.estimate(_tiny_mlp, LOSS, train_set, test=test_set, out=tmp_path, **SETUP)
    shard = tmp_path / "chunk-00001.correct.npy"
    shard.write_bytes(shard.read_bytes()[:-8])  # truncated outside influx
    with pytest.warns(UserWarning, match=r"2 of 3 chunks of runs are present \(missing \[1\]"):
        # max_chunks=0: nothing is retrained, and the damaged chunk is not used.
        partial = memorization.estimate(
            _tiny_mlp, LOSS, train_set, test=test_set, out=tmp_path, max_chunks=0, **SETUP
        )
    assert not partial.complete and partial.n_models == 4 and not shard.exists()
    with pytest.warns(UserWarning, match="never in"):
        again = memorization.estimate(
            _tiny_mlp, LOSS, train_set, test=test_set, out=tmp_path, **SETUP
        )
    _same(again, single_run)


def test_estimate_refuses_a_folder_of_other_files(tmp_path):
    """A folder the store did not write (the user's files, or chunks of the old layout beside a
    meta.json) is refused by name before any training, never adopted or overwritten."""
    (tmp_path / "meta.json").write_text("{}")
    inputs, targets = _fresh_batch(n=8)
    with pytest.raises(InfluxValueError, match=r"holds no influx store .*found meta.json"):
        memorization.estimate(
            lambda: models.mlp(6, (4,), 3).double(), LOSS, (inputs, targets), n_models=2,
            epochs=1, lr=0.1, batch_size=4, out=tmp_path,
        )  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_merge_refuses_a_folder_estimate_did_not_write(tmp_path):
    with pytest.raises(InfluxValueError, match="no readable manifest.json of memorization"):
        memorization.merge([tmp_path])
    (tmp_path / "manifest.json").write_text('{"format": 1, "fingerprint": "x", "meta": {}}')
    with pytest.raises(InfluxValueError, match="no readable manifest.json of memorization"):
        memorization.merge([tmp_path])


@pytest.mark.slow
def test_two_ranks_merge_to_the_single_process_run(digits_subset, single_run, tmp_path):
    train_set, test_set = digits_subset
    folders = [tmp_path / "rank0", tmp_path / "rank1"]
    for rank, folder in enumerate(folders):
        with pytest.warns(UserWarning):
            memorization.estimate(
                _tiny_mlp, LOSS, train_set, test=test_set, out=folder, rank=rank, world_size=2,
                **SETUP,
            )  # fmt: skip
    with pytest.raises(InfluxRuntimeError, match=r"chunks \[1\]"):
        memorization.merge(folders[:1])
    with pytest.warns(UserWarning, match="never in"):
        merged = memorization.merge(folders)
    _same(merged, single_run)


def test_estimate_rejects_bad_settings(digits_subset):
    train_set, _ = digits_subset
    common = {**SETUP}
    with pytest.raises(InfluxValueError, match="subset_frac"):
        memorization.estimate(_tiny_mlp, LOSS, train_set, **{**common, "subset_frac": 1.0})
    with pytest.raises(InfluxValueError, match="out=<folder>"):
        memorization.estimate(_tiny_mlp, LOSS, train_set, rank=1, world_size=2, **common)
    with pytest.raises(InfluxValueError, match=r"optimizer must be one of \('adam', 'sgd'\)"):
        memorization.estimate(_tiny_mlp, LOSS, train_set, **{**common, "optimizer": "adamw"})
    with pytest.raises(InfluxValueError, match="give both rank and world_size"):
        memorization.estimate(_tiny_mlp, LOSS, train_set, rank=1, **common)
    with pytest.raises(UnsupportedModelError, match="BatchNorm1d .*convert_batchnorm"):
        memorization.estimate(
            lambda: torch.nn.Sequential(torch.nn.BatchNorm1d(3)), LOSS, train_set, **common
        )
    inputs, targets = train_set
    with pytest.raises(InfluxValueError, match=r"integer class indices \[N\].*targets.long\(\)"):
        memorization.estimate(_tiny_mlp, LOSS, (inputs, targets.float()), **common)
    with pytest.raises(InfluxValueError, match="needs the data after loss_fn"):
        memorization.estimate(_tiny_mlp, LOSS, **common)


@pytest.mark.slow
def test_the_old_argument_order_still_works_with_a_deprecation_warning(digits_subset):
    """estimate(model_fn, data) and margin(model, data): cross-entropy, the same numbers."""
    train_set, _ = digits_subset
    setup = {**SETUP, "n_models": 2, "chunk": 2, "epochs": 1}
    with pytest.warns(UserWarning, match="never in"):
        new = memorization.estimate(_tiny_mlp, LOSS, train_set, **setup)
    with pytest.warns(DeprecationWarning, match=r"estimate\(model_fn, loss_fn, train"):
        with pytest.warns(UserWarning, match="never in"):
            old = memorization.estimate(_tiny_mlp, train_set, **setup)
    for name in ("mem", "stderr", "n_in"):
        assert torch.equal(getattr(old, name).nan_to_num(9.0), getattr(new, name).nan_to_num(9.0))
    model = _tiny_mlp()
    with pytest.warns(DeprecationWarning, match=r"margin\(model, loss_fn, train\)") as caught:
        old_margin = memorization.margin(model, train_set)
    assert caught[0].filename == __file__  # points at the caller
    assert torch.equal(old_margin, memorization.margin(model, LOSS, train_set))


# --- proxies -------------------------------------------------------------------------------------


def _fresh_batch(n=20, d=6, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, d, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, classes, (n,), generator=generator)
    return inputs, targets


def _tanh_mlp(d=6, classes=3):
    torch.manual_seed(0)
    return models.mlp(d, (5,), classes).double()


@pytest.mark.slow
@pytest.mark.parametrize("with_checkpoints", [False, True])
def test_curvature_equals_a_per_example_loop(with_checkpoints):
    inputs, targets = _fresh_batch()
    model = _tanh_mlp()
    states = None
    if with_checkpoints:
        other = _tanh_mlp()
        torch.nn.init.normal_(other[1].weight)
        states = [model.state_dict(), other.state_dict()]
    probes, h, batch_size = 4, 1e-3, 7
    fast = memorization.curvature(
        model, LOSS, (inputs, targets), checkpoints=states, probes=probes, h=h, seed=5,
        batch_size=batch_size,
    )  # fmt: skip
    nets = [model] if states is None else [_at(model, s) for s in states]
    expected = torch.zeros(20, dtype=torch.float64, device="cpu")
    for net in nets:
        for start in range(0, 20, batch_size):
            count = min(batch_size, 20 - start)
            signs = _probe_signs(5, start, count, (6,), probes).double()
            for offset in range(count):
                i = start + offset

                def loss_at(x, i=i, net=net):
                    return LOSS(net(x[None]), targets[i : i + 1]).squeeze()

                base = torch.func.grad(loss_at)(inputs[i])
                norms = [
                    (torch.func.grad(loss_at)(inputs[i] + h * v[offset]) - base).norm()
                    for v in signs
                ]
                expected[i] += torch.stack(norms).mean() / len(nets)
    # float64 throughout; the batched and single gradients differ in summation order only.
    assert_close(fast, expected, rtol=1e-10, name="curvature")


def test_recorded_proxies_equal_direct_evaluation():
    inputs, targets = _fresh_batch(n=30)
    model = _tanh_mlp()
    recorded = memorization.train_and_record(
        model, LOSS, (inputs, targets), epochs=3, lr=1e-2, batch_size=8
    )
    assert recorded.losses.shape == (3, 30) and recorded.steps == [4, 8, 12]
    losses, probabilities = [], []
    for checkpoint in recorded.train_result.checkpoints:
        net = _at(model, checkpoint.state_dict).eval()
        logits = net(inputs)
        losses.append(LOSS(logits, targets))
        probabilities.append(logits.softmax(1)[torch.arange(30), targets])
    # Same float64 forward passes: equal to rounding.
    assert_close(memorization.cumulative_loss(recorded), torch.stack(losses).sum(0).detach())
    assert_close(memorization.confidence(recorded), torch.stack(probabilities).mean(0).detach())
    logits = model.eval()(inputs).detach()
    others = torch.stack([
        torch.cat([logits[i, :c], logits[i, c + 1 :]]).max() for i, c in enumerate(targets.tolist())
    ])  # fmt: skip
    assert_close(
        memorization.margin(model, LOSS, (inputs, targets)),
        logits[torch.arange(30), targets] - others,
    )
    assert_close(memorization.final_loss(model, LOSS, (inputs, targets)), LOSS(logits, targets))


@pytest.mark.slow
def test_self_influence_proxies_equal_gradient_norms():
    inputs, targets = _fresh_batch(n=12)
    model = _tanh_mlp()
    result = train(model, (inputs, targets), epochs=2, lr=1e-2, batch_size=4, checkpoints="epochs",
                   progress=False)  # fmt: skip
    params = dict(model.named_parameters())

    def squared_grad_norms(state):
        def example_loss(p, x, y):
            return LOSS(functional_call(model, p, (x[None],)), y[None]).squeeze()

        grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(
            {k: state[k] for k in params}, inputs, targets
        )
        return sum(g.flatten(1).square().sum(1) for g in grads.values())

    expected = sum(c.lr * squared_grad_norms(c.state_dict) for c in result.checkpoints)
    traced = memorization.tracin_self_influence(model, LOSS, (inputs, targets), result)
    # float64 per-example gradients by two routes (hooks vs torch.func): ~1e-15 relative.
    assert_close(traced, expected, rtol=1e-10, name="tracin self-influence")
    plain = memorization.self_influence(model, LOSS, (inputs, targets), method="grad_dot")
    assert_close(plain, squared_grad_norms(dict(model.state_dict())), rtol=1e-10, name="grad_dot")


# --- compare ------------------------------------------------------------------------------------


def test_compare_equals_scipy_and_a_direct_overlap():
    rng = np.random.default_rng(0)
    mem = rng.normal(size=200)
    noisy = mem + rng.normal(size=200)
    anti = -mem + 0.5 * rng.normal(size=200)
    mem_with_gap = mem.copy()
    mem_with_gap[3] = np.nan
    table = memorization.compare(
        torch.from_numpy(mem_with_gap), {"loss": noisy, "margin": anti}, k=20, n_boot=200
    )
    keep = np.isfinite(mem_with_gap)
    for row, proxy, sign in zip(table.rows, (noisy, anti), (1, -1), strict=True):
        x, y = proxy[keep], mem[keep]
        assert row["n"] == 199
        assert row["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
        assert row["pearson"] == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
        assert row["cosine"] == pytest.approx(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
        low, high = row["spearman_ci"]
        assert low < row["spearman"] < high and high - low < 0.3
        top_proxy = set(np.argsort(-sign * x)[:20])
        assert row["topk_overlap"] == len(top_proxy & set(np.argsort(-y)[:20])) / 20
    assert table.rows[1]["pearson"] < 0 < table.rows[1]["topk_overlap"]
    assert "| loss |" in table.to_markdown()
    again = memorization.compare(mem_with_gap, {"loss": noisy, "margin": anti}, k=20, n_boot=200)
    assert again.rows == table.rows  # the bootstrap is seeded


# --- compare: ties at the top-k boundary ---------------------------------------------------------


def _expected_overlap_by_enumeration(proxy, mem, k):
    """Mean |top-k(proxy) ∩ top-k(mem)| / k over every order of the examples, each side's ties
    broken by that order (a stable sort), the two orders independent."""
    n = len(proxy)

    def tops(values):
        found = Counter()
        for order in itertools.permutations(range(n)):
            ranked = sorted(order, key=lambda i: -values[i])  # stable: ties keep `order`
            found[frozenset(ranked[:k])] += 1
        return found

    tops_proxy, tops_mem = tops(proxy), tops(mem)
    total = sum(cp * cm * len(a & b) for a, cp in tops_proxy.items() for b, cm in tops_mem.items())
    return total / (sum(tops_proxy.values()) * sum(tops_mem.values()) * k)


# Six examples: some bootstrap resamples are constant (their correlation undefined); only the
# overlap is checked there.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:The BCa confidence interval")
def test_compare_topk_overlap_shares_tied_places():
    mem = np.array([1.0, 1.0, 1.0, 0.5, 0.0, 0.0])
    proxy = np.array([6.0, 5.0, 1.0, 4.0, 4.0, 2.0])  # a tie of its own at the 3rd place
    for k in (2, 3, 4):
        table = memorization.compare(mem, {"loss": proxy}, k=k, n_boot=10)
        # Fractions of at most 720^2 counts: exact up to float64 rounding.
        assert table.rows[0]["topk_overlap"] == pytest.approx(
            _expected_overlap_by_enumeration(proxy, mem, k), rel=1e-12
        ), k
    # k = 2 by hand: three examples tied at 1 share two places, 2/3 each; the proxy's top two
    # are examples 0 and 1, so the overlap is (2/3 + 2/3) / 2.
    assert memorization.compare(mem, {"loss": proxy}, k=2, n_boot=10).rows[0][
        "topk_overlap"
    ] == pytest.approx(2 / 3, rel=1e-15)
    # Memorization estimates take few values: the overlap must not depend on example order.
    rng = np.random.default_rng(0)
    many = np.round(rng.random(300) * 10) / 10
    noisy = many + rng.normal(0, 0.3, 300)
    order = rng.permutation(300)
    first = memorization.compare(many, {"loss": noisy}, n_boot=10).rows[0]["topk_overlap"]
    again = memorization.compare(many[order], {"loss": noisy[order]}, n_boot=10)
    assert again.rows[0]["topk_overlap"] == pytest.approx(first, rel=1e-12)
