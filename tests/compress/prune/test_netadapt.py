"""NetAdapt: holdout from the train split, proposals that cut at least delta, the two selection rules, and a
tiny end-to-end run whose outputs rebuild the pruned network from its architecture JSON."""
import gzip
import json
import struct

import numpy as np
import onnxruntime as ort
import pytest
import torch

from compress.models.mobilenetv3 import ArchSpec, arch_spec
from compress.prune.channels import channel_groups, pruned_spec, structure_problems
from compress.prune.netadapt import holdout_split, propose, select


def test_holdout_and_finetune_pool_partition_the_train_split():
    hold, pool = holdout_split(1000, 100, seed=3)
    assert len(hold) == 100 and len(pool) == 900
    assert sorted(np.concatenate([hold, pool]).tolist()) == list(range(1000))
    again, _ = holdout_split(1000, 100, seed=3)
    assert np.array_equal(hold, again)


class FakeTable:
    """Latency = sum of channel counts (as if every channel cost the same): deterministic, no timing."""

    def measure(self, units):
        pass

    def missing(self, specs):
        return []

    def predict(self, spec: ArchSpec) -> float:
        return float(sum(b.expanded + b.out_ch for b in spec.blocks) + spec.stem_channels + spec.last_conv
                     + spec.last_channel)


def test_each_proposal_is_the_smallest_cut_saving_delta():
    spec = arch_spec("mobilenet_v3_small", num_classes=10)
    table = FakeTable()
    base = table.predict(spec)
    proposals = propose(spec, table, delta_ms=20.0)
    names = {g.name for g in channel_groups(spec)}
    assert proposals and {p["group"] for p in proposals} <= names
    for p in proposals:
        before, after = p["channels"]
        assert after % 8 == 0 and after >= 8 and after < before
        assert p["saved_ms"] == pytest.approx(base - table.predict(p["spec"])) and p["saved_ms"] >= 20.0
        assert not structure_problems(spec, p["spec"])
        # one step of 8 channels less would not have saved delta (or would break the structure)
        if after + 8 < before:
            s = pruned_spec(spec, {p["group"]: after + 8})
            assert structure_problems(spec, s) or base - table.predict(s) < 20.0
    # the hidden classifier (1024, one slot) needs 3 steps of 8 to save 20
    hidden = next(p for p in proposals if p["group"] == "hidden:classifier.0")
    assert hidden["channels"] == [1024, 1000]


def test_selection_rules_differ():
    proposals = [{"top1": 0.90, "loss": 0.3, "saved_ms": 1.0},  # drops 1 pt for 1 ms
                 {"top1": 0.88, "loss": 0.4, "saved_ms": 4.0}]  # drops 3 pt for 4 ms: better per ms
    assert select(proposals, "ratio", reference_top1=0.91) == 1
    assert select(proposals, "min_drop", reference_top1=0.91) == 0
    tie = [{"top1": 0.9, "loss": 0.5, "saved_ms": 1.0}, {"top1": 0.9, "loss": 0.4, "saved_ms": 1.0}]
    assert select(tie, "min_drop", 0.9) == 1  # lower holdout loss breaks the tie


def test_finetunes_take_the_start_models_training_settings(monkeypatch):
    """A start model trained without random crops is fine-tuned without them; a checkpoint that records no
    training recipe (torchvision, timm) gets TrainConfig's defaults."""
    import compress.prune.netadapt as na
    from compress.training.train import TrainConfig

    mine = na.finetune_settings({"train_config": {**TrainConfig().__dict__, "pad_crop": 0, "bn_momentum": 0.05}})
    assert mine["pad_crop"] == 0 and mine["bn_momentum"] == 0.05 and mine["from"].startswith("the start model")
    assert na.finetune_settings({})["pad_crop"] == TrainConfig().pad_crop == 2
    seen = []
    monkeypatch.setattr(na, "fit", lambda model, source, cfg, **kw: seen.append(cfg) or
                        {"final": {"test_top1": 0.5, "test_loss": 1.0}})
    monkeypatch.setattr(na, "_subsource", lambda source, train, holdout: source)
    from compress.training.distributed import DistContext

    na._finetune(torch.nn.Linear(1, 1), None, np.arange(100), np.arange(10), 2, 8, 1e-4, 0, 0, DistContext(), mine)
    assert seen[0].pad_crop == 0 and seen[0].bn_momentum == 0.05 and seen[0].hflip == mine["hflip"]


def _fake_fashion_mnist(root, n_train=600, n_test=200):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        imgs = (rng.integers(0, 60, (n, 28, 28)) + labels[:, None, None] * 19).astype(np.uint8)  # learnable
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", n, 28, 28) + imgs.tobytes())
        with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", n) + labels.tobytes())


def test_tiny_end_to_end_run(tmp_path, monkeypatch):
    import compress.prune.netadapt as na
    from compress.models.checkpoint import load_model, save_checkpoint
    from compress.models.mobilenetv3 import MobileNetV3
    from compress.prune.channels import rebuild
    from compress.prune.latency_table import LatencyTable

    data = tmp_path / "fmnist"
    data.mkdir()
    _fake_fashion_mnist(data)
    monkeypatch.setenv("MNV3_COMPRESS_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(na, "CANDIDATE_DEPTH", 2)
    monkeypatch.setattr(na, "MEASURE_ROUNDS", 2)
    monkeypatch.setattr("compress.prune.outputs.FINAL_ROUNDS", 2)

    class QuickTable(LatencyTable):
        def __init__(self, *a, **k):
            super().__init__(*a, **{**k, "rounds": 1, "round_time_s": 0.002})

    monkeypatch.setattr(na, "LatencyTable", QuickTable)
    torch.manual_seed(0)
    seed = MobileNetV3(arch_spec("mobilenet_v3_small", width_mult=0.5, num_classes=10))
    save_checkpoint(tmp_path / "seed.pt", seed, dataset="fashion-mnist", input_size=16)
    r = na.prune("netadapt", weights=str(tmp_path / "seed.pt"), dataset=f"fashion-mnist:{data}", input_size=16,
                 output_dir=tmp_path / "out", eval_limit=100, progress=False, target_latency_ratio=0.9,
                 finetune_steps=1, batch_size=16, eval_images=100, final_finetune_epochs=0, max_iterations=2)
    out = tmp_path / "out"
    for name in ("model_fp32.onnx", "reference_fp32.onnx", "arch.json", "model.pt", "recipe.toml", "report.json",
                 "report.md"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    traj = report["trajectory"]
    assert 2 <= len(traj) <= 3 and traj[0]["iteration"] == 0 and traj[0]["proposal"] is None
    for p in traj[1:]:
        assert p["proposal"] and p["latency_ms"]["median"] > 0 and 0 <= p["top1"] <= 1 and p["proposals"]
    assert [v["name"] for v in report["variants"]] == ["fp32", "netadapt-fp32"]
    assert report["variants"][0]["is_reference"] and report["variants"][1]["params"] < report["variants"][0]["params"]
    assert report["latency_table"]["trajectory"]["networks"] == len(traj)
    assert report["summary"]["params_pruned"] < report["summary"]["params_reference"]
    # the pruned network, rebuilt from arch.json + the checkpoint's weights, is what model_fp32.onnx computes
    ckpt = load_model(out / "model.pt")
    rebuilt = rebuild(out / "arch.json", ckpt.model.state_dict()).eval()
    assert rebuilt.spec == ArchSpec.from_dict(traj[-1]["spec"]) == ckpt.spec
    x = torch.randn(2, 3, 16, 16)
    sess = ort.InferenceSession(str(out / "model_fp32.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], rebuilt(x).numpy(), rtol=1e-4,
                                   atol=1e-4)
    assert r["output_dir"] == str(out)


@pytest.mark.slow
def test_netadapt_int8_quantizes_the_pruned_network(tmp_path, monkeypatch):
    import compress.prune.netadapt as na
    from compress.models.checkpoint import save_checkpoint
    from compress.models.mobilenetv3 import MobileNetV3

    data = tmp_path / "fmnist"
    data.mkdir()
    _fake_fashion_mnist(data)
    monkeypatch.setenv("MNV3_COMPRESS_HOME", str(tmp_path / "home"))
    for k, v in (("CANDIDATE_DEPTH", 2), ("MEASURE_ROUNDS", 2)):
        monkeypatch.setattr(na, k, v)
    monkeypatch.setattr("compress.prune.outputs.FINAL_ROUNDS", 2)
    torch.manual_seed(0)
    seed = MobileNetV3(arch_spec("mobilenet_v3_small", width_mult=0.5, num_classes=10))
    save_checkpoint(tmp_path / "seed.pt", seed, dataset="fashion-mnist", input_size=16)
    r = na.prune("netadapt-int8", weights=str(tmp_path / "seed.pt"), dataset=f"fashion-mnist:{data}",
                 input_size=16, output_dir=tmp_path / "out", eval_limit=100, progress=False,
                 target_latency_ratio=0.95, finetune_steps=1, batch_size=16, eval_images=100,
                 final_finetune_epochs=0, max_iterations=1)
    out = tmp_path / "out"
    assert [v["name"] for v in r["variants"]] == ["fp32", "netadapt-fp32", "int8", "netadapt-int8"]
    assert (out / "int8" / "model_int8.onnx").is_file() and (out / "int8" / "report.json").is_file()
    int8 = json.loads((out / "int8" / "report.json").read_text())
    ref = json.loads((out / "int8-reference" / "report.json").read_text())
    # the int8 recipe ran on the pruned network, and on the unpruned one for the baseline
    assert int8["variants"][0]["params"] == r["summary"]["params_pruned"]
    assert ref["variants"][0]["params"] == r["summary"]["params_reference"]
    assert all(v["latency_ms"]["median"] > 0 for v in r["variants"])
    s = r["summary"]
    assert s["int8_speedup"] == pytest.approx(r["variants"][2]["latency_ms"]["median"]
                                              / r["variants"][3]["latency_ms"]["median"], rel=1e-3)
    assert r["latency_table"]["timing"] == "ort-x86-int8" and r["latency_table"]["channel_step"] == 16


def test_the_stop_is_decided_by_a_longer_measurement_once_the_prediction_is_there():
    """A quick measurement that happens to land under the target does not end the search: once the table's
    prediction reaches the target, a CONFIRM_FACTOR x longer measurement replaces it (and only then)."""
    import types

    import compress.prune.netadapt as na

    calls = []
    quick, confirmed = (0.50, 1.0), (0.68, 1.0)  # (current, seed) medians: quick 0.50x, confirmed 0.68x

    def measure_pair(cur_bytes, rounds=None):
        calls.append(rounds or na.MEASURE_ROUNDS)
        cur, seed = quick if rounds is None else confirmed
        return {"median": seed}, {"median": cur}

    search = na._Search.__new__(na._Search)
    search.cfg = types.SimpleNamespace(target_latency_ratio=0.6)
    search.measured_stop = True
    search.measure_pair = measure_pair

    seed, cur, conf = search.measure_current(b"net", pred_ratio=0.7)  # prediction not there: the quick one stands
    assert conf is None and calls == [na.MEASURE_ROUNDS] and cur["median"] / seed["median"] == 0.5
    assert not search.reached(0.5, 0.7)

    calls.clear()
    seed, cur, conf = search.measure_current(b"net", pred_ratio=0.58)
    assert calls == [na.MEASURE_ROUNDS, na.CONFIRM_FACTOR * na.MEASURE_ROUNDS]
    assert conf == {"rounds": na.CONFIRM_FACTOR * na.MEASURE_ROUNDS, "quick_ratio": 0.5}
    ratio = cur["median"] / seed["median"]
    assert ratio == 0.68 and not search.reached(ratio, 0.58)  # the quick 0.50x alone would have stopped it
    assert search.reached(0.5, 0.58)

    calls.clear()
    search.measured_stop = False  # a device table: its prediction decides, nothing to confirm here
    assert search.measure_current(b"net", pred_ratio=0.58)[2] is None and calls == [na.MEASURE_ROUNDS]


def test_delta_halves_when_no_group_can_save_it_before_the_search_gives_up():
    """Late in a search no group may save delta any more: the step halves (at most DELTA_HALVINGS times) and
    the same iteration is proposed again; only when even delta / 2**DELTA_HALVINGS finds nothing does it stop."""
    import types

    import compress.prune.netadapt as na

    def make(smallest_saving_ms, iterations_possible):
        search = na._Search.__new__(na._Search)
        search.cfg = types.SimpleNamespace(max_iterations=10, target_latency_ratio=0.1)
        search.progress, search.measured_stop, search.timings = False, True, {}
        search.delta_ms, search.halvings, search.stop, search.cur_acc = 0.04, 0, "max_iterations", {"top1": 0.9}
        search.table = types.SimpleNamespace(close=lambda: None)
        tried = []

        def iteration(it):
            tried.append((it, search.delta_ms))
            if search.delta_ms > smallest_saving_ms or len({i for i, _ in tried}) > iterations_possible:
                return None
            return {"latency_ratio": 0.9, "predicted_ratio": 0.9, "proposal": "g"}

        search.iteration = iteration
        search.run()
        return search, tried

    search, tried = make(0.011, 3)  # cuts of 11 us remain: delta 40 -> 20 -> 10 us finds them
    assert tried == [(1, 0.04), (1, 0.02), (1, 0.01), (2, 0.01), (3, 0.01), (4, 0.01), (4, 0.005)]
    assert search.halvings == 3 and search.stop == "no proposal can cut delta further"
    search, tried = make(0.001, 5)  # nothing saves even 40 / 8 = 5 us: the search gives up at once
    assert tried == [(1, 0.04), (1, 0.02), (1, 0.01), (1, 0.005)] and search.stop == "no proposal can cut delta further"
