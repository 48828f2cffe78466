"""DDP training: 2 CPU processes under torchrun (gloo) write one checkpoint both ranks agree with; resume goes on.

The helpers are also checked in a single process, where they must change nothing.
"""
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

from calibration.datasets import open_dataset
from compress.errors import UserError
from compress.models.checkpoint import load_model, read_checkpoint
from compress.training import distributed
from compress.training.distributed import DistContext
from compress.training.train import evaluate

ROOT = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).with_name("ddp_worker.py")
TINY = ["--arch", "mobilenet_v3_small", "--width-mult", "0.5", "--input-size", "32", "--limit-train", "256",
        "--limit-test", "128", "--batch-size", "32", "--device", "cpu"]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    proc = _torchrun(str(WORKER), str(d), "train", *TINY, "--epochs", "1", "-o", str(d / "a.pt"))
    return d, proc


def test_one_checkpoint_with_the_weights_every_rank_holds(ddp_run):
    d, proc = ddp_run
    ck = read_checkpoint(d / "a.pt")
    ranks = [torch.load(d / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert set(ck["state_dict"]) == set(ranks[0]) == set(ranks[1])
    for k, v in ck["state_dict"].items():  # parameters and BN buffers alike
        assert torch.equal(v, ranks[0][k]) and torch.equal(v, ranks[1][k]), k
    untrained = load_model(None, "mobilenet_v3_small", 0.5, num_classes=10).model.state_dict()
    assert not torch.equal(ck["state_dict"]["classifier.3.weight"], untrained["classifier.3.weight"])
    # each rank trained on its half of the 256 images: 128 / 32 = 4 steps
    assert ck["epoch"] == 1 and ck["world_size"] == 2 and ck["steps_per_epoch"] == 4
    assert "world_size=2" in proc.stdout
    assert proc.stdout.count("test top-1") == 2  # rank 0 alone logs: one epoch line, one result line
    assert sorted(p.name for p in d.glob("*.pt")) == ["a.pt", "rank0.pt", "rank1.pt"]


def test_sharded_evaluation_equals_one_process(ddp_run):
    d, _ = ddp_run
    ck = read_checkpoint(d / "a.pt")
    single = evaluate(load_model(d / "a.pt").model, open_dataset("fashion-mnist", 32), limit=128)
    assert single["top1"] == ck["history"][-1]["test_top1"]
    assert single["loss"] == pytest.approx(ck["history"][-1]["test_loss"], rel=1e-5)


def test_resume_under_torchrun_continues_the_epoch_count(ddp_run):
    d, _ = ddp_run
    _torchrun("-m", "cli", "train", *TINY, "--resume", str(d / "a.pt"), "--epochs", "2", "-o", str(d / "b.pt"))
    ck = read_checkpoint(d / "b.pt")
    assert ck["epoch"] == 2 and [h["epoch"] for h in ck["history"]] == [1, 2]
    assert ck["history"][0] == read_checkpoint(d / "a.pt")["history"][0]


# -- single process: the helpers change nothing ---------------------------------------------------

def test_without_torchrun_a_single_process(monkeypatch):
    for k in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    with distributed.session("cpu") as ctx:
        assert not ctx.distributed and ctx.is_main and ctx.world_size == 1 and ctx.device.type == "cpu"
        assert distributed.all_reduce_sum([1.0, 2.5], ctx) == [1.0, 2.5]
        assert distributed.train_sampler(list(range(10)), ctx, 0) is None
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        assert distributed.wrap_model(model, ctx, sync_bn=True) is model  # nothing to synchronise
        assert distributed.launch_rank() == (0, 1, 0)
        assert distributed.from_main(ctx, lambda a, b=0: a + b, 1, b=2) == 3  # just called
        with pytest.raises(UserError, match="boom"):  # and its error is the caller's
            distributed.from_main(ctx, lambda: (_ for _ in ()).throw(UserError("boom")))


@pytest.mark.parametrize("value, ok", [("", True), ("30", True), ("0", False), ("soon", False)])
def test_process_group_timeout_from_the_environment(monkeypatch, value, ok):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, value)
    if ok:
        assert distributed._timeout() == ({"timeout": timedelta(seconds=30)} if value else {})
    else:
        with pytest.raises(UserError, match=distributed.TIMEOUT_ENV):
            distributed._timeout()


def test_device_choice():
    assert distributed.choose_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="device must be"):
        distributed.choose_device("tpu")
    if not torch.cuda.is_available():
        assert distributed.choose_device("auto") == torch.device("cpu")
        with pytest.raises(UserError, match="no CUDA"):
            distributed.choose_device("cuda")


def test_sync_bn_on_cpu_is_refused_under_ddp():
    ctx = DistContext(world_size=2, rank=0, backend="gloo")  # refused before any process group is needed
    with pytest.raises(UserError, match="--sync-bn needs CUDA"):
        distributed.wrap_model(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), ctx, sync_bn=True)


def test_sync_batchnorm_reverts_to_the_same_tensors():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.BatchNorm2d(4)))
    bn = model[1][0]
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(synced[1][0], nn.SyncBatchNorm)
    plain = distributed.unwrap_model(synced)
    back = plain[1][0]
    assert type(back) is nn.BatchNorm2d and back.weight is bn.weight and back.running_mean is bn.running_mean
