"""evaluate_onnx end to end, its one-line errors, and the eval / compare CLI."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from eval_helpers import constant_logits_model

from compress.errors import UserError
from eval.evaluate import evaluate_onnx

KEYS = ["accuracy", "agreement", "latency_ms", "size_bytes", "params", "macs", "macs_executed", "machine"]


def _torch_macs(model, size: int) -> int:
    """MACs of a torch model at batch 1, counted with forward hooks on its Conv2d / Linear layers (independent of
    the ONNX graph that count_macs reads)."""
    import torch

    total = [0]

    def conv(m, inp, out):
        total[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, inp, out):
        total[0] += out.numel() * m.in_features

    hooks = [m.register_forward_hook(conv if isinstance(m, torch.nn.Conv2d) else linear)
             for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return total[0]


def test_evaluate_fields(tiny, tmp_path):
    """Each field against a value known without evaluate_onnx: accuracy and agreement of constant models from
    the label file, params and MACs from the torch model."""
    from eval_helpers import FASHION_MNIST

    from calibration.datasets import load_fashion_mnist
    from compress.models.mobilenetv3 import count_params

    labels = load_fashion_mnist(str(FASHION_MNIST), "test")[1][:64]
    always3 = tmp_path / "always3.onnx"
    onnx.save(constant_logits_model(np.eye(10, dtype=np.float32)[3]), str(always3))
    always5 = tmp_path / "always5.onnx"
    onnx.save(constant_logits_model(np.eye(10, dtype=np.float32)[5]), str(always5))
    r = evaluate_onnx(always3, "fashion-mnist", limit=64, threads=1, batch=2, reference=always5)
    assert list(r) == KEYS
    assert r["accuracy"]["top1"] == pytest.approx(float((labels == 3).mean()))
    assert r["agreement"] == 0.0
    assert {"median", "p90", "mean", "threads", "batch", "runs"} <= set(r["latency_ms"])
    assert (r["latency_ms"]["threads"], r["latency_ms"]["batch"]) == (1, 2)
    assert r["size_bytes"] == os.path.getsize(always3)
    assert json.loads(json.dumps(r)) == r

    model, path = tiny
    t = evaluate_onnx(path, "fashion-mnist", limit=64, latency=False)
    assert t["params"] == count_params(model) == sum(p.numel() for p in model.parameters())
    assert t["macs"] == t["macs_executed"] == _torch_macs(model, 32)


def test_synthetic_has_no_accuracy(tiny):
    r = evaluate_onnx(tiny[1], "synthetic", limit=8, latency=False)
    assert r["accuracy"] == {"top1": None, "top5": None} and r["latency_ms"] is None and r["agreement"] is None


def _one_line_error(call) -> str:
    with pytest.raises(UserError) as e:
        call()
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def test_bad_input_is_one_line(tmp_path, tiny):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(tiny[1].read_bytes()[:500])
    assert "not a valid ONNX model" in _one_line_error(lambda: evaluate_onnx(corrupt, latency=False))
    text = tmp_path / "text.onnx"
    text.write_text("hello")
    assert "not a valid ONNX model" in _one_line_error(lambda: evaluate_onnx(text, latency=False))
    assert "not found" in _one_line_error(lambda: evaluate_onnx(tmp_path / "missing.onnx"))
    gray = tmp_path / "gray.onnx"  # a 1-channel 28x28 model does not take the dataset's RGB 28x28 images
    gray.write_bytes(constant_logits_model(np.arange(10), ("N", 1, 28, 28)).SerializeToString())
    assert "model input is [N, 1, 28, 28]" in _one_line_error(lambda: evaluate_onnx(gray, latency=False))
    wide = tmp_path / "wide.onnx"  # 3 classes vs Fashion-MNIST's 10
    wide.write_bytes(constant_logits_model(np.arange(3)).SerializeToString())
    assert "3 outputs" in _one_line_error(lambda: evaluate_onnx(wide, latency=False))
    (tmp_path / "images" / "cat").mkdir(parents=True)
    assert "no images" in _one_line_error(
        lambda: evaluate_onnx(tiny[1], f"imagefolder:{tmp_path / 'images'}", latency=False))


def test_metadata_preprocess_wins(tiny, tmp_path):
    """The dataset is opened at the model's metadata input size with the metadata's normalization."""
    from calibration.datasets import open_dataset
    from eval.evaluate import dataset_for

    src = dataset_for(tiny[1], "fashion-mnist")
    assert src.preprocess == open_dataset("fashion-mnist", 32).preprocess
    m = onnx.load(str(tiny[1]))
    from compress.onnx.metadata import set_metadata

    pre = json.loads(next(p.value for p in m.metadata_props if p.key == "mnv3_compress.preprocess"))
    pre["mean"] = [0.5, 0.5, 0.5]
    set_metadata(m, {"preprocess": json.dumps(pre)})
    assert dataset_for(m, "fashion-mnist").preprocess.mean == (0.5, 0.5, 0.5)


def test_cli_eval_and_errors(tiny, tmp_path):
    import cli

    out = tmp_path / "r.json"
    res = CliRunner().invoke(cli.main, ["eval", str(tiny[1]), "--limit", "32", "--threads", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout)
    assert list(printed) == KEYS and json.loads(out.read_text()) == printed
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    res = CliRunner().invoke(cli.main, ["eval", str(bad)])
    assert res.exit_code == 1
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("Error: ")
