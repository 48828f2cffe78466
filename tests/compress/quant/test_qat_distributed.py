"""QAT under torchrun: 2 CPU processes (gloo) on 256 Fashion-MNIST train images, through the CLI's quantize.

Every launch runs ``tests/compress/quant/qat_ddp_worker.py``: the CLI unchanged, plus probes that record each
rank's quantization state at the freeze points and at the end.  The start model is the tiny model of
tests/compress/quant/tiny_trained.py at width 0.5 (no dropout).  Recipe: 2 epochs of 16 images per process
(8 steps of 32 per epoch), BN statistics frozen at step 4 (epoch 0.5), observers at step 12 (epoch 1.5).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from calibration.datasets import open_dataset
from compress.models.checkpoint import load_model, read_checkpoint, save_checkpoint
from compress.quant.qat import prepare_qat
from compress.training import distributed
from recipes.loader import load_recipe
from tests.compress.quant.tiny_trained import SIZE, ort_session, train_tiny

ROOT = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).with_name("qat_ddp_worker.py")
DATA = ["--limit-train", "256", "--limit-test", "200", "--device", "cpu"]
OUTPUTS = {"model_fp32.onnx", "model_int8.onnx", "qat_checkpoint.pt", "recipe.toml", "report.json", "report.md"}
# one process on the same global batches as two: what may differ is float rounding (the gradient mean taken in
# two halves, other conv kernels for a smaller batch); measured here: 5e-7 on weights, 1e-7 relative on scales
WEIGHT_ATOL, SCALE_RTOL, MIN_INT8_AGREEMENT = 1e-5, 1e-5, 0.995


def _launch(dump: Path, recipe: Path, out: Path, weights: Path, nproc: int | None = 2, *extra: str,
            env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """The CLI's quantize under torchrun with ``nproc`` processes (None: one plain process, no torchrun)."""
    dump.mkdir(parents=True, exist_ok=True)
    e = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_ENV}
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **{distributed.TIMEOUT_ENV: "60"}, **(env or {}))
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                                         *extra]
    cmd = [sys.executable, *launcher, str(WORKER), str(dump), "quantize", "--recipe", str(recipe), "--weights",
           str(weights), *DATA, "-o", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=180)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """(start checkpoint, recipe paths): the recipe with the freeze schedule, and the 'same math' pair."""
    d = tmp_path_factory.mktemp("qat-ddp-start")
    model = train_tiny(open_dataset("fashion-mnist", SIZE), width_mult=0.5)
    weights = save_checkpoint(d / "tiny.pt", model, input_size=SIZE, dataset="fashion-mnist")
    rec = load_recipe("int8-qat").with_overrides("qat", epochs=2, batch_size=16, limit_test=64, freeze_bn_epochs=0.5,
                                                 freeze_observers_epochs=1.5, compare_ptq=False,
                                                 min_onnx_agreement=0.9)
    # what a process computes alone on its share equals its part of the global batch's computation once BN
    # uses its running statistics (frozen from step 0), augmentation is off and the model has no dropout
    same = rec.with_overrides("qat", freeze_bn_epochs=0.0, hflip=False, pad_crop=0)
    recipes = {"schedule": rec, "same16": same, "same32": same.with_overrides("qat", batch_size=32)}
    paths = {}
    for name, r in recipes.items():
        paths[name] = d / f"{name}.toml"
        paths[name].write_text(r.to_toml())
    return weights, paths


@pytest.fixture(scope="module")
def ddp_run(start, tmp_path_factory):
    weights, recipes = start
    d = tmp_path_factory.mktemp("qat-ddp")
    proc = _launch(d / "dump", recipes["schedule"], d / "out", weights)
    return d / "out", d / "dump", proc


def _load(path: Path):
    return torch.load(path, weights_only=True)


def test_only_rank_0_exports_writes_and_prints(ddp_run):
    out, _, proc = ddp_run
    assert {p.name for p in out.iterdir()} == OUTPUTS  # no temp file, nothing of another rank's
    for line in ("world_size=2 backend=gloo", "epoch 2/2: train loss", "    int8: top-1", "QAT: fake-quant torch",
                 "report: "):
        assert proc.stdout.count(line) == 1, (line, proc.stdout)  # rank 1 prints nothing
    report = json.loads((out / "report.json").read_text())
    dp = report["qat"]["data_parallel"]
    assert dp["world_size"] == 2 and dp["backend"] == "gloo" and dp["global_batch"] == 32
    assert [h["epoch"] for h in report["qat"]["history"]] == [1, 2]
    assert report["qat"]["freeze_events"] == ["BN statistics frozen at step 4", "observers frozen at step 12"]
    ck = read_checkpoint(out / "qat_checkpoint.pt")
    assert ck["epoch"] == 2 and ck["world_size"] == 2 and ck["steps_per_epoch"] == 8  # 256 / 2 ranks / 16
    assert "Trained as DistributedDataParallel on 2 processes" in (out / "report.md").read_text()


def test_every_rank_holds_the_same_quantization_state_at_the_freeze_points(ddp_run):
    """Observer ranges agree on every rank before anything is synchronised at a freeze point (they are
    all-reduced after every update); BN statistics, which each rank updates from its own batch, differ until
    the freeze point's broadcast, after which every buffer and weight is the same on both ranks."""
    _, dump, _ = ddp_run
    log0, log1 = _load(dump / "freeze0.pt"), _load(dump / "freeze1.pt")
    assert [s for s, _, _ in log0] == [s for s, _, _ in log1] == [4, 12]
    for (step, before0, after0), (_, before1, after1) in zip(log0, log1):
        observed = [k for k in before0 if k.endswith(("min_val", "max_val", "scale", "zero_point"))]
        assert len(observed) > 200, step
        for k in observed:
            assert torch.equal(before0[k], before1[k]), (step, k)
        for k in after0:
            assert torch.equal(after0[k], after1[k]), (step, k)
    bn = [k for k in log0[0][1] if k.endswith(("running_mean", "running_var"))]
    assert bn and sum(not torch.equal(log0[0][1][k], log1[0][1][k]) for k in bn) > len(bn) // 2
    final0, final1 = _load(dump / "final0.pt"), _load(dump / "final1.pt")
    assert final0.keys() == final1.keys() and all(torch.equal(final0[k], final1[k]) for k in final0)


def test_observer_ranges_are_the_global_batchs(ddp_run):
    """The ranks saw different images (their local ranges differ); the all-reduce leaves both with the minimum
    of the minima and the maximum of the maxima."""
    _, dump, _ = ddp_run
    r0, r1 = _load(dump / "ranges0.pt"), _load(dump / "ranges1.pt")
    assert len(r0) == len(r1) == 40
    assert sum(not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])) for a, b in zip(r0, r1)) > 20
    for (lo0, hi0, min0, max0), (lo1, hi1, min1, max1) in zip(r0, r1):
        assert torch.equal(min0, torch.minimum(lo0, lo1)) and torch.equal(max0, torch.maximum(hi0, hi1))
        assert torch.equal(min0, min1) and torch.equal(max0, max1)


def test_int8_model_has_rank_0s_scales(ddp_run, start):
    """Every activation QuantizeLinear of the int8 ONNX carries the scale and zero point of rank 0's fake-quant
    model, and every weight's scales are that model's weight fake-quant scales."""
    out, dump, _ = ddp_run
    weights, recipes = start
    rec = load_recipe(recipes["schedule"])
    qm = prepare_qat(load_model(weights).model, rec.quantize, rec.qat)
    qm.load_state_dict(_load(dump / "final0.pt"))
    mods = dict(qm.named_modules())
    model = onnx.load(str(out / "model_int8.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    by_tensor = {s.tensors[0]: mods[s.module] for s in qm.sites}
    checked = 0
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in by_tensor:
            fq = by_tensor[n.input[0]]
            fixed = isinstance(fq, torch.ao.quantization.FixedQParamsFakeQuantize)
            scale, zp = fq.calculate_qparams() if fixed else (fq.scale, fq.zero_point)
            assert float(inits[n.input[1]]) == pytest.approx(float(scale), rel=1e-6), n.input[0]
            assert int(inits[n.input[2]]) == int(zp), n.input[0]
            checked += 1
    assert checked >= len(qm.sites) - 2
    producers = {o: n for n in model.graph.node for o in n.output}
    nodes = {n.name: n for n in model.graph.node}
    for ws in qm.weight_sites:
        scales = inits[producers[nodes[ws.node].input[1]].input[1]].reshape(-1)
        expected = mods[ws.module].weight_fake_quant.scale.numpy().reshape(-1)
        np.testing.assert_allclose(scales[:expected.size], expected, rtol=1e-6, err_msg=ws.node)


def test_agrees_with_one_process_on_the_same_global_batch(start, tmp_path):
    """2 processes x 16 images and 1 process x 32 images, the same 32 images in every step: the same QAT model
    within float rounding (WEIGHT_ATOL on weights and BN statistics, SCALE_RTOL on every observer range and
    scale, equal zero points), and int8 models that predict the same class."""
    weights, recipes = start
    _launch(tmp_path / "ddp", recipes["same16"], tmp_path / "ddp-out", weights)
    _launch(tmp_path / "one", recipes["same32"], tmp_path / "one-out", weights, None,
            env={"QAT_PROBE_GLOBAL_ORDER": "1"})
    ddp, one = _load(tmp_path / "ddp" / "final0.pt"), _load(tmp_path / "one" / "final0.pt")
    steps = [read_checkpoint(tmp_path / d / "qat_checkpoint.pt")["steps_per_epoch"] for d in ("ddp-out", "one-out")]
    assert steps == [8, 8]
    assert ddp.keys() == one.keys()
    for k, a in ddp.items():
        b = one[k]
        if not a.dtype.is_floating_point:
            assert torch.equal(a, b), k  # zero points, enable flags, BN batch counts
        elif k.endswith(("min_val", "max_val", "scale")):
            torch.testing.assert_close(a, b, rtol=SCALE_RTOL, atol=0, msg=k)
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=WEIGHT_ATOL, msg=k)
    start_sd = load_model(weights).model.state_dict()
    moved = max((ddp[k] - v).abs().max().item() for k, v in start_sd.items()
                if k.endswith(".weight") and k in ddp and ddp[k].shape == v.shape)
    assert moved > 10 * WEIGHT_ATOL  # training moved the weights far more than the two runs differ
    x = np.concatenate([b for b, _ in open_dataset("fashion-mnist", SIZE).numpy_batches("test", 500, limit=1000)])
    preds = [ort_session(onnx.load(str(tmp_path / d / "model_int8.onnx"))).run(None, {"input": x})[0].argmax(1)
             for d in ("ddp-out", "one-out")]
    assert (preds[0] == preds[1]).mean() >= MIN_INT8_AGREEMENT


def test_interrupted_and_resumed_under_torchrun(ddp_run, start, tmp_path):
    """Stopped on every rank at the first step of epoch 2 (after the BN freeze), then the same command again:
    it resumes from rank 0's checkpoint, reaches epoch 2 and ends where the uninterrupted run ended."""
    weights, recipes = start
    out = tmp_path / "out"
    stopped = _launch(tmp_path / "stopped", recipes["schedule"], out, weights, env={"QAT_PROBE_STOP_AT_STEP": "8"},
                      check=False)
    assert stopped.returncode != 0
    assert {p.name for p in out.iterdir()} == {"qat_checkpoint.pt"}
    first = read_checkpoint(out / "qat_checkpoint.pt")
    assert first["epoch"] == 1
    _launch(tmp_path / "resumed", recipes["schedule"], out, weights)
    qat = json.loads((out / "report.json").read_text())["qat"]
    assert qat["resumed_from_epoch"] == 1 and [h["epoch"] for h in qat["history"]] == [1, 2]
    assert qat["history"][0] == first["history"][0]
    assert qat["freeze_events"] == ["BN statistics frozen at step 4 (re-applied at step 8 on resume)",
                                    "observers frozen at step 12"]
    resumed, straight = _load(tmp_path / "resumed" / "final0.pt"), _load(ddp_run[1] / "final0.pt")
    for k, v in resumed.items():
        torch.testing.assert_close(v, straight[k], rtol=0, atol=1e-6, msg=k)


def test_a_failing_rank_stops_every_rank(start, tmp_path):
    """Rank 1 fails at step 2: torchrun stops rank 0 too, long before the process group's timeout, and rank 1's
    own stderr has its one-line error; nothing is exported."""
    weights, recipes = start
    t = time.time()
    proc = _launch(tmp_path / "dump", recipes["schedule"], tmp_path / "out", weights, 2, "--log-dir",
                   str(tmp_path / "logs"), "--redirects", "3", env={"QAT_PROBE_FAIL": "1:2"}, check=False)
    assert proc.returncode != 0 and time.time() - t < 50
    assert not (tmp_path / "out" / "model_int8.onnx").exists()
    logs = {p.parent.name: p.read_text().replace("\r", "\n") for p in (tmp_path / "logs").rglob("stderr.log")}
    assert "Error: probe: rank 1 fails at step 2" in logs["1"].splitlines()
