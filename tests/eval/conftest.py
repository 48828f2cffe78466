"""Fixtures for the evaluator tests: a tiny MobileNetV3 exported at 32x32."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from any directory without installing the package
    sys.path.insert(0, str(ROOT))

from eval_helpers import tiny_torch_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(torch model, path of its fp32 ONNX export at 32x32 with Fashion-MNIST preprocessing)."""
    from calibration.datasets import open_dataset
    from compress.onnx.export import export_onnx

    model = tiny_torch_model()
    path = export_onnx(model, tmp_path_factory.mktemp("tiny") / "tiny_fp32.onnx",
                       open_dataset("fashion-mnist", 32).preprocess)
    return model, path


