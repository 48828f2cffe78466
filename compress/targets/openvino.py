"""``openvino``: Intel edge CPUs, the table's scales in a QDQ ONNX shaped for OpenVINO's int8 fusions.

OpenVINO reads a QDQ ONNX as FakeQuantize nodes (the scales survive exactly) and runs convolutions in u8.  What
decides its speed is what it can fuse; what decides its agreement with the other targets is which tensors it
rounds.  The graph follows the placement OpenVINO's own quantizer (NNCF) chooses, with one x86 rounding kept:

* h-swish stays one ``HardSwish`` op (onnxruntime's optimizer, which would expand it, is skipped) and there is
  no Q/DQ between a conv and its activation: the activation becomes the conv's post-op - except at the stem,
  whose output keeps the x86 graph's grid.  Measured on the default (full test split, same top-1 as the x86 int8):
  every conv output rounded as on x86 99.11 % but 1.2-1.4x NNCF's latency on Large @224; none rounded (NNCF's
  placement) 98.67 %; only the stem's dropped 98.73 %; only the stem's kept 99.05 % at NNCF's speed.  The first
  layer's rounding is the one the rest of the network inherits;
* the SE gate is written ``Add(3) -> Clip(0, 6) -> Mul(1/6)`` in float, which OpenVINO fuses into fc2's conv
  (an ONNX ``HardSigmoid`` would stay a separate fp32 node with reorders around it); fc2's output stays float and
  the gate's output keeps the fixed 1/255 grid: ``round(255 hsig(x)) / 255``, the x86 gate's codes exactly;
* Q/DQ stay on every conv input, both residual-add inputs and both SE-product inputs, with the table's scales;
  no depthwise padding (it buys nothing here).

Latency is timed against OpenVINO's own fp32 with ``INFERENCE_PRECISION_HINT=f32`` (a true fp32 baseline; the
CPU plugin runs "fp32" models in bf16 by default where the CPU has it, reported beside as ``bf16``).
"""
from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compress.onnx.graph import fix_batch
from compress.targets.base import BuildInputs, Runner, Target
from compress.targets.table import table_qat_params

__all__ = ["OpenVINO", "drop_qdq_into", "hardsigmoid_as_clip", "stem_activation_input"]


def drop_qdq_into(model: onnx.ModelProto, consumer_ops=("HardSwish", "HardSigmoid"), keep=()
                  ) -> tuple[onnx.ModelProto, int]:
    """Remove the Q -> DQ pairs of tensors read only by ``consumer_ops`` (a conv output feeding its activation),
    except the tensors in ``keep``: that tensor stays float, as NNCF leaves it.  Every other scale is untouched.
    Returns (model, pairs removed)."""
    m = copy.deepcopy(model)
    g = m.graph
    readers = defaultdict(list)
    for n in g.node:
        for i in n.input:
            readers[i].append(n)
    drop, removed = set(), 0
    for q in list(g.node):
        dqs = readers[q.output[0]] if q.op_type == "QuantizeLinear" else []
        if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs) or q.input[0] in keep:
            continue
        users = [r for d in dqs for r in readers[d.output[0]]]
        if not users or any(r.op_type not in consumer_ops for r in users):
            continue
        for d in dqs:
            for r in readers[d.output[0]]:
                for k, name in enumerate(r.input):
                    if name == d.output[0]:
                        r.input[k] = q.input[0]
            drop.add(id(d))
        drop.add(id(q))
        removed += 1
    keep = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in g.node for i in n.input}
    for i in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(i)
    return m, removed


def stem_activation_input(model: onnx.ModelProto) -> str | None:
    """The tensor the network's first HardSwish reads (the stem conv's output; nodes are in topological order),
    seen through the Q/DQ pair in front of it."""
    producer = {o: n for n in model.graph.node for o in n.output}
    first = next((n for n in model.graph.node if n.op_type == "HardSwish"), None)
    if first is None:
        return None
    dq = producer.get(first.input[0])
    if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in producer:
        return producer[dq.input[0]].input[0]
    return first.input[0]


def hardsigmoid_as_clip(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Each float ``HardSigmoid(alpha=1/6, beta=1/2)`` as ``Add(3) -> Clip(0, 6) -> Mul(1/6)``: the same function,
    in the form OpenVINO's HSigmoid fusion folds into the conv before it."""
    m = copy.deepcopy(model)
    g = m.graph
    for name, v in (("ov.three", 3.0), ("ov.zero", 0.0), ("ov.six", 6.0), ("ov.sixth", 1.0 / 6.0)):
        g.initializer.append(numpy_helper.from_array(np.array(v, np.float32), name))
    nodes, replaced = [], 0
    for n in g.node:
        if n.op_type != "HardSigmoid":
            nodes.append(n)
            continue
        b = n.name or n.output[0]
        nodes += [helper.make_node("Add", [n.input[0], "ov.three"], [b + "/plus3"], name=b + "/Add"),
                  helper.make_node("Clip", [b + "/plus3", "ov.zero", "ov.six"], [b + "/relu6"], name=b + "/Clip"),
                  helper.make_node("Mul", [b + "/relu6", "ov.sixth"], [n.output[0]], name=b + "/Mul")]
        replaced += 1
    del g.node[:]
    g.node.extend(nodes)
    return m, replaced


class OpenVINO(Target):
    name, runtime, suffix = "openvino", "OpenVINO (CPU plugin)", ".onnx"
    extra, module = "openvino", "openvino"
    fixed_batch = 1
    notes = ("NNCF's placement: HardSwish op as the conv's post-op (the stem's output keeps its x86 grid), SE "
             "gate as Add/Clip/Mul fused into fc2")

    def build(self, inputs: BuildInputs) -> bytes:
        from compress.quant.core import prepare_float, quantize_prepared

        rec = inputs.recipe.with_overrides("quantize", hswish="hardswish", hard_sigmoid="op",
                                           depthwise_channel_multiple=0, pad_input_channels=False)
        work = inputs.workdir / "openvino"
        work.mkdir(parents=True, exist_ok=True)
        prepared_path = prepare_float(inputs.fp32_onnx, rec.quantize, work, optimize=False)
        prepared = onnx.load(str(prepared_path))
        # the SE gate's input (fc2's output) is no table tensor: a placeholder grid, removed with its Q/DQ below
        gate_inputs = {n.input[0]: (6 / 255, 128) for n in prepared.graph.node if n.op_type == "HardSigmoid"}
        params = table_qat_params(inputs.table, prepared, extra=gate_inputs)
        graph = quantize_prepared(prepared_path, None, rec, work, extra_excluded=inputs.table.excluded,
                                  qat_params=params)
        model, _ = drop_qdq_into(graph.model, keep={stem_activation_input(graph.model)})
        model, _ = hardsigmoid_as_clip(model)
        model = fix_batch(model, self.fixed_batch)
        del model.metadata_props[:]
        model.metadata_props.extend(inputs.fp32_onnx.metadata_props)
        return model.SerializeToString()

    def build_fp32(self, inputs: BuildInputs) -> dict[str, bytes]:
        fp32 = fix_batch(inputs.fp32_onnx, self.fixed_batch).SerializeToString()
        return {"fp32": fp32, "bf16": fp32}

    def runner(self, artifact: bytes, threads: int, variant: str = "int8") -> Runner:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(artifact, b"") if isinstance(artifact, bytes) else core.read_model(artifact)
        config: dict[str, Any] = {"INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY",
                                  "NUM_STREAMS": 1}
        if variant != "bf16":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        request = core.compile_model(model, "CPU", config).create_infer_request()

        def run(x: np.ndarray) -> np.ndarray:
            return np.asarray(request.infer({0: x})[0]).copy()

        return run

    def scales(self, artifact: bytes):
        """(s, z) from every activation FakeQuantize (levels 256: ``input_low = -z s``, ``input_high = (255 - z)
        s``), keyed by the ONNX tensor it quantizes; per-channel weight scales from ``Multiply`` constants."""
        import openvino as ov

        model = ov.Core().read_model(artifact, b"")
        acts: dict[str, tuple[float, int]] = {}
        for op in model.get_ops():
            if op.get_type_name() != "FakeQuantize" or op.input_value(0).get_node().get_type_name() == "Constant":
                continue
            levels = int(op.get_attributes()["levels"])
            lo, hi = (float(op.input_value(k).get_node().get_data().reshape(-1)[0]) for k in (1, 2))
            s = (hi - lo) / (levels - 1)
            for name in op.input_value(0).get_names():
                acts[name] = (s, int(round(-lo / s)))
        return acts, _weight_scales(model)

    def extras(self, artifact: bytes, workdir) -> dict[str, Any]:
        """What the CPU plugin runs: nodes and the ones left in fp32 (f32 hint)."""
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(core.read_model(artifact, b""), "CPU",
                                      {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"})
        ops = compiled.get_runtime_model().get_ops()
        kinds = [(op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str))
                 for op in ops]
        compute = [(t, p) for t, p in kinds if t not in ("Input", "Output", "Constant", "Reorder")]
        return {"runtime_nodes": len(compute), "fp32_nodes": sum(1 for _, p in compute if p == "f32"),
                "u8_convolutions": sum(1 for t, p in compute if t == "Convolution" and p in ("u8", "i8"))}


def _weight_scales(model) -> dict[str, np.ndarray]:
    """{ONNX Conv / Gemm node name: per-channel scale} from Conv <- [Reshape] <- Multiply(Convert(Constant i8)
    [- zp], scale).  The frontend names the bias-less op ``<node>/WithoutBiases`` (the bias is an Add after it)."""
    import openvino as ov

    out = {}
    for op in model.get_ops():
        if op.get_type_name() not in ("Convolution", "GroupConvolution", "MatMul"):
            continue
        w = op.input_value(1).get_node()
        while w.get_type_name() in ("Reshape", "Transpose", "Squeeze", "Unsqueeze"):
            w = w.input_value(0).get_node()
        if w.get_type_name() != "Multiply":
            continue
        for k in (0, 1):
            c = w.input_value(k).get_node()
            while c.get_type_name() in ("Reshape", "Convert", "Broadcast", "Unsqueeze", "Squeeze"):
                c = c.input_value(0).get_node()
            if (c.get_type_name() == "Constant" and w.input_value(k).get_node().get_type_name() != "Subtract"
                    and c.get_output_element_type(0) == ov.Type.f32):
                name = op.get_friendly_name().removesuffix("/WithoutBiases")
                out[name] = np.asarray(c.get_data(), np.float32).reshape(-1)
    return out
