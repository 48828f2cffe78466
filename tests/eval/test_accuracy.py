"""Top-k, agreement and predictions against values computed by hand or by torch."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from eval_helpers import FASHION_MNIST, constant_logits_model

from calibration.datasets import open_dataset
from eval.accuracy import agreement, predict, topk_accuracy
from eval.evaluate import evaluate_onnx

# Class counts of the first 200 Fashion-MNIST test labels (t10k-labels-idx1-ubyte), counted once by hand
# from the file and re-checked below.
FIRST_200_COUNTS = [20, 27, 27, 17, 21, 16, 16, 20, 18, 18]


def test_topk_on_hand_made_logits():
    logits = np.array([
        [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],   # label 1: the top class                -> top1, top5
        [0.5, 0.2, 0.3, 0.1, 0.0, -1.0],  # label 5: the lowest of 6             -> neither
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],   # label 1: 5th highest                 -> top5 only
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],   # label 3: tie, lower index first: 4th -> top5 only
    ])
    labels = np.array([1, 5, 1, 3])
    assert topk_accuracy(logits, labels) == {"top1": 0.25, "top5": 0.75}
    assert topk_accuracy(logits, np.array([1, 0, 5, 0]), ks=(1, 2)) == {"top1": 1.0, "top2": 1.0}
    assert topk_accuracy(logits[:, :3], np.array([1, 0, 0, 2])) == {"top1": 0.5, "top5": 1.0}  # k > classes


def test_topk_without_labels_is_none():
    assert topk_accuracy(np.zeros((3, 10)), np.full(3, -1)) == {"top1": None, "top5": None}


def test_agreement_by_hand():
    a = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], dtype=np.float32)
    b = np.array([[1, 0], [0, 1], [0, 1], [0, 1]], dtype=np.float32)
    assert agreement(a, b) == 0.75
    with pytest.raises(ValueError):
        agreement(a, b[:3])


def test_constant_model_accuracy_matches_label_counts(tmp_path):
    """A model whose logits ignore the image: top-1 is the share of class 3, top-5 the share of its five best."""
    raw = gzip.open(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").read()
    assert np.bincount(np.frombuffer(raw, np.uint8, offset=8)[:200], minlength=10).tolist() == FIRST_200_COUNTS
    c = [0.1, 0.5, 0.2, 0.9, 0.3, 0.05, 0.4, 0.0, 0.6, 0.7]  # order: 3, 9, 8, 1, 6, 4, 2, 0, 5, 7
    path = tmp_path / "constant.onnx"
    path.write_bytes(constant_logits_model(c).SerializeToString())
    result = evaluate_onnx(path, "fashion-mnist", limit=200, latency=False)
    assert result["accuracy"]["top1"] == 17 / 200
    assert result["accuracy"]["top5"] == (17 + 18 + 18 + 27 + 16) / 200  # classes 3, 9, 8, 1, 6


def test_predict_matches_torch_on_first_200(tiny):
    model, path = tiny
    source = open_dataset("fashion-mnist", 32)
    logits, labels = predict(path, source, limit=200, batch_size=64)
    assert logits.shape == (200, 10) and labels.shape == (200,)
    xs, ys = zip(*source.loader("test", batch_size=200, limit=200))
    with torch.no_grad():
        ref = model(xs[0]).numpy()
    np.testing.assert_array_equal(labels, ys[0].numpy())
    np.testing.assert_allclose(logits, ref, rtol=1e-3, atol=1e-4)
    assert agreement(logits, ref) == 1.0
    assert topk_accuracy(logits, labels) == topk_accuracy(ref, labels)
