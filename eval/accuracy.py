"""Accuracy of an ONNX model on a dataset split: predictions with onnxruntime, top-k, agreement."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from compress.errors import UserError
from eval.model_info import ModelLike, graph_input_dims, load_model

if TYPE_CHECKING:
    from calibration.datasets import DataSource


def check_input_fits(model: ModelLike, source: DataSource) -> None:
    """UserError (one line) unless the model's input ``[N, 3, H, W]`` accepts the dataset's preprocessed images."""
    proto = load_model(model)
    dims = graph_input_dims(proto)
    h, w = source.preprocess.input_size
    given = f"[N, 3, {h}, {w}]"
    if len(dims) != 4:
        raise UserError(f"model input has rank {len(dims)} but dataset {source.name} gives images {given}")
    for have, want in zip(dims[1:], (3, h, w)):
        if have is not None and have != want:
            shown = ", ".join("N" if i == 0 else str(d) if d is not None else "?" for i, d in enumerate(dims))
            raise UserError(f"model input is [{shown}] but dataset {source.name} gives images {given}")


def predict(model: ModelLike, source: DataSource, split: str = "test", limit: int | None = None,
            batch_size: int = 256, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``[N, classes]`` (float32) and labels ``[N]`` (int64; -1 on synthetic data) for the first
    ``limit`` images of ``split``, preprocessed by ``source.preprocess``.  ``model`` may also be an
    existing ``InferenceSession``; ``threads=None`` lets onnxruntime use every core."""
    from eval.latency import make_session

    if hasattr(model, "run") and hasattr(model, "get_inputs"):
        sess = model
    else:
        check_input_fits(model, source)
        sess = make_session(model, threads)
    inp = sess.get_inputs()[0]
    fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
    logits, labels = [], []
    for x, y in source.loader(split, batch_size=fixed_batch or batch_size, limit=limit):
        xs = x.numpy()
        n = len(xs)
        if fixed_batch and n < fixed_batch:  # a model exported with a static batch: pad the last batch
            xs = np.concatenate([xs, np.zeros((fixed_batch - n, *xs.shape[1:]), xs.dtype)])
        try:
            out = sess.run(None, {inp.name: xs})[0]
        except Exception as e:
            text = str(e).strip().splitlines()
            raise UserError(f"onnxruntime failed on dataset {source.name}: "
                            f"{text[0] if text else type(e).__name__}") from None
        logits.append(np.asarray(out, dtype=np.float32).reshape(len(xs), -1)[:n])
        labels.append(y.numpy())
    if not logits:
        raise UserError(f"dataset {source.name} has no {split} images")
    return np.concatenate(logits), np.concatenate(labels).astype(np.int64)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, Any]:
    """``{"top1": fraction, "top5": fraction, ...}``; None for each k when labels are missing (-1).

    The top-k classes are the first k of a stable descending sort, so ties go to the lower class index (the
    same rule as ``argmax``, used by :func:`agreement`).  k larger than the class count counts every class.
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"logits must be [N, C] and labels [N], got {logits.shape} and {labels.shape}")
    if len(labels) == 0 or (labels < 0).any():
        return {f"top{k}": None for k in ks}
    order = np.argsort(-logits, axis=1, kind="stable")
    hits = order == labels[:, None]
    return {f"top{k}": float(hits[:, :k].any(axis=1).mean()) for k in ks}


def agreement(logits_a: np.ndarray, logits_b: np.ndarray) -> float:
    """Share of samples on which both models predict the same top-1 class."""
    a, b = np.asarray(logits_a), np.asarray(logits_b)
    if a.shape[0] != b.shape[0] or a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"agreement needs logits of the same samples, got {a.shape} and {b.shape}")
    if len(a) == 0:
        raise ValueError("agreement of zero samples")
    return float((a.argmax(axis=1) == b.argmax(axis=1)).mean())
