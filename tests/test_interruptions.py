"""Interrupted runs, untrusted checkpoints and reproducibility.

* A process killed (SIGKILL) in the middle of writing an output never leaves a partial file under the output's
  name: outputs are written to a temp file beside the target and renamed onto it when complete.  What a kill
  can leave behind is that hidden temp file, always named ``.NAME.<random>.tmp`` (NAME = the target's file
  name), safe to delete; an earlier complete version of the target stays untouched.
* Ctrl-C during ``mnv3-compress train`` exits with 130 and keeps the last complete epoch's checkpoint.
* A checkpoint whose pickle would run code is refused with one line and never executed.
* Same seed and data give bit-identical float weights, and the same float model a bit-identical int8 model.

``MNV3_COMPRESS_HOME`` points into tmp_path in every test: nothing here may train the embedded default.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli import main
from compress.io import atomic_path
from compress.models.checkpoint import load_model, read_checkpoint, save_checkpoint
from compress.models.mobilenetv3 import mobilenet_v3_small

ROOT = Path(__file__).resolve().parents[1]
TEMP_NAME = r"\.{name}\.[^/]+\.tmp"  # what an interrupted write can leave: a hidden .NAME.<random>.tmp


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("MNV3_COMPRESS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "MNV3_COMPRESS_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _tiny_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(path, mobilenet_v3_small(width_mult=0.5, num_classes=10), input_size=32,
                           dataset="fashion-mnist")


# -- SIGKILL in the middle of a write -------------------------------------------------------------------

# Writes 8 MiB of a 16 MiB output, prints the temp path, then stalls until it is killed.  "write_bytes" goes
# through compress.io.write_bytes with Path.write_bytes slowed down to stall halfway; "atomic_path" writes
# into the temp path itself.
_WRITER = r"""
import pathlib, sys, time
from compress import io
how, target = sys.argv[1], sys.argv[2]
half = b"\xab" * (8 << 20)

def stall(f, where):
    f.write(half)
    f.flush()
    print(where, flush=True)
    time.sleep(120)
    f.write(half)

if how == "write_bytes":
    def slow_write_bytes(self, data):
        with open(self, "wb") as f:
            stall(f, self)
    pathlib.Path.write_bytes = slow_write_bytes
    io.write_bytes(target, half + half)
else:
    with io.atomic_path(target) as tmp, open(tmp, "wb") as f:
        stall(f, tmp)
"""


@pytest.mark.parametrize("previous", [None, b"the previous complete version\n"], ids=["new", "replace"])
@pytest.mark.parametrize("how", ["write_bytes", "atomic_path"])
def test_killed_mid_write_leaves_no_partial_file(tmp_path, how, previous):
    out = tmp_path / "out"
    out.mkdir()
    target = out / "model_int8.onnx"
    if previous is not None:
        target.write_bytes(previous)
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, how, str(target)], stdout=subprocess.PIPE,
                            env=_env(tmp_path), text=True)
    try:
        tmp = Path(proc.stdout.readline().strip())  # the writer is now stalled halfway through
        assert tmp.parent == out and tmp.stat().st_size == 8 << 20
        assert re.fullmatch(TEMP_NAME.format(name=re.escape(target.name)), tmp.name), tmp.name
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    if previous is None:
        assert not target.exists()
    else:
        assert target.read_bytes() == previous  # the old complete file, untouched
    leftovers = [p.name for p in out.iterdir() if p.name != target.name]
    assert leftovers == [tmp.name]  # only the hidden temp file: never the target's name, never a partial
    assert all(re.fullmatch(TEMP_NAME.format(name=re.escape(target.name)), n) for n in leftovers)


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_an_exception_mid_write_leaves_nothing(tmp_path, error):
    target = tmp_path / "report.json"
    with pytest.raises(error):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b'{"half": ')
            raise error()
    assert not list(tmp_path.iterdir())


# -- Ctrl-C during training -----------------------------------------------------------------------------

def test_ctrl_c_during_training_keeps_the_last_complete_checkpoint(tmp_path):
    ckpt = tmp_path / "run" / "ck.pt"
    # a shell that starts CI in the background makes children ignore SIGINT; restore Python's handler so the
    # test sees what a user's Ctrl-C does
    boot = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); from cli import main; main()"
    cmd = [sys.executable, "-c", boot, "train", "--width-mult", "0.5",
           "--input-size", "32", "--limit-train", "128", "--limit-test", "64", "--batch-size", "32",
           "--epochs", "500", "--device", "cpu", "-o", str(ckpt)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(tmp_path), text=True)
    try:
        deadline = time.monotonic() + 90
        while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ckpt.exists(), "no checkpoint after the first epoch"
        proc.send_signal(signal.SIGINT)  # during a later epoch (or while writing its checkpoint)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.rstrip().splitlines()[-1].startswith("Interrupted: stopped cleanly")
    ck = read_checkpoint(ckpt)  # complete and loadable
    assert 1 <= ck["epoch"] < 500 and len(ck["history"]) == ck["epoch"]
    assert "optimizer" in ck and "scheduler" in ck  # --resume can continue it
    assert load_model(ckpt).spec.width_mult == 0.5
    assert [p.name for p in ckpt.parent.iterdir()] == ["ck.pt"]  # no temp file left behind


# -- untrusted checkpoints ------------------------------------------------------------------------------

class _Evil:
    """Unpickling this runs a shell command (``os.system``): the classic malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("command", ["export", "train", "quantize"])
def test_malicious_checkpoint_is_refused_and_never_executed(tmp_path, command, zip_format):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"features.0.0.weight": _Evil(marker)}, "arch": "mobilenet_v3_small"}, evil,
               _use_new_zipfile_serialization=zip_format)
    out = tmp_path / "out"
    args = {"export": ["export", "--weights", evil, "-o", out / "m.onnx"],
            "train": ["train", "--resume", evil, "-o", out / "ck.pt"],
            "quantize": ["quantize", "--weights", evil, "-o", out]}[command]
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert not marker.exists(), "the checkpoint's code ran"
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: refusing to load {evil}"), result.stderr
    assert "posix.system" in lines[0]
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


def test_the_malicious_checkpoint_is_live(tmp_path):
    """The refusal above is meaningful: the same file does run its payload under weights_only=False."""
    marker = tmp_path / "PWNED"
    torch.save({"state_dict": _Evil(marker)}, tmp_path / "evil.pt")
    subprocess.run([sys.executable, "-c", "import sys, torch; torch.load(sys.argv[1], weights_only=False)",
                    str(tmp_path / "evil.pt")], env=_env(tmp_path), check=True, timeout=60)
    assert marker.exists()


# -- determinism ----------------------------------------------------------------------------------------

def test_same_seed_same_float_weights(tmp_path):
    from compress.training.train import TrainConfig, train

    cfg = TrainConfig(epochs=1, batch_size=32, limit_train=64, limit_test=32, seed=3)
    for name in ("a.pt", "b.pt"):
        train(arch="mobilenet_v3_small", width_mult=0.5, input_size=32, output=tmp_path / name, config=cfg,
              progress=False, device="cpu")
    sa, sb = (read_checkpoint(tmp_path / n)["state_dict"] for n in ("a.pt", "b.pt"))
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    other = TrainConfig(epochs=1, batch_size=32, limit_train=64, limit_test=32, seed=4)
    train(arch="mobilenet_v3_small", width_mult=0.5, input_size=32, output=tmp_path / "c.pt", config=other,
          progress=False, device="cpu")
    sc = read_checkpoint(tmp_path / "c.pt")["state_dict"]
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)  # the seed matters: the check above can fail


def test_same_float_model_same_int8_model(tmp_path):
    from compress.quant.pipeline import quantize

    weights = _tiny_checkpoint(tmp_path / "tiny.pt")
    models = []
    for run in ("a", "b"):
        quantize("int8", weights=weights, dataset="fashion-mnist", input_size=32, calibration_size=32,
                 output_dir=tmp_path / run, eval_limit=16, latency=False, progress=False)
        models.append({n: (tmp_path / run / n).read_bytes() for n in ("model_fp32.onnx", "model_int8.onnx")})
    assert models[0]["model_fp32.onnx"] == models[1]["model_fp32.onnx"]
    assert models[0]["model_int8.onnx"] == models[1]["model_int8.onnx"]
