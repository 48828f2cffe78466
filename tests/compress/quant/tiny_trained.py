"""A briefly trained tiny model (and a one-thread ORT session) shared by the quantization tests (PTQ, QAT).

MobileNetV3-Small (10 outputs; width 1.0 unless asked) at 32x32, trained for 20 steps on two well-separated Fashion-MNIST classes
(Trouser, Bag) so its predictions have real margins, then its BN statistics re-estimated.
"""
from __future__ import annotations

import numpy as np
import torch

from calibration.datasets import FASHION_MNIST_DIR, load_fashion_mnist

CLASSES = (1, 8)  # Trouser, Bag
SIZE = 32


def train_tiny(source, steps: int = 20, batch: int = 64, width_mult: float = 1.0, spec=None) -> torch.nn.Module:
    """``spec``: an ArchSpec to train instead of MobileNetV3-Small at ``width_mult``."""
    from compress.models.mobilenetv3 import build_model, mobilenet_v3_small

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on 2 shared cores thrash (10x slower under load)
    images, labels = load_fashion_mnist(FASHION_MNIST_DIR, "train")
    sel = np.flatnonzero(np.isin(labels, CLASSES))[:steps * batch]
    x, y = source.preprocess(torch.from_numpy(images[sel])), torch.from_numpy(labels[sel])
    model = build_model(spec) if spec is not None else mobilenet_v3_small(width_mult, num_classes=10, dropout=0.0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-2, total_steps=steps, pct_start=0.3)
    for k in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x[k * batch:(k + 1) * batch]), y[k * batch:(k + 1) * batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    for m in model.modules():  # re-estimate BN statistics (momentum 0.01 has not converged in 20 steps)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model(x[:512])
    torch.set_num_threads(threads)
    return model.eval()


def two_class_test_images(source, n: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed test images of the two classes, and their labels."""
    images, labels = load_fashion_mnist(FASHION_MNIST_DIR, "test")
    sel = np.flatnonzero(np.isin(labels, CLASSES))[:n]
    return source.preprocess(torch.from_numpy(images[sel])).numpy(), labels[sel]


def ort_session(model):
    """A quiet one-thread CPU session for an ONNX ModelProto."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
