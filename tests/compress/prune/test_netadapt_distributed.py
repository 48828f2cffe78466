"""NetAdapt under torchrun: 2 CPU processes (gloo), a tiny budget, the CLI's prune on 600 Fashion-MNIST train images.

The launch runs ``tests/compress/prune/netadapt_ddp_worker.py`` (the CLI with the quick latency budget of
test_netadapt.py and per-rank probes): both ranks search in lockstep with data-parallel fine-tunes, rank 0 alone
times networks and writes the one result.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress.models.checkpoint import save_checkpoint
from compress.models.mobilenetv3 import MobileNetV3, arch_spec
from compress.training import distributed
from recipes.loader import load_recipe

ROOT = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).with_name("netadapt_ddp_worker.py")
OUTPUTS = {"model_fp32.onnx", "reference_fp32.onnx", "arch.json", "model.pt", "recipe.toml", "report.json",
           "report.md"}


@pytest.fixture(scope="module")
def ddp_prune(tmp_path_factory):
    d = tmp_path_factory.mktemp("netadapt-ddp")
    torch.manual_seed(0)
    seed = MobileNetV3(arch_spec("mobilenet_v3_small", width_mult=0.5, num_classes=10))
    weights = save_checkpoint(d / "seed.pt", seed, dataset="fashion-mnist", input_size=16)
    rec = load_recipe("netadapt").with_overrides("prune", target_latency_ratio=0.9, finetune_steps=1, batch_size=16,
                                                 eval_images=100, final_finetune_epochs=1, max_iterations=2)
    (d / "tiny.toml").write_text(rec.to_toml())
    (d / "dump").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MNV3_COMPRESS_HOME=str(d / "home"),
               **{distributed.TIMEOUT_ENV: "60"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(d / "dump"), "prune", "--recipe", str(d / "tiny.toml"), "--weights", str(weights), "--input-size",
           "16", "--limit-train", "600", "--limit-test", "100", "--device", "cpu", "-o", str(d / "out")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return d, proc


def test_completes_and_writes_one_result(ddp_prune):
    d, proc = ddp_prune
    assert {p.name for p in (d / "out").iterdir()} == OUTPUTS
    assert len(list((d / "home" / "latency").iterdir())) == 1  # one latency table file, rank 0's
    assert proc.stdout.count("speedup ") == 1 and proc.stdout.count("netadapt-fp32: top-1") == 1  # rank 0 prints
    report = json.loads((d / "out" / "report.json").read_text())
    assert report["netadapt"]["data_parallel"]["world_size"] == 2
    assert report["netadapt"]["data_parallel"]["global_batch"] == 32
    assert 2 <= len(report["trajectory"]) <= 3 and report["summary"]["params_pruned"] < report["summary"][
        "params_reference"]
    final = report["netadapt"]["final_finetune"]
    assert len(final) == 1 and final[0]["epoch"] == 1
    # 600 train images - 100 holdout = 500, shared by 2 ranks of 16 images per step
    assert "15 steps/epoch" in proc.stdout and "on 500 train images" in proc.stdout


def test_rank_0_times_and_every_rank_takes_the_same_decisions(ddp_prune):
    """Only rank 0 ran latency measurements; both ranks kept the same proposals (with the same holdout
    accuracy) and hold the same pruned, fine-tuned weights."""
    d, _ = ddp_prune
    r0, r1 = (torch.load(d / "dump" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["timings"] > 0 and r1["timings"] == 0
    assert r0["trajectory"] == r1["trajectory"] and len(r0["trajectory"]) >= 2
    report = json.loads((d / "out" / "report.json").read_text())
    assert [t["proposal"] for t in report["trajectory"]] == [p for p, _, _ in r0["trajectory"]]
    assert r0["history"] == r1["history"]
    assert r0["state_dict"].keys() == r1["state_dict"].keys()
    assert all(torch.equal(v, r1["state_dict"][k]) for k, v in r0["state_dict"].items())
