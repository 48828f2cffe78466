"""Per runtime, our int8 beside that runtime's own standard quantizer: latency ratios to the runtime's fp32 and
top-1 agreement, all from one calibration.

For MobileNetV3-Large and -Small @224 (random weights, 1000 classes; calibration: ``--calibration-size``
synthetic images, the same for us and for every peer) and each runtime installed:

* ONNX Runtime: ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations: its fast x86 form) vs our
  ``int8`` recipe (``ort-x86``);
* OpenVINO: NNCF ``nncf.quantize`` of ``ov.convert_model(torch model)`` (PERFORMANCE preset) vs our ``openvino``
  target; OpenVINO's fp32 with the f32 hint, its bf16 default beside;
* ExecuTorch: PT2E with XNNPACKQuantizer (per-channel) vs our ``executorch`` target;
* LiteRT: litert-torch's PT2E quantizer vs our ``litert`` target.

Each runtime's variants are timed in ONE interleaved run (1 forward pass at batch 1, ``--threads``).  With
``--accuracy`` every artifact is also built from the embedded default model and scored on its full test split
(top-1, agreement with our ort-x86 int8).

    python benchmarks/deploy_targets.py                          # Large and Small @224, every installed runtime
    python benchmarks/deploy_targets.py --models large --runtimes onnxruntime,openvino --accuracy
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RUNTIMES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "executorch": "executorch",
            "litert": "ai_edge_litert"}
TARGET_OF = {"onnxruntime": "ort-x86", "openvino": "openvino", "executorch": "executorch", "litert": "litert"}


def build(model, source, workdir: Path, calibration_size: int):
    """Our reference int8 (the int8 recipe) and the BuildInputs every target is made from."""
    from calibration.reader import TrainSplitReader
    from compress.onnx.export import to_onnx
    from compress.quant.core import calibrate, prepare_float, quantize_prepared, range_dict
    from compress.targets.base import BuildInputs
    from compress.targets.table import ScaleTable
    from recipes.loader import load_recipe

    rec = load_recipe("int8").with_overrides("calibration", size=calibration_size)
    fp32 = to_onnx(model, source.preprocess.input_size)
    prepared = prepare_float(fp32, rec.quantize, workdir)
    reader = TrainSplitReader(source, calibration_size, 1, 0)
    ranges = calibrate(prepared, reader, rec.calibration, workdir)
    graph = quantize_prepared(prepared, ranges, rec, workdir)
    table = ScaleTable.from_int8(graph.model, fp32, range_dict(ranges), graph.excluded)
    batches = []
    reader.rewind()
    while (item := reader.get_next()) is not None:
        batches.append(item["input"])
    inputs = BuildInputs(model, fp32, table, rec, source.preprocess.input_size, workdir, batches)
    return graph.model.SerializeToString(), inputs


# -- the peers: each runtime's own standard quantizer, on the same calibration images -----------------------

def peer_onnxruntime(inputs) -> bytes:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = [{"input": b} for b in inputs.calibration]

        def get_next(self):
            return self.items.pop(0) if self.items else None

    src, dst = inputs.workdir / "peer_fp32.onnx", inputs.workdir / "peer_int8.onnx"
    src.write_bytes(inputs.fp32_onnx.SerializeToString())
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return dst.read_bytes()


def peer_openvino(inputs):
    """NNCF PERFORMANCE on the OpenVINO model of the torch module (what OpenVINO's docs do); an ov.Model."""
    import nncf
    import openvino as ov
    import torch

    shape = (1, 3, *inputs.input_size)
    model = ov.convert_model(inputs.float_model.eval(), example_input=torch.zeros(shape), input=[shape])
    items = [b[i:i + 1] for b in inputs.calibration for i in range(len(b))]
    return nncf.quantize(model, nncf.Dataset(items), preset=nncf.QuantizationPreset.PERFORMANCE,
                         subset_size=len(items))


def _ov_runner(model, threads: int, bf16: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if not bf16:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    request = core.compile_model(model, "CPU", config).create_infer_request()
    return lambda x: np.asarray(request.infer({0: x})[0]).copy()


def variants_for(runtime: str, inputs, ours_x86: bytes, threads: int) -> dict[str, Callable[[np.ndarray], Any]]:
    """{variant: runner} for one runtime: its fp32 (and bf16), its own quantizer's int8, ours."""
    from compress.targets.registry import TARGETS

    target = TARGETS[TARGET_OF[runtime]]
    if runtime == "onnxruntime":
        return {"fp32": target.runner(inputs.fp32_onnx.SerializeToString(), threads),
                "peer int8 (quantize_static)": target.runner(peer_onnxruntime(inputs), threads),
                "ours int8": target.runner(ours_x86, threads)}
    ours = target.build(inputs)
    fp32 = target.build_fp32(inputs)
    out = {name: target.runner(data, threads, variant=name) for name, data in fp32.items()}
    if runtime == "openvino":
        out["peer int8 (NNCF)"] = _ov_runner(peer_openvino(inputs), threads)
    elif hasattr(target, "peer"):
        out[f"peer int8 ({target.peer_name})"] = target.runner(target.peer(inputs), threads)
    out["ours int8"] = target.runner(ours, threads)
    return out


def accuracy(runtimes: list[str], threads: int, calibration_size: int) -> dict[str, Any]:
    """Every runtime's fp32, peer int8 and our int8 built from the embedded default model (its data, its size,
    ``calibration_size`` train images) and scored on the full test split: top-1 and agreement with our ort-x86."""
    from compress.targets.evaluate import test_logits
    from compress.training.default_model import resolve_model

    loaded, source = resolve_model(progress=False)
    out: dict[str, Any] = {"model": f"{loaded.spec.arch} @{source.preprocess.input_size[0]} on {source.name}"}
    with tempfile.TemporaryDirectory() as tmp:
        ours_x86, inputs = build(loaded.model.eval(), source, Path(tmp), calibration_size)
        from compress.targets.registry import TARGETS

        ref, _ = test_logits(TARGETS["ort-x86"].runner(ours_x86, threads), source, None, None)  # the reference
        for runtime in runtimes:
            out[runtime] = {}
            for name, run in variants_for(runtime, inputs, ours_x86, threads).items():
                logits, labels = test_logits(run, source, None, 1 if runtime != "onnxruntime" else None)
                out[runtime][name] = {"top1": float((logits.argmax(1) == labels).mean()), "logits": logits}
        for runtime in runtimes:
            for v in out[runtime].values():
                v["same_top1_as_ours_ort_x86"] = float((v.pop("logits").argmax(1) == ref.argmax(1)).mean())
                print(f"accuracy {runtime:11s} top-1 {100 * v['top1']:.2f} %, same top-1 as ours ort-x86 "
                      f"{100 * v['same_top1_as_ours_ort_x86']:.2f} %")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="large,small", help="comma list of large / small (default: both; \"\": none)")
    p.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma list (default: every installed one)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--calibration-size", type=int, default=64)
    p.add_argument("--accuracy", action="store_true", help="also score every artifact of the embedded default")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)

    import torch

    from calibration.datasets import open_dataset
    from compress.models.mobilenetv3 import mobilenet_v3_large, mobilenet_v3_small
    from eval.latency import interleave
    from eval.model_info import machine_info

    torch.set_num_threads(args.threads)
    runtimes = [r for r in args.runtimes.split(",") if importlib.util.find_spec(RUNTIMES[r]) is not None]
    skipped = [r for r in args.runtimes.split(",") if r not in runtimes]
    result: dict[str, Any] = {"threads": args.threads, "machine": machine_info(), "not_installed": skipped,
                              "models": {}}
    for name in [m for m in args.models.split(",") if m]:  # --models "": the accuracy alone
        torch.manual_seed(0)
        model = (mobilenet_v3_large if name == "large" else mobilenet_v3_small)(num_classes=1000).eval()
        source = open_dataset("synthetic", 224)
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        with tempfile.TemporaryDirectory() as tmp:
            ours_x86, inputs = build(model, source, Path(tmp), args.calibration_size)
            per: dict[str, Any] = {}
            for runtime in runtimes:
                runners = variants_for(runtime, inputs, ours_x86, args.threads)
                lat = interleave({k: (lambda f: lambda: f(x))(f) for k, f in runners.items()}, threads=args.threads,
                                 rounds=args.rounds, round_time_s=0.3)
                base = lat["fp32"]["median"]
                per[runtime] = {k: {"median_ms": v["median"], "spread": v["spread"],
                                    "speedup_vs_fp32": round(base / v["median"], 3)} for k, v in lat.items()}
                for k, v in per[runtime].items():
                    print(f"{name:5s} {runtime:11s} {k:32s} {v['median_ms']:7.3f} ms  {v['speedup_vs_fp32']:.2f}x")
            result["models"][name] = per
    if args.accuracy:
        result["accuracy"] = accuracy(runtimes, args.threads, 512)
    if args.json:
        from compress.io import write_json

        write_json(args.json, result)
    print(json.dumps({m: {r: {k: v["speedup_vs_fp32"] for k, v in d.items()} for r, d in per.items()}
                      for m, per in result["models"].items()}))
    return result


if __name__ == "__main__":
    main()
