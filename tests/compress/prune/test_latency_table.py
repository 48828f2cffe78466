"""The per-layer latency table: units of a network, their ONNX graphs, the on-disk cache and its key, the
prediction of whole-network latency and how its agreement with measurements is reported."""
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from compress.models.mobilenetv3 import arch_spec
from compress.prune.latency_table import (
    LatencyTable,
    agreement,
    network_units,
    table_path,
    unit_key,
    unit_module,
    unit_onnx,
)


def test_units_cover_the_network_with_their_input_sides():
    spec = arch_spec("mobilenet_v3_small", num_classes=10)
    units = network_units(spec, 32)
    assert [u["kind"] for u in units] == ["stem"] + ["block"] * 11 + ["last", "head"]
    # 32 -> stem /2 -> 16; the strided blocks 0, 1, 3, 8 halve it: 8, 4, 2, 1
    assert [u["hw"] for u in units] == [32, 16, 8, 4, 4, 2, 2, 2, 2, 2, 1, 1, 1, 1]
    assert units[-1]["in"] == 576 and units[-1]["hidden"] == 1024 and units[-1]["classes"] == 10
    assert len({unit_key(u) for u in units}) == len(units) - 2  # blocks 4 = 5 and 9 = 10: measured once


def test_unit_graph_computes_what_its_module_computes():
    unit = network_units(arch_spec("mobilenet_v3_small", width_mult=0.5, num_classes=10), 32)[5]
    torch.manual_seed(0)
    data = unit_onnx(unit, batch=2)
    module, chw = unit_module(unit)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.shape == [2, *chw]
    out = sess.run(None, {inp.name: np.random.default_rng(0).standard_normal((2, *chw)).astype(np.float32)})[0]
    assert out.shape == (2, unit["out_ch"], 2, 2)


def test_table_path_is_keyed_by_settings(tmp_path):
    a = table_path(32, 1, 1, home=tmp_path)
    assert a.parent == tmp_path / "latency"
    assert "ort" + ort.__version__ in a.name
    assert len({a, table_path(32, 2, 1, home=tmp_path), table_path(32, 1, 8, home=tmp_path),
                table_path(64, 1, 1, home=tmp_path)}) == 4


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


def test_prediction_tracks_a_whole_network_measurement(tmp_path):
    from compress.models.mobilenetv3 import MobileNetV3
    from compress.onnx.export import to_onnx
    from eval.latency import measure_interleaved

    specs = [arch_spec("mobilenet_v3_small", width_mult=w, num_classes=10) for w in (1.0, 0.5)]
    table = LatencyTable(32, threads=1, batch=1, path=tmp_path / "lut.json", rounds=2, round_time_s=0.02,
                         progress=False)
    pred = [table.predict(s) for s in specs]
    meas = measure_interleaved({i: to_onnx(MobileNetV3(s), (32, 32)) for i, s in enumerate(specs)}, rounds=3,
                               round_time_s=0.05)
    m = [meas[0]["median"], meas[1]["median"]]
    # loose bounds: the machine is shared; the real agreement is reported by every NetAdapt run
    assert pred[1] < pred[0]
    for p, q in zip(pred, m):
        assert 0.5 < p / q < 2.0


def test_agreement_reports_errors_and_seed_calibration():
    r = agreement([1.1, 0.88, 0.66], [1.0, 0.8, 0.6])
    assert r["networks"] == 3
    assert r["mean_abs_rel_error"] == pytest.approx(0.1) and r["mean_rel_error"] == pytest.approx(0.1)
    assert r["mean_abs_rel_error_seed_calibrated"] == pytest.approx(0.0, abs=1e-9)
    assert r["pearson_r"] == pytest.approx(1.0)
    assert agreement([], []) == {"networks": 0}
