"""The per-layer latency table: units of a network, their ONNX graphs, the on-disk cache and its key, the
prediction of whole-network latency and how its agreement with measurements is reported.  How well the table
predicts measured latency is a benchmark (benchmarks/latency_table.py), not a unit test: timing is noisy."""
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from compress.models.mobilenetv3 import arch_spec
from compress.prune.latency_table import (
    LatencyTable,
    agreement,
    export_unit,
    network_units,
    table_path,
    unit_artifact,
    unit_key,
    unit_module,
    unit_onnx,
)
from compress.prune.unit_timing import Timing


def test_units_cover_the_network_with_their_input_sides():
    spec = arch_spec("mobilenet_v3_small", num_classes=10)
    units = network_units(spec, 32)
    assert [u["kind"] for u in units] == ["stem"] + ["block"] * 11 + ["last", "head"]
    # 32 -> stem /2 -> 16; the strided blocks 0, 1, 3, 8 halve it: 8, 4, 2, 1
    assert [u["hw"] for u in units] == [32, 16, 8, 4, 4, 2, 2, 2, 2, 2, 1, 1, 1, 1]
    assert units[-1]["in"] == 576 and units[-1]["hidden"] == 1024 and units[-1]["classes"] == 10
    assert len({unit_key(u) for u in units}) == len(units) - 2  # blocks 4 = 5 and 9 = 10: measured once


@pytest.mark.parametrize("index", [0, 5, 11, 12, 13])  # stem, an SE block, a strided block, last conv, head
def test_unit_graph_computes_what_its_module_computes(index):
    """A unit's ONNX graph (as the table times it) computes the unit's torch module: same values."""
    unit = network_units(arch_spec("mobilenet_v3_small", width_mult=0.5, num_classes=10), 32)[index]
    torch.manual_seed(0)
    module, chw = unit_module(unit)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-like BN statistics, so that the folded graph has something to get wrong
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    sess = ort.InferenceSession(export_unit(module, chw, batch=2), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.shape == [2, *chw]
    x = np.random.default_rng(0).standard_normal((2, *chw)).astype(np.float32)
    out = sess.run(None, {inp.name: x})[0]
    with torch.no_grad():
        ref = module.eval()(torch.from_numpy(x)).numpy()
    assert out.shape == ref.shape and np.abs(ref).max() > 1e-3
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    assert len(ort.InferenceSession(unit_onnx(unit, 1), providers=["CPUExecutionProvider"]).get_inputs()) == 1


def test_table_path_is_keyed_by_settings(tmp_path):
    a = table_path(32, 1, 1, home=tmp_path)
    assert a.parent == tmp_path / "latency"
    assert "onnxruntime" + ort.__version__ in a.name and a.name.startswith("ort-x86-fp32_")
    int8 = table_path(32, 1, 1, home=tmp_path, timing=Timing("ort-x86", "int8"))
    assert int8.name.startswith("ort-x86-int8_")
    assert len({a, int8, table_path(32, 2, 1, home=tmp_path), table_path(32, 1, 8, home=tmp_path),
                table_path(64, 1, 1, home=tmp_path)}) == 5


def test_prediction_is_cached_and_reused(tmp_path):
    spec = arch_spec("mobilenet_v3_small", width_mult=0.35, num_classes=10)
    path = tmp_path / "lut.json"
    table = LatencyTable(16, threads=1, batch=1, path=path, rounds=1, round_time_s=0.002, progress=False)
    pred = table.predict(spec)
    assert pred > 0 and table.measured_here == len({unit_key(u) for u in network_units(spec, 16)})
    data = json.loads(path.read_text())
    assert data["threads"] == 1 and data["batch"] == 1 and data["input_size"] == 16
    assert data["machine"]["onnxruntime"] == ort.__version__
    again = LatencyTable(16, threads=1, batch=1, path=path, progress=False)
    assert again.predict(spec) == pytest.approx(pred) and again.measured_here == 0
    # another deployment setting does not reuse the entries
    other = LatencyTable(16, threads=1, batch=2, path=path, rounds=1, round_time_s=0.002, progress=False)
    assert other.entries == {}
    names = [n for n, _ in table.breakdown(spec)]
    assert names[0] == "stem" and names[-2:] == ["last_conv", "head"]


@pytest.mark.parametrize("field, value", [("cpu", "Another CPU 9000"), ("isa", ["avx2"]), ("onnxruntime", "1.0.0")])
def test_a_table_from_another_cpu_or_runtime_is_measured_again(tmp_path, capsys, field, value):
    spec = arch_spec("mobilenet_v3_small", width_mult=0.35, num_classes=10)
    path = tmp_path / "lut.json"
    table = LatencyTable(16, threads=1, batch=1, path=path, rounds=1, round_time_s=0.002)
    table.predict(spec)
    data = json.loads(path.read_text())
    assert LatencyTable(16, threads=1, batch=1, path=path).entries == data["units"]  # same machine: reused
    data["machine"][field] = value
    path.write_text(json.dumps(data))
    stale = LatencyTable(16, threads=1, batch=1, path=path, rounds=1, round_time_s=0.002)
    shown = capsys.readouterr()
    assert stale.entries == {} and "measuring it again" in shown.out + shown.err
    stale.predict(spec)
    assert stale.measured_here > 0 and json.loads(path.read_text())["machine"][field] != value  # rebuilt


def test_agreement_reports_errors_and_seed_calibration():
    r = agreement([1.1, 0.88, 0.66], [1.0, 0.8, 0.6])
    assert r["networks"] == 3
    assert r["mean_abs_rel_error"] == pytest.approx(0.1) and r["mean_rel_error"] == pytest.approx(0.1)
    assert r["mean_abs_rel_error_seed_calibrated"] == pytest.approx(0.0, abs=1e-9)
    assert r["pearson_r"] == pytest.approx(1.0)
    assert agreement([], []) == {"networks": 0}


class ScriptedTiming(Timing):
    """Real artifacts, scripted times: an artifact's time is its size / 1e4 ms, or ``truth[artifact]``."""
    truth: dict = {}

    def call(self, artifact, chw, batch, threads):
        def run():
            return None
        run.true_ms = self.truth.get(artifact, len(artifact) / 1e4)
        return run


def scripted_interleave(monkeypatch, speed):
    import eval.latency

    seen = []

    def scripted(calls, **kw):
        seen.append(set(calls))
        return {name: {"median": speed["now"] * call.true_ms, "cv": 0.0} for name, call in calls.items()}

    monkeypatch.setattr(eval.latency, "interleave", scripted)
    return seen


def test_batches_timed_at_another_machine_speed_are_scaled_by_the_anchor(tmp_path, monkeypatch):
    """The machine runs 1.6x slower while the second batch is timed (a drifting VM): the anchor - the first batch's
    heaviest unit, timed again in every batch - brings that batch back to the first one's speed, so a unit's
    entry does not depend on when it was timed.  Timing is scripted (each artifact's 'time' is its size) so the
    drift is exact; the units, artifacts and the table's arithmetic are real."""
    speed = {"now": 1.0}
    seen = scripted_interleave(monkeypatch, speed)
    spec = arch_spec("mobilenet_v3_small", width_mult=0.35, num_classes=10)
    units = network_units(spec, 16)
    first, second = units[:4], units[4:7]

    def table(name):
        return LatencyTable(16, threads=1, batch=1, path=tmp_path / name, progress=False, timing=ScriptedTiming())

    steady = table("steady.json")
    steady.measure(first, chunk=8)
    steady.measure(second, chunk=8)
    drifting = table("drifting.json")
    drifting.measure(first, chunk=8)
    speed["now"] = 1.6
    drifting.measure(second, chunk=8)
    assert "anchor" not in seen[0] and "anchor" in seen[-1]  # the first batch picks it, later ones time it
    heaviest = max(first, key=lambda u: len(unit_artifact(u, Timing(), 1)))
    assert drifting.anchor["unit"] == unit_key(heaviest)
    for u in second:
        k = unit_key(u)
        assert steady.entries[k]["ms"] > 0
        assert drifting.entries[k]["ms"] == pytest.approx(steady.entries[k]["ms"], rel=1e-3), k
        assert drifting.entries[k]["scale"] == pytest.approx(1 / 1.6, rel=1e-3)
        assert drifting.entries[k]["raw_ms"] == pytest.approx(1.6 * steady.entries[k]["raw_ms"])
    # the anchor is stored: a new process reading the file scales its batches to the same speed
    reread = table("drifting.json")
    assert reread.anchor == drifting.anchor
    speed["now"] = 0.7
    reread.measure([units[7]], chunk=8)
    steady.measure([units[7]], chunk=8)  # (also at 0.7: the steady table's own anchor rescales it too)
    assert reread.entries[unit_key(units[7])]["ms"] == pytest.approx(steady.entries[unit_key(units[7])]["ms"],
                                                                     rel=1e-3)
    # a table written before anchors existed is measured again
    data = json.loads((tmp_path / "drifting.json").read_text())
    del data["anchor"]
    (tmp_path / "drifting.json").write_text(json.dumps(data))
    assert table("drifting.json").entries == {}


def test_calibration_fits_the_weights_cost_on_one_network_and_predicts_another(tmp_path, monkeypatch):
    """The whole network pays a cost its units alone do not (its weights fetched on every pass): calibrating on
    the seed fits it per MB of weights, and a pruned network's prediction then carries its own, smaller cost.
    Scripted times (as above): the seed 'runs' in its units' time + 0.05 ms per MB, timed while the machine is
    1.25x slower than when the units were; the anchor timed beside it undoes that."""
    from compress.models.mobilenetv3 import MobileNetV3
    from compress.prune.channels import channel_groups, pruned_spec

    speed = {"now": 1.0}
    scripted_interleave(monkeypatch, speed)
    spec = arch_spec("mobilenet_v3_small", width_mult=0.35, num_classes=10)
    g = channel_groups(spec)[-1]
    cut = pruned_spec(spec, {g.name: g.channels // 2})
    timing = ScriptedTiming("ort-x86", "int8")
    table = LatencyTable(16, threads=1, batch=1, path=tmp_path / "t.json", progress=False, timing=timing)
    units_seed, units_cut = table.predict(spec), table.predict(cut)
    assert table.weights["ms_per_mb"] == 0 and units_seed == table.units_ms(spec)
    # the table counts every conv / linear weight of the network once (int8: one byte each)
    model = MobileNetV3(spec)
    n = sum(p.numel() for name, p in model.named_parameters() if name.endswith("weight") and p.ndim > 1)
    assert table.weight_mb(spec) == pytest.approx(n / 1e6)
    assert 0 < table.weight_mb(cut) < table.weight_mb(spec)
    ScriptedTiming.truth = {b"seed network": units_seed + 0.05 * table.weight_mb(spec)}
    speed["now"] = 1.25
    fit = table.calibrate(spec, b"seed network")
    assert fit["ms_per_mb"] == pytest.approx(0.05, rel=1e-3)
    assert table.predict(spec) == pytest.approx(units_seed + 0.05 * table.weight_mb(spec), rel=1e-4)
    assert table.predict(cut) == pytest.approx(units_cut + 0.05 * table.weight_mb(cut), rel=1e-4)
    assert dict(table.breakdown(cut))["weights"] == pytest.approx(0.05 * table.weight_mb(cut), rel=1e-3)
    assert LatencyTable(16, threads=1, batch=1, path=tmp_path / "t.json", progress=False,
                        timing=timing).weights == fit  # stored with the table
    ScriptedTiming.truth = {b"seed network": 0.5 * units_seed}  # a network faster than its units: no negative cost
    assert table.calibrate(spec, b"seed network")["ms_per_mb"] == 0
