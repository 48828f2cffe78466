"""NetAdapt on the deploy target: units timed as the target's own int8 artifact, tables keyed by target and
precision, the target's channel step, and a table measured on the device that the search follows."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from compress.errors import UserError
from compress.models.mobilenetv3 import MobileNetV3, arch_spec, count_params
from compress.prune.latency_table import TABLE_VERSION, LatencyTable, network_units, unit_key, unit_module, unit_onnx
from compress.prune.unit_timing import Timing
from tests.compress.prune.test_netadapt import _fake_fashion_mnist

ROOT = Path(__file__).resolve().parents[3]
SPEC = arch_spec("mobilenet_v3_small", width_mult=0.5, num_classes=10)


def _ops(model_bytes: bytes) -> list[str]:
    return [n.op_type for n in onnx.load_from_string(model_bytes).graph.node]


def test_int8_units_are_the_targets_own_artifacts():
    unit = network_units(SPEC, 16)[2]  # block 1: expansion 40 -> depthwise -> projection
    _, chw = unit_module(unit)
    fp32 = onnx.load_from_string(unit_onnx(unit, 1))
    x86 = onnx.load_from_string(Timing("ort-x86", "int8").artifact(fp32, chw, 1))
    arm = onnx.load_from_string(Timing("ort-arm64", "int8").artifact(fp32, chw, 1))
    def depthwise_groups(model):
        return [a.i for n in model.graph.node if n.op_type == "Conv" for a in n.attribute
                if a.name == "group" and a.i > 1]

    assert depthwise_groups(x86) == [48] and depthwise_groups(arm) == [40]  # 40 depthwise channels: padded to 16s for x86's kernels only
    for model in (x86, arm):
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("QuantizeLinear") >= 3 and "DequantizeLinear" in ops
    assert _ops(Timing("ort-x86", "fp32").artifact(fp32, chw, 1)) == [n.op_type for n in fp32.graph.node]
    assert _ops(Timing("ort-x86", "int8").baseline(chw, 1)) == ["QuantizeLinear", "DequantizeLinear"]
    assert _ops(Timing("ort-x86", "fp32").baseline(chw, 1)) == ["Identity"]


def test_tables_are_per_target_and_precision(tmp_path):
    path = tmp_path / "lut.json"
    int8 = LatencyTable(16, path=path, rounds=1, round_time_s=0.002, progress=False, timing=Timing("ort-x86", "int8"))
    pred = int8.predict(SPEC)
    doc = json.loads(path.read_text())
    assert pred > 0 and doc["timing"] == "ort-x86-int8" and doc["runtime"].startswith("onnxruntime ")
    assert len(doc["units"]) == len({unit_key(u) for u in network_units(SPEC, 16)})
    fp32 = LatencyTable(16, path=path, progress=False)  # the same file, another precision: not reused
    assert fp32.entries == {} and "target and precision" in fp32.stale_reason(doc)
    again = LatencyTable(16, path=path, progress=False, timing=Timing("ort-x86", "int8"))
    assert again.entries == doc["units"]


def test_channel_steps_follow_the_targets_kernels():
    from compress.prune.netadapt import propose

    assert Timing("ort-x86", "int8").channel_step == 16  # the int8 recipe pads depthwise to 16 on every x86
    assert Timing("ort-arm64", "int8").channel_step == 8

    class Flat:  # one unit of latency per channel: every cut is worth its channels
        def measure(self, units):
            pass

        def missing(self, specs):
            return []

        def predict(self, spec):
            return float(sum(b.expanded + b.out_ch for b in spec.blocks) + spec.last_conv + spec.last_channel)

    for step in (8, 16):
        for p in propose(SPEC, Flat(), delta_ms=4.0, step=step):
            assert p["channels"][1] % step == 0 and p["channels"][1] < p["channels"][0]
    by16 = {p["group"]: p["channels"][1] for p in propose(SPEC, Flat(), delta_ms=4.0, step=16)}
    assert by16["expansion:features.2"] == 32  # 40 channels: the next multiple of 16 below, not 32 + 8


def test_a_target_that_runs_elsewhere_needs_a_device_table(tmp_path):
    with pytest.raises(UserError, match="cannot be measured on this machine.*tools/device_latency.py.*--latency-table"):
        LatencyTable(16, path=tmp_path / "t.json", progress=False, timing=Timing("ort-arm64", "int8"))
    with pytest.raises(UserError, match="latency precision must be one of fp32, int8"):
        Timing("ort-x86", "int4")


@pytest.fixture(scope="module")
def device_bundle(tmp_path_factory):
    """The tool's two steps: units written here, then 'measured on the device' (here too, with onnxruntime only)."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import device_latency
    finally:
        sys.path.remove(str(ROOT / "tools"))
    folder = tmp_path_factory.mktemp("bundle")
    index = device_latency.bundle(SPEC, 16, Timing("ort-arm64", "int8"), 1, 1, None, folder)
    table = folder / "table.json"
    # the device side imports neither torch nor the project: run it with torch made unimportable
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = ['device_latency.py', 'measure', "
            f"{str(folder)!r}, '-o', {str(table)!r}, '--rounds', '1']; "
            f"runpy.run_path({str(ROOT / 'tools' / 'device_latency.py')!r}, run_name='__main__')")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=folder)
    return index, json.loads(table.read_text())


def test_the_device_tool_measures_every_unit_it_bundled(device_bundle):
    index, doc = device_bundle
    assert doc["timing"] == "ort-arm64-int8" and doc["measured_on"] == "device" and doc["threads"] == 1
    assert set(doc["units"]) == {u["key"] for u in index["units"]}
    seed_keys = {unit_key(u) for u in network_units(SPEC, 16)}
    assert seed_keys <= set(doc["units"])  # the seed network, plus the first cut of every group
    assert len(doc["units"]) > len(seed_keys)
    assert all(v["raw_ms"] > 0 and v["ms"] >= 0 for v in doc["units"].values())


def _device_table(expensive_position: int) -> dict:
    """A device table covering every unit of every one-group cut of SPEC (what the first iteration can ask for),
    each unit's time its MAC count (deterministic), the units at ``expensive_position`` 100x slower."""
    from compress.prune.channels import channel_groups
    from compress.prune.netadapt import _candidates

    specs = [SPEC] + [s for g in channel_groups(SPEC) for _, s in _candidates(SPEC, g, 8)]
    units = {}
    for s in specs:
        for position, u in enumerate(network_units(s, 16)):
            module, _ = unit_module(u)
            ms = 1e-6 * sum(p.numel() for p in module.parameters()) * u["hw"] ** 2
            units[unit_key(u)] = {"ms": ms * (100 if position == expensive_position else 1), "position": position}
    return {"version": TABLE_VERSION, "timing": "ort-arm64-int8", "runtime": "onnxruntime (device)", "input_size": 16,
            "threads": 1, "batch": 1, "machine": {"cpu": "test device"}, "base_ms": [0.01], "units": units}


def _search_with(expensive_position, tmp_path, monkeypatch, name):
    """One NetAdapt iteration on a device table whose units at ``expensive_position`` cost 100x; accuracy is
    modelled, not trained: each proposal loses 1e-4 top-1 per channel it removes."""
    import compress.prune.netadapt as na
    from compress.models.checkpoint import save_checkpoint

    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(_device_table(expensive_position)))

    def modelled(model, source, pool, holdout, steps, *a, **k):
        def channels(spec):
            return sum(b.expanded + b.out_ch for b in spec.blocks) + spec.stem_channels + spec.last_conv \
                + spec.last_channel

        kept, full = channels(model.spec), channels(SPEC)
        return {"top1": 0.5 - 1e-4 * (full - kept), "loss": 1.0}

    monkeypatch.setattr(na, "_finetune", modelled)
    monkeypatch.setattr(na, "MEASURE_ROUNDS", 1)
    monkeypatch.setattr("compress.prune.outputs.FINAL_ROUNDS", 1)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "seed.pt", MobileNetV3(SPEC), dataset="fashion-mnist", input_size=16)
    data = tmp_path / "fmnist"
    data.mkdir(exist_ok=True)
    _fake_fashion_mnist(data)
    return na.prune("netadapt", weights=str(tmp_path / "seed.pt"), dataset=f"fashion-mnist:{data}", input_size=16,
                    output_dir=tmp_path / name, eval_limit=50, progress=False, target="ort-arm64",
                    latency_table=path, latency_precision="int8", delta_ratio=0.05, eval_images=100,
                    final_finetune_epochs=0, max_iterations=1, target_latency_ratio=0.5)


def test_the_search_follows_the_device_table(tmp_path, monkeypatch):
    """A table that makes block 6 expensive gets block 6 pruned first; one that makes block 8 expensive, block 8
    (two blocks whose units occur once in the network: identical blocks share their table entry)."""
    block6 = {"expansion:features.7", "bottleneck:features.4-8"}  # the groups that shrink block 6 (position 7)
    block8 = {"expansion:features.9", "bottleneck:features.4-8", "bottleneck:features.9-11"}
    monkeypatch.setenv("MNV3_COMPRESS_HOME", str(tmp_path / "home"))
    a = _search_with(7, tmp_path, monkeypatch, "six")
    b = _search_with(9, tmp_path, monkeypatch, "eight")
    assert a["trajectory"][1]["proposal"] in block6, a["trajectory"][1]["proposal"]
    assert b["trajectory"][1]["proposal"] in block8, b["trajectory"][1]["proposal"]
    assert a["trajectory"][1]["proposal"] != b["trajectory"][1]["proposal"]
    lut = a["latency_table"]
    assert lut["timing"] == "ort-arm64-int8" and lut["channel_step"] == 8
    assert lut["device_table"]["units_used"] > 0 and lut["device_table"]["units_scaled_from_this_machine"] == 0
    assert "trajectory_vs_host_proxy" in lut and a["trajectory"][1]["predicted_ratio"] < 1
    assert a["deployment"]["target"] == "ort-arm64" and a["deployment"]["timed_on"] == "ort-x86"
    assert count_params(MobileNetV3(SPEC)) == a["summary"]["params_reference"]


def test_a_device_table_for_other_settings_is_refused(device_bundle, tmp_path):
    _, doc = device_bundle
    path = tmp_path / "t.json"
    path.write_text(json.dumps({**doc, "threads": 4}))
    with pytest.raises(UserError, match="was measured with threads 4; this run needs 1"):
        LatencyTable(16, path=tmp_path / "host.json", progress=False, timing=Timing("ort-arm64", "int8"),
                     device_table=path)
    path.write_text(json.dumps(doc))
    with pytest.raises(UserError, match="was measured with timing 'ort-arm64-int8'; this run needs 'ort-arm64-fp32'"):
        LatencyTable(16, path=tmp_path / "host.json", progress=False, timing=Timing("ort-arm64", "fp32"),
                     device_table=path)
    assert np.isfinite(LatencyTable(16, path=tmp_path / "host.json", progress=False,
                                    timing=Timing("ort-arm64", "int8"), device_table=path).predict(SPEC))



def test_executorch_units_are_xnnpack_programs_built_from_the_unit_module(tmp_path):
    """ExecuTorch times what it ships: each unit built from its torch module by the executorch target (PT2E with
    the unit's own scale table) into one XNNPACK delegate; the fp32 unit is the same module lowered unquantized;
    its baseline is a 1x1 depthwise conv built the same way.  The table is keyed by target and runtime."""
    from compress.prune.latency_table import unit_artifact
    from compress.targets.executorch import delegate_qparams, pte_facts

    unit = network_units(SPEC, 16)[2]  # block 1: expansion 40 -> depthwise -> projection
    _, chw = unit_module(unit)
    int8 = unit_artifact(unit, Timing("executorch", "int8"), 1)
    fp32 = unit_artifact(unit, Timing("executorch", "fp32"), 1)
    for program in (int8, fp32):
        assert pte_facts(program)["delegate_partitions"] == 1
    acts, weights = delegate_qparams(int8)
    assert len(weights) == 3 and len(acts) >= 3  # three int8 convs, their activation grids
    assert delegate_qparams(fp32) == (set(), [])
    base = Timing("executorch", "int8").baseline(chw, 1)
    assert len(delegate_qparams(base)[1]) == 1  # one int8 depthwise conv
    module, _ = unit_module(unit)
    with torch.no_grad():
        want = tuple(module.eval()(torch.zeros(1, *chw)).shape)
    assert Timing("executorch", "int8").call(int8, chw, 1, 1)().shape == want == (1, unit["out_ch"], 2, 2)
    with pytest.raises(ValueError, match="builds from the torch module"):
        Timing("executorch", "int8").artifact(onnx.load_from_string(unit_onnx(unit, 1)), chw, 1)
    path = tmp_path / "lut.json"
    table = LatencyTable(16, path=path, rounds=1, round_time_s=0.002, progress=False,
                         timing=Timing("executorch", "int8"))
    units = network_units(SPEC, 16)[-2:]  # the last conv and the head (1x1 maps), built by two worker processes
    table.measure(units)
    doc = json.loads(path.read_text())
    assert doc["timing"] == "executorch-int8" and doc["runtime"].startswith("executorch ")
    assert set(doc["units"]) == {unit_key(u) for u in units} and all(v["raw_ms"] > 0 for v in doc["units"].values())
    # the workers live as long as the table (spawning them costs ~15 s): a second batch runs in the same processes
    workers = table._pool["pool"]
    first = set(workers._processes)
    table.measure(network_units(SPEC, 16)[:1])  # the stem
    assert table._pool["pool"] is workers and set(workers._processes) == first and len(first) >= 2
    assert unit_key(network_units(SPEC, 16)[0]) in json.loads(path.read_text())["units"]
    table.close()
    assert "pool" not in table._pool and not workers._processes


def test_groups_go_deeper_together_in_one_batch_per_round():
    """propose times every unresolved group's next cut in one batch (ExecuTorch builds a batch two at a time)
    and still returns, per group, the smallest cut that saves delta."""
    from compress.prune.channels import channel_groups
    from compress.prune.netadapt import _candidates, candidate_specs, propose

    def latency(spec):
        return float(sum(b.expanded + b.out_ch for b in spec.blocks) + spec.last_conv + spec.last_channel)

    class Recording:
        def __init__(self):
            self.batches = []

        def missing(self, specs):
            return list(specs)

        def measure(self, units):
            self.batches.append(len(units))

        def predict(self, spec):
            return latency(spec)

    table, delta = Recording(), 20.0
    proposals = propose(SPEC, table, delta_ms=delta, step=8)
    groups = channel_groups(SPEC)
    cuttable = sum(1 for g in groups if next(_candidates(SPEC, g, 8), None) is not None)
    assert table.batches[0] == len(candidate_specs(SPEC, 8)) and table.batches[1] == cuttable
    assert len(table.batches) > 3  # delta needs deeper cuts than the first: several rounds
    assert all(a >= b for a, b in zip(table.batches[1:], table.batches[2:]))  # fewer groups left each round
    for p in proposals:  # the smallest cut that saves delta, as a one-group-at-a-time search finds it
        g = next(g for g in groups if g.name == p["group"])
        want = next(k for k, s in _candidates(SPEC, g, 8) if latency(SPEC) - latency(s) >= delta)
        assert p["channels"] == [g.channels, want]
    assert len(proposals) > 3
