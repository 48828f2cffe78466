"""int8-mixed with a deploy target: the plan's acceptance check runs in the target's runtime, on the target's
own artifacts of the all-int8 graph and of the plan (its fp32 nodes really float there)."""
from pathlib import Path

import numpy as np
import onnx
import torch

from compress.models.mobilenetv3 import mobilenet_v3_small
from compress.onnx.export import to_onnx
from compress.quant import pipeline
from compress.quant.core import calibrate, prepare_float, quantize_prepared
from compress.prune.unit_timing import RandomReader
from compress.targets.openvino import OpenVINO
from recipes.loader import load_recipe

SIZE = 32


def _u8_convs(artifact: bytes) -> int:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(artifact, b""), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return sum(1 for op in compiled.get_runtime_model().get_ops()
               if op.get_rt_info()["layerType"].astype(str) == "Convolution"
               and op.get_rt_info()["runtimePrecision"].astype(str) in ("u8", "i8"))


def test_the_plan_is_judged_in_the_targets_runtime(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = mobilenet_v3_small(width_mult=0.5, num_classes=10).eval()
    fp32 = to_onnx(model, (SIZE, SIZE))
    rec = load_recipe("int8-mixed")
    prepared = prepare_float(fp32, rec.quantize, tmp_path)
    ranges = calibrate(prepared, RandomReader((3, SIZE, SIZE), 4), rec.calibration, tmp_path)
    all_int8 = quantize_prepared(prepared, ranges, rec, tmp_path).model
    convs = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "Conv"]
    fp32_nodes = convs[3:6]
    plan = quantize_prepared(prepared, ranges, rec, tmp_path, extra_excluded=fp32_nodes).model

    class Source:
        class preprocess:
            input_size = (SIZE, SIZE)

    setup = pipeline.Setup(rec, model, Source, Path(prepared), None, str(tmp_path), tmp_path, {}, 1, False,
                           fp32=fp32, targets=[None, OpenVINO()])
    built = []
    real_build = OpenVINO.build
    monkeypatch.setattr(OpenVINO, "build", lambda self, inputs: built.append(real_build(self, inputs)) or built[-1])
    lat_all, lat_plan, runtime = pipeline._target_measure(OpenVINO(), setup, ranges)(all_int8, plan, fp32_nodes)
    assert runtime == "openvino" and lat_all["median"] > 0 and lat_plan["median"] > 0
    assert len(lat_all["round_medians"]) == 5
    everything, fewer = (_u8_convs(a) for a in built)
    assert fewer == everything - len(fp32_nodes)  # the plan's fp32 convs run in float in OpenVINO
    assert np.isfinite(lat_plan["median"])
