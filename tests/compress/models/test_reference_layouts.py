"""Our MobileNetV3 against torchvision's and timm's, through small golden files (no torchvision/timm here).

``tools/make_golden.py`` (run in a venv with torchvision and timm) fills every state_dict entry of each
reference model with :func:`synth_tensor` of its key and shape, runs :func:`synth_input` through it in eval
mode and writes ``tests/golden/<name>.json``: the state_dict layout, the parameter count and the logits.
These tests rebuild the same weights from the recorded layout, load them the way a user would
(``load_model`` on a saved file) and check the logits.  ``synth_*`` are the single definition of the
synthetic weights: ``make_golden.py`` reads them from this file, and each golden records a checksum of
them so that editing the formula without regenerating the goldens fails loudly.
"""
from __future__ import annotations

import functools
import json
import math
import sys
import zlib
from pathlib import Path
from typing import Any, Sequence

import pytest
import torch

_ROOT = Path(__file__).resolve().parents[3]
if str(_ROOT) not in sys.path:  # the repo is not installed; make `compress` importable under plain `pytest`
    sys.path.insert(0, str(_ROOT))

from compress.errors import UserError  # noqa: E402
from compress.models.checkpoint import load_model  # noqa: E402
from compress.models.mobilenetv3 import MobileNetV3, arch_spec, count_params  # noqa: E402
from compress.models.timm import timm_to_torchvision  # noqa: E402

GOLDEN_DIR = _ROOT / "tests" / "golden"

# ---- synthetic weights: integer hashing only (no RNG, no libm), so every torch version gives the same bits ----
_MASK = 2**31 - 1  # all products below stay under 2**62: int64 never overflows


def synth_uniform(key: str, n: int) -> torch.Tensor:
    """``n`` values in [-1, 1] from a hash of (key, index): float64, deterministic, not low-rank."""
    x = torch.arange(n, dtype=torch.int64).add_(zlib.crc32(key.encode()) & _MASK).bitwise_and_(_MASK)
    x.mul_(1103515245).add_(12345).bitwise_and_(_MASK)
    x.bitwise_xor_(x >> 13)
    x.mul_(1597334677).bitwise_and_(_MASK)
    x.bitwise_xor_(x >> 16)
    return x.to(torch.float64).mul_(2.0 / _MASK).sub_(1.0)


def synth_tensor(key: str, shape: Sequence[int]) -> torch.Tensor:
    """The value of state_dict entry ``key``: small weights, positive running_var, float32 (int64 counters)."""
    shape = tuple(int(s) for s in shape)
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
        return torch.zeros(shape, dtype=torch.int64)
    u = synth_uniform(key, math.prod(shape)).reshape(shape)
    if leaf == "running_var":
        v = 0.6 + 0.4 * u  # in [0.2, 1.0]: small enough that BN eps 1e-3 vs 1e-5 shows in the logits
    elif leaf in ("running_mean", "bias"):
        v = 0.02 * u
    elif len(shape) == 1:  # BN gamma
        v = 1.0 + 0.2 * u
    else:  # conv / linear weight, variance 0.95 / fan_in: activations stay O(0.01..10) through every model
        v = u * math.sqrt(3 * 0.95 / math.prod(shape[1:]))
    return v.to(torch.float32)


def synth_input(size: int = 64, batch: int = 2) -> torch.Tensor:
    return (2.0 * synth_uniform("input", batch * 3 * size * size)).reshape(batch, 3, size, size).to(torch.float32)


def synth_state_dict(layout: Sequence[tuple[str, Sequence[int]]]) -> "dict[str, torch.Tensor]":
    return {k: synth_tensor(k, s) for k, s in layout}


def synth_checksum(sd: "dict[str, torch.Tensor]") -> float:
    return float(sum(t.double().abs().sum() for t in sd.values()))


# ---- goldens ----
@functools.lru_cache(maxsize=None)
def _golden(name: str) -> dict[str, Any]:
    path = GOLDEN_DIR / f"{name}.json"
    if not path.exists():
        pytest.fail(f"{path.name} missing: run tools/make_golden.py with torchvision and timm installed")
    g = json.loads(path.read_text())
    g["layout"] = [(k, tuple(s)) for k, s in g["state_dict"]]
    return g


@functools.lru_cache(maxsize=None)
def _synth_for(name: str) -> "dict[str, torch.Tensor]":
    """The golden's weights (cached: read-only for the tests)."""
    g = _golden(name)
    sd = synth_state_dict(g["layout"])
    assert synth_checksum(sd) == pytest.approx(g["synth_checksum"], rel=1e-9), \
        "synth_tensor changed since the goldens were written: rerun tools/make_golden.py"
    return sd


def _logits(model: torch.nn.Module, size: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(synth_input(size))


def _assert_logits(out: torch.Tensor, expected: Sequence[Sequence[float]]) -> None:
    ref = torch.tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def _max_err(out: torch.Tensor, expected: Sequence[Sequence[float]]) -> float:
    return float((out - torch.tensor(expected, dtype=torch.float32)).abs().max())


TORCHVISION = ["mobilenet_v3_large", "mobilenet_v3_small", "mobilenet_v3_large_075", "mobilenet_v3_small_075"]
TIMM = ["mobilenetv3_large_100", "mobilenetv3_small_100", "mobilenetv3_large_075", "mobilenetv3_small_075"]
TIMM_TF_MINIMAL = ["tf_mobilenetv3_large_minimal_100", "tf_mobilenetv3_small_minimal_100"]


def test_synth_values_are_deterministic_and_sane() -> None:
    a, b = synth_tensor("features.0.0.weight", (16, 3, 3, 3)), synth_tensor("features.0.0.weight", (16, 3, 3, 3))
    assert torch.equal(a, b) and not torch.equal(a, synth_tensor("features.0.1.weight", (16, 3, 3, 3)))
    assert float(synth_tensor("x.running_var", (1000,)).min()) > 0.1
    w = synth_tensor("classifier.0.weight", (64, 48)).double()
    assert torch.linalg.matrix_rank(w) == 48  # not a structured (low-rank) pattern


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_layout_loads_unchanged_and_matches(name: str, tmp_path: Path) -> None:
    g = _golden(name)
    ours = MobileNetV3(arch_spec(g["arch"], g["width_mult"], num_classes=g["num_classes"]))
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == g["layout"]
    assert count_params(ours) == g["params"]

    path = tmp_path / "tv.pth"
    torch.save(_synth_for(name), path)  # a plain state_dict, as torchvision publishes them
    loaded = load_model(path)  # the architecture and width are read from the weights
    assert loaded.source == "torchvision"
    assert (loaded.spec.arch, loaded.spec.width_mult) == (g["arch"], g["width_mult"])
    assert loaded.spec.num_classes == g["num_classes"]  # inferred from classifier.3
    assert loaded.spec.bn_eps == pytest.approx(1e-3)
    _assert_logits(_logits(loaded.model), g["logits"])


@pytest.mark.parametrize("name", TIMM)
def test_timm_checkpoint_detected_mapped_and_matches(name: str, tmp_path: Path) -> None:
    g = _golden(name)
    path = tmp_path / "timm.pth"
    torch.save(_synth_for(name), path)
    loaded = load_model(path)
    assert loaded.source == "timm" and (loaded.spec.arch, loaded.spec.width_mult) == (g["arch"], g["width_mult"])
    assert loaded.spec.num_classes == g["num_classes"]
    assert loaded.spec.bn_eps == pytest.approx(1e-5)
    assert count_params(loaded.model) == g["params"]
    _assert_logits(_logits(loaded.model), g["logits"])


@pytest.mark.parametrize("name", ["mobilenetv3_large_100", "mobilenetv3_small_100"])
def test_timm_bn_eps_is_a_visible_difference(name: str) -> None:
    """The same timm weights with torchvision's BN eps (1e-3) miss timm's logits: the eps must be mapped."""
    g = _golden(name)
    sd = timm_to_torchvision(_synth_for(name))
    model = MobileNetV3(arch_spec(g["arch"], num_classes=g["num_classes"], bn_eps=1e-3))
    model.load_state_dict(sd)
    ref = torch.tensor(g["logits"])
    assert _max_err(_logits(model), g["logits"]) > 1e-3 * float(ref.abs().max())


@pytest.mark.parametrize("name", TIMM_TF_MINIMAL)
def test_timm_tf_minimal_matches_minimalistic(name: str) -> None:
    """timm's only minimal models are the ``tf_`` ports: BN eps 1e-3 and TF 'SAME' padding.

    Our ``minimalistic=True`` has their exact layout (ReLU stem and head, 3x3 kernels, no SE) and their
    outputs wherever SAME padding is symmetric (inputs of size 2**k + 1); at 64x64 SAME pads stride-2
    convs asymmetrically and the logits differ.  ``load_model`` cannot tell a ``tf_`` state_dict from a
    plain timm one, so it would use eps 1e-5: such checkpoints are not reproduced by ``load_model``.
    """
    g = _golden(name)
    sd = timm_to_torchvision(_synth_for(name))
    model = MobileNetV3(arch_spec(g["arch"], minimalistic=True, num_classes=g["num_classes"], bn_eps=1e-3))
    model.load_state_dict(sd)
    assert count_params(model) == g["params"]
    _assert_logits(_logits(model, g["odd_size"]), g["logits_odd"])
    ref = torch.tensor(g["logits"])
    assert _max_err(_logits(model), g["logits"]) > 1e-3 * float(ref.abs().max())  # SAME padding at 64x64


def test_options_that_contradict_the_weights_say_what_they_are(tmp_path: Path) -> None:
    path = tmp_path / "small.pth"
    torch.save(_synth_for("mobilenet_v3_small"), path)
    with pytest.raises(UserError, match=r"are mobilenet_v3_small width 1, 10 classes; --arch mobilenet_v3_large"):
        load_model(path, arch="mobilenet_v3_large")
    with pytest.raises(UserError, match="10 classes; --num-classes 1000 contradicts"):
        load_model(path, num_classes=1000)
    timm = tmp_path / "small_timm.pth"
    torch.save(_synth_for("mobilenetv3_small_100"), timm)
    with pytest.raises(UserError, match=r"are mobilenet_v3_small .*--arch mobilenet_v3_large contradicts"):
        load_model(timm, arch="mobilenet_v3_large")


IMAGENET = ["mobilenet_v3_large_1000", "mobilenet_v3_small_1000", "mobilenetv3_large_100_1000",
            "mobilenetv3_small_100_1000"]


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_checkpoints_export_with_only_weights(name: str, tmp_path: Path) -> None:
    """The four 1000-class checkpoints users bring (torchvision / timm Large and Small): ``mnv3-compress export
    --weights W --output m.onnx`` - no architecture, no dataset - reproduces the library's logits at 224, and the
    model's metadata records ImageNet's preprocessing (resize 256, center crop 224, ImageNet mean / std)."""
    import onnx
    import onnxruntime as ort
    from click.testing import CliRunner

    from calibration.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
    from cli import main
    from compress.onnx.metadata import get_metadata

    g = _golden(name)
    weights, out = tmp_path / "w.pth", tmp_path / "m.onnx"
    torch.save(_synth_for(name), weights)
    res = CliRunner().invoke(main, ["export", "--weights", str(weights), "--output", str(out)])
    assert res.exit_code == 0, res.output
    meta = get_metadata(onnx.load(str(out)))
    pre = Preprocess.from_json(meta["preprocess"])
    assert (pre.input_size, pre.resize, pre.mean, pre.std) == ((224, 224), 256, IMAGENET_MEAN, IMAGENET_STD)
    assert meta["arch"] == g["arch"] and meta["num_classes"] == "1000" and meta["dataset"] == "imagenet"
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = synth_input(g["input"][-1])
    _assert_logits(torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]), g["logits"])
