"""``litert``: LiteRT (TensorFlow Lite) ``.tflite`` for Android, run with its XNNPACK delegate.

The int8 model carries the table's scales: the float network in int8 forms XNNPACK delegates (the x86 graph's
h-swish and SE gate on fixed grids, :mod:`compress.targets.litert_program`) as a PT2E program whose every quantize node holds the
table's parameters, converted by ``litert_torch.convert`` (which turns those Q/DQ nodes into int8 kernels; its own
quantizer is used only to select that static mode).  The whole network lowers to one XNNPACK delegate partition:
:meth:`LiteRT.extras` counts them on the interpreter's graph after delegation, with the ops left outside.

Input and output are float32 by default: the converter makes the boundary int8, and a QUANTIZE / DEQUANTIZE pair
(both delegated) is put back at the graph's ends.  ``--target litert-int8-io`` (``LiteRT(int8_io=True)``) keeps
the int8 boundary some device apps want; its input takes ``round(x / s) + z`` with the input's (s, z) from
``get_input_details()``, as this runner does.

Scales are read back from the ``.tflite``: every int8 tensor an int8 op writes is keyed by the module path and
op that litert-torch records in the tensor's name, through the same naming rule as the build
(:func:`compress.targets.litert_program.point_key`); weights from each conv's / fully-connected's filter.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from compress.targets.base import BuildInputs, Runner, Target

__all__ = ["LiteRT", "delegate_partitions"]

_META = "mnv3_compress"  # the .tflite metadata entry naming the table's input and output tensors
_POINT_OPS = {"CONV_2D": "conv", "DEPTHWISE_CONV_2D": "conv", "FULLY_CONNECTED": "linear", "ADD": "add",
              "MUL": "mul", "MEAN": "pool", "SUM": "pool", "AVERAGE_POOL_2D": "pool"}


class LiteRT(Target):
    name, runtime, suffix = "litert", "LiteRT (XNNPACK delegate)", ".tflite"
    extra, module = "litert", "ai_edge_litert"
    fixed_batch = 1
    notes = ("the x86 graph's int8 forms (h-swish gate a 1x1 depthwise conv where XNNPACK's ADD cannot take the "
             "scales), SE gate on fixed grids; float I/O")

    def __init__(self, int8_io: bool = False) -> None:
        self.int8_io = int8_io
        if int8_io:
            self.name = "litert-int8-io"
            self.notes = self.notes.replace("float I/O", "int8 input and output")

    def check_installed(self) -> None:
        super().check_installed()
        from compress.targets.base import require

        require("litert_torch", self.extra)

    def build(self, inputs: BuildInputs) -> bytes:
        import torch

        from compress.targets.litert_program import table_program

        io = (inputs.fp32_onnx.graph.input[0].name, inputs.fp32_onnx.graph.output[0].name)
        shape = (self.fixed_batch, 3, *inputs.input_size)
        program, _ = table_program(inputs.float_model, inputs.table, shape, io)
        data = _convert(program, torch.zeros(shape), quantized=True)
        if not self.int8_io:
            data = float_io(data)
        meta = {"input": io[0], "output": io[1], "io": "int8" if self.int8_io else "float32",
                "source": inputs.table.source, **{p.key: p.value for p in inputs.fp32_onnx.metadata_props}}
        return with_metadata(data, meta)

    def build_fp32(self, inputs: BuildInputs) -> dict[str, bytes]:
        import torch

        shape = (self.fixed_batch, 3, *inputs.input_size)
        return {"fp32": _convert(inputs.float_model.cpu().eval(), torch.zeros(shape), quantized=False)}

    peer_name = "litert-torch PT2EQuantizer"

    def peer(self, inputs: BuildInputs) -> bytes:
        """litert-torch's own int8, for comparison: its PT2EQuantizer (per-channel symmetric, histogram observers)
        calibrated on the same images, converted the same way (int8 input and output, as it makes them)."""
        import torch
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        x = torch.zeros(self.fixed_batch, 3, *inputs.input_size)
        quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        model = torch.export.export(inputs.float_model.cpu().eval(), (x,), strict=False).module()
        prepared = prepare_pt2e(model, quantizer)
        with torch.no_grad():
            for batch in inputs.calibration:  # the program is static at batch 1
                for row in np.asarray(batch, np.float32):
                    prepared(torch.from_numpy(row[None]))
        return _convert(convert_pt2e(prepared, fold_quantize=False), x, quantized=True)

    def runner(self, artifact: bytes, threads: int, variant: str = "int8") -> Runner:
        from ai_edge_litert.interpreter import Interpreter

        it = Interpreter(model_content=artifact, num_threads=int(threads))  # XNNPACK: the default delegate
        it.allocate_tensors()
        inp, out = it.get_input_details()[0], it.get_output_details()[0]
        s_in, z_in = inp["quantization"]
        s_out, z_out = out["quantization"]

        def one(x: np.ndarray) -> np.ndarray:
            if inp["dtype"] == np.int8:
                x = np.clip(np.round(x / s_in) + z_in, -128, 127)
            it.set_tensor(inp["index"], np.ascontiguousarray(x, dtype=inp["dtype"]))
            it.invoke()
            y = it.get_tensor(out["index"])
            return (y.astype(np.float32) - z_out) * s_out if out["dtype"] == np.int8 else y.copy()

        def run(x: np.ndarray) -> np.ndarray:
            return np.concatenate([one(x[i:i + 1]) for i in range(len(x))])

        return run

    def scales(self, artifact: bytes) -> tuple[dict[str, tuple[float, int]], dict[str, np.ndarray]]:
        return read_scales(artifact)

    def extras(self, artifact: bytes, workdir: Path) -> dict[str, Any]:
        parts, outside, ops = delegate_partitions(artifact)
        left = ", ".join(f"{n} {op}" for op, n in sorted(outside.items())) or "none"
        return {"xnnpack_partitions": parts, "ops_outside_delegate": outside, "tflite_ops": sum(ops.values()),
                "io": "int8" if self.int8_io else "float32",
                "summary": f"{parts} XNNPACK partition{'s' if parts != 1 else ''} of {sum(ops.values())} ops, "
                           f"outside: {left}"}


@contextlib.contextmanager
def _quiet_litert():
    """litert-torch prints a progress line per conversion stage."""
    old = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = old


def _convert(module, x, quantized: bool) -> bytes:
    """``litert_torch.convert`` of ``module`` (a float model or a converted PT2E program) at input ``x``."""
    import litert_torch

    kwargs: dict[str, Any] = {}
    if quantized:  # the program's own Q/DQ nodes become int8 kernels; the quantizer only selects that mode
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
        from litert_torch.quantize.quant_config import QuantConfig

        mode = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        kwargs["quant_config"] = QuantConfig(pt2e_quantizer=mode)
    with _quiet_litert():
        return bytes(litert_torch.convert(module, (x,), **kwargs).model_content())


# -- the flatbuffer: float I/O, metadata ----------------------------------------------------------------------

def _read(data: bytes):
    from ai_edge_litert.tools import flatbuffer_utils

    return flatbuffer_utils.read_model_from_bytearray(bytearray(data))


def _write(model) -> bytes:
    from ai_edge_litert.tools import flatbuffer_utils

    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _opcode(model, builtin: int) -> int:
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils

    for i, oc in enumerate(model.operatorCodes):
        if flatbuffer_utils.get_builtin_code_from_operator_code(oc) == builtin:
            return i
    oc = fb.OperatorCodeT()
    oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = builtin, min(builtin, 127), 1
    model.operatorCodes.append(oc)
    return len(model.operatorCodes) - 1


def float_io(data: bytes) -> bytes:
    """The model with float32 input and output: QUANTIZE from a new float input onto the int8 one, DEQUANTIZE from
    the int8 output to a new float output (names and signature moved to the float tensors)."""
    from ai_edge_litert import schema_py_generated as fb

    model = _read(data)
    sg = model.subgraphs[0]
    moved: dict[int, int] = {}

    def float_twin(i: int) -> int:
        t = sg.tensors[i]
        f = fb.TensorT()
        f.shape, f.shapeSignature, f.name, f.type = t.shape, t.shapeSignature, t.name, fb.TensorType.FLOAT32
        model.buffers.append(fb.BufferT())
        f.buffer = len(model.buffers) - 1
        t.name = _text(t.name) + "_int8"
        sg.tensors.append(f)
        moved[i] = len(sg.tensors) - 1
        return moved[i]

    def op(builtin: int, ins: list[int], outs: list[int]):
        o = fb.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = _opcode(model, builtin), ins, outs
        return o

    heads = []
    for k, i in enumerate(list(sg.inputs)):
        heads.append(op(fb.BuiltinOperator.QUANTIZE, [float_twin(i)], [i]))
        sg.inputs[k] = moved[i]
    tails = []
    for k, i in enumerate(list(sg.outputs)):
        tails.append(op(fb.BuiltinOperator.DEQUANTIZE, [i], [float_twin(i)]))
        sg.outputs[k] = moved[i]
    sg.operators = heads + list(sg.operators) + tails
    for sd in model.signatureDefs or []:
        for tm in list(sd.inputs or []) + list(sd.outputs or []):
            tm.tensorIndex = moved.get(tm.tensorIndex, tm.tensorIndex)
    return _write(model)


def with_metadata(data: bytes, meta: dict[str, Any]) -> bytes:
    from ai_edge_litert import schema_py_generated as fb

    model = _read(data)
    buf = fb.BufferT()
    buf.data = list(json.dumps(meta, sort_keys=True).encode())
    model.buffers.append(buf)
    entry = fb.MetadataT()
    entry.name, entry.buffer = _META, len(model.buffers) - 1
    model.metadata = list(model.metadata or []) + [entry]
    return _write(model)


def read_metadata(data: bytes) -> dict[str, Any]:
    model = _read(data)
    for m in model.metadata or []:
        if _text(m.name) == _META:
            return json.loads(bytes(bytearray(model.buffers[m.buffer].data)).decode())
    return {}


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# -- reading the artifact back: scales, delegate partitions --------------------------------------------------

def _loc(name: str) -> tuple[str, str, str]:
    """(module path, class, parent class) of one litert-torch location: ``Root/pkg.Class_attr/...``."""
    segs = name.split("/")
    classes, attrs = [segs[0].rsplit(".", 1)[-1]], []
    for seg in segs[1:]:
        cls, _, attr = seg.rsplit(".", 1)[-1].partition("_")
        classes.append(cls)
        attrs.append(attr)
    return ".".join(attrs), classes[-1], classes[-2] if len(classes) > 1 else ""


def _locs(name: str) -> list[tuple[str, str, str]]:
    """The locations a tensor name lists (an op fused with its activation names the activation first)."""
    return [_loc(p) for p in _text(name).split(";") if "/" in p]


def read_scales(data: bytes) -> tuple[dict[str, tuple[float, int]], dict[str, np.ndarray]]:
    """The activation grids (uint8 convention, keyed as the table) and per-channel weight scales (keyed by the
    table's conv / gemm node) the ``.tflite`` carries."""
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils

    from compress.quant.qat import onnx_scope
    from compress.targets.litert_program import point_key

    model = _read(data)
    sg, meta = model.subgraphs[0], read_metadata(data)
    names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    acts: dict[str, tuple[float, int]] = {}
    weights: dict[str, np.ndarray] = {}

    def grid(i: int) -> tuple[float, int] | None:
        t = sg.tensors[i]
        q = t.quantization
        if t.type != fb.TensorType.INT8 or q is None or q.scale is None or len(q.scale) != 1:
            return None
        return float(q.scale[0]), int(q.zeroPoint[0]) + 128

    int8_in = next((op.outputs[0] for op in sg.operators if names[_builtin(op, model, flatbuffer_utils)] == "QUANTIZE"
                    and sg.tensors[op.inputs[0]].type == fb.TensorType.FLOAT32), sg.inputs[0])
    int8_out = next((op.inputs[0] for op in sg.operators if names[_builtin(op, model, flatbuffer_utils)] ==
                     "DEQUANTIZE" and op.outputs[0] in list(sg.outputs)), sg.outputs[0])
    for key, i in ((meta.get("input", "input"), int8_in), (meta.get("output", "logits"), int8_out)):
        if grid(i):
            acts[key] = grid(i)
    for op in sg.operators:
        kind = _POINT_OPS.get(names[_builtin(op, model, flatbuffer_utils)])
        locs = _locs(sg.tensors[op.outputs[0]].name)
        if kind is None:
            continue
        if kind == "mul" and any(_constant(model, sg.tensors[i]) for i in op.inputs if i >= 0):
            kind = "mul_const"
        if locs and grid(op.outputs[0]) and op.outputs[0] != int8_out:  # the output: keyed by its table name
            path, cls, parent = locs[0]
            acts[point_key(path, cls, parent, "relu" if cls == "ReLU" else kind)[0]] = grid(op.outputs[0])
        named = [loc for i in (op.inputs[1:3] if kind in ("conv", "linear") else ()) if i >= 0
                 for loc in _locs(sg.tensors[i].name)] + locs  # filter, bias (a FC's filter has no location)
        conv = next((loc for loc in named if loc[1] in ("Conv2d", "Linear")), None)
        if kind in ("conv", "linear") and conv and conv[2] != "HSwish":
            q = sg.tensors[op.inputs[1]].quantization
            if q is not None and q.scale is not None:
                weights[f"{onnx_scope(conv[0])}/{'Gemm' if conv[1] == 'Linear' else 'Conv'}"] = np.asarray(
                    q.scale, np.float32)
    return acts, weights


def _constant(model, tensor) -> bool:
    data = model.buffers[tensor.buffer].data if tensor.buffer < len(model.buffers) else None
    return data is not None and len(data) > 0


def _builtin(op, model, flatbuffer_utils) -> int:
    return flatbuffer_utils.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex])


def delegate_partitions(data: bytes, threads: int = 1) -> tuple[int, dict[str, int], Counter]:
    """(XNNPACK delegate partitions, {op: count} left outside them, every op of the model) as the interpreter
    has them after applying its default delegate.  A delegate node stands for the ops that produce its outputs
    from its inputs: walking back from its outputs, stopping at its inputs, visits exactly those."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=data, num_threads=threads)
    it.allocate_tensors()
    ops = it._get_ops_details()  # noqa: SLF001 - the interpreter's nodes after delegation (no public API)
    producer = {int(t): o["index"] for o in ops if o["op_name"] != "DELEGATE" for t in o["outputs"]}
    delegates = [o for o in ops if o["op_name"] == "DELEGATE"]
    inside: set[int] = set()
    for d in delegates:
        stop = {int(t) for t in d["inputs"]}
        todo = [int(t) for t in d["outputs"]]
        while todo:
            t = todo.pop()
            if t in stop or t not in producer or producer[t] in inside:
                continue
            inside.add(producer[t])
            todo += [int(i) for i in ops[producer[t]]["inputs"] if i >= 0]
    model_ops = Counter(o["op_name"] for o in ops if o["op_name"] != "DELEGATE")
    outside = Counter(o["op_name"] for o in ops if o["op_name"] != "DELEGATE" and o["index"] not in inside)
    return len(delegates), dict(outside), model_ops
