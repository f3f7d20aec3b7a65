"""Evaluation helpers take any data argument, and mislabel_auc takes dataset indices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from utils import IndexedDataset

from influx.errors import InfluxValueError
from influx.influence import evaluate


def test_subset_models_and_retraining_take_a_dataset(tiny_mlp):
    model, loss_fn, (x, y), query = tiny_mlp
    dataset = IndexedDataset(x, y, torch.arange(x.shape[0]) * 3 + 1)
    queries = IndexedDataset(*query, torch.arange(query[0].shape[0]))
    kwargs = {"num_subsets": 3, "steps": 5}
    from_tuple = evaluate.train_subset_models(model, loss_fn, (x, y), query, **kwargs)
    from_dataset = evaluate.train_subset_models(model, loss_fn, dataset, queries, **kwargs)
    # The same tensors in the same order: the same arithmetic, bit for bit.
    assert torch.equal(from_dataset.masks, from_tuple.masks)
    assert torch.equal(from_dataset.query_losses, from_tuple.query_losses)
    pairs = torch.tensor([[0, 4], [1, 9]])
    truth = evaluate.retrain_ground_truth(model, loss_fn, (x, y), query, pairs, steps=5)
    again = evaluate.retrain_ground_truth(model, loss_fn, dataset, queries, pairs, steps=5)
    assert torch.equal(again.measured, truth.measured)


def test_mislabel_auc_takes_dataset_indices_and_refuses_unknown_ones():
    scores = torch.randn(50, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    indices = torch.arange(50) * 2 + 100  # dataset indices 100, 102, ..., 198
    flipped_positions = [0, 3, 12, 40]
    labels = np.zeros(50, dtype=bool)
    labels[flipped_positions] = True
    expected = roc_auc_score(labels, scores.numpy())  # an independent AUC
    result = evaluate.mislabel_auc(scores, indices[flipped_positions], indices=indices)
    assert result.auc == pytest.approx(expected, rel=1e-12)  # float64, one rank statistic
    assert evaluate.mislabel_auc(scores, flipped_positions).auc == pytest.approx(
        expected, rel=1e-12
    )
    with pytest.raises(
        InfluxValueError, match=r"e.g. \[-1\]: flipped takes dataset indices \(0..49"
    ):
        evaluate.mislabel_auc(scores, [-1, 3])  # once wrapped silently to position 49
    with pytest.raises(InfluxValueError, match=r"e.g. \[50\]"):
        evaluate.mislabel_auc(scores, [3, 50])
    with pytest.raises(InfluxValueError, match=r"e.g. \[101\].*those of indices="):
        evaluate.mislabel_auc(scores, [101, 102], indices=indices)
    with pytest.raises(InfluxValueError, match=r"mask.nonzero\(\)"):
        evaluate.mislabel_auc(scores, torch.tensor(labels))
