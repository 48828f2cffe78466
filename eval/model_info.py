"""Facts about a model and the machine it is measured on: loading, input shape, MACs, params, CPU.

MACs are counted from the ONNX graph at batch 1 and the model's input size: every Conv (and its int8 forms
ConvInteger / QLinearConv), Gemm (and com.microsoft QGemm), MatMul (and MatMulInteger / QLinearMatMul) counts
``output elements x reduction length`` multiply-accumulates.  That includes the squeeze-excitation FC layers (1x1
convs on a 1x1 map) and the classifier; bias adds, activations, pooling, the SE gate multiply and residual adds
are not MACs and are not counted.  A QDQ int8 model keeps its Conv/Gemm nodes (weights come through
DequantizeLinear), so it counts the same MACs as its float source - unless its graph was padded for int8
kernels (the project's ``ort-x86`` graphs pad depthwise convs to 16 channels and the stem to 4 input channels,
:mod:`compress.onnx.padding`): then :func:`count_macs` counts what the kernels execute, zero channels included,
and the network's own MACs are recorded in the ``mnv3_compress.macs`` metadata (:func:`network_macs`).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from calibration.preprocess import Preprocess
from compress.errors import UserError
from compress.onnx.metadata import get_metadata

ModelLike = Union[str, os.PathLike, bytes, onnx.ModelProto]

# /proc/cpuinfo flags that decide int8 speed on CPUs (x86: VNNI/AMX; Arm: dot product, i8mm, SVE)
ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
             "amx_bf16", "asimddp", "i8mm", "sve", "sve2")

_CONV_WEIGHT_INPUT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}
_MATMUL_INPUTS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3)}
_GEMM_INPUTS = {"Gemm": (0, 1), "QGemm": (0, 3)}


# -- loading --------------------------------------------------------------------------------------------

def load_model(model: ModelLike) -> onnx.ModelProto:
    """A ModelProto from a path, serialized bytes or a ModelProto; missing or corrupt files raise UserError."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray)):
        try:
            proto = onnx.load_from_string(bytes(model))
        except Exception as e:  # protobuf DecodeError and friends
            raise UserError(f"not a valid ONNX model ({len(model)} bytes): {_first_line(e)}") from None
        return _check_nonempty(proto, "the given bytes")
    path = Path(model)
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    try:
        proto = onnx.load(str(path))
    except Exception as e:
        raise UserError(f"{path} is not a valid ONNX model: {_first_line(e)}") from None
    return _check_nonempty(proto, str(path))


def model_bytes(model: ModelLike) -> bytes:
    """The serialized model (what an InferenceSession is built from)."""
    if isinstance(model, (bytes, bytearray)):
        load_model(model)  # validate
        return bytes(model)
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    load_model(model)
    return Path(model).read_bytes()


def size_bytes(model: ModelLike) -> int:
    """File size on disk (path) or serialized size (bytes / ModelProto)."""
    if isinstance(model, (bytes, bytearray)):
        return len(model)
    if isinstance(model, onnx.ModelProto):
        return model.ByteSize()
    return Path(model).stat().st_size


def _check_nonempty(proto: onnx.ModelProto, what: str) -> onnx.ModelProto:
    # protobuf parses many non-ONNX byte strings into an empty message: reject a model without a graph
    if not proto.graph.node or not proto.graph.input or not proto.graph.output:
        raise UserError(f"{what} is not a valid ONNX model (no graph nodes, inputs or outputs)")
    return proto


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# -- input shape --------------------------------------------------------------------------------------

def metadata_preprocess(proto: onnx.ModelProto) -> Preprocess | None:
    """The Preprocess recorded at export (``mnv3_compress.preprocess``), or None for a foreign model."""
    text = get_metadata(proto).get("preprocess")
    if not text:
        return None
    try:
        return Preprocess.from_json(text)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"model metadata mnv3_compress.preprocess is invalid: {_first_line(e)}") from None


def graph_input(proto: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The one real graph input (initializers listed as inputs by old exporters are skipped)."""
    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise UserError(f"expected a model with one image input, got {len(inputs)} inputs "
                        f"({', '.join(i.name for i in inputs)})")
    return inputs[0]


def graph_input_dims(proto: onnx.ModelProto) -> list[int | None]:
    """Dims of the graph input; None where a dim is symbolic (e.g. the batch)."""
    t = graph_input(proto).type.tensor_type
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def input_size(proto: onnx.ModelProto) -> tuple[int, int] | None:
    """(H, W): the graph's static spatial dims if it has them, else the metadata's, else None."""
    dims = graph_input_dims(proto)
    if len(dims) == 4 and dims[2] and dims[3]:
        return int(dims[2]), int(dims[3])
    pre = metadata_preprocess(proto)
    return tuple(pre.input_size) if pre is not None else None


def input_shape(proto: onnx.ModelProto, batch: int = 1) -> tuple[int, int, int, int]:
    """``(batch, C, H, W)`` to feed the model; UserError when the size cannot be known."""
    dims = graph_input_dims(proto)
    if len(dims) != 4:
        raise UserError(f"model input must be [N, C, H, W], got rank {len(dims)}")
    hw = input_size(proto)
    if hw is None:
        raise UserError("model input size is unknown: its spatial dims are symbolic and it has no "
                        "mnv3_compress.preprocess metadata")
    channels = dims[1] or 3
    if dims[0] not in (None, batch):
        raise UserError(f"model has a fixed batch of {dims[0]}, cannot run batch {batch}")
    return batch, int(channels), int(hw[0]), int(hw[1])


# -- params and MACs ------------------------------------------------------------------------------------

def model_params(onnx_model: ModelLike) -> int | None:
    """Parameter count recorded at export (torchvision's count, on the torch model); None if not recorded."""
    value = get_metadata(load_model(onnx_model)).get("params")
    if value is None:
        return None
    try:
        return int(json.loads(value))
    except (ValueError, TypeError):
        return None


def _inferred_shapes(proto: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Static shapes of every tensor at batch 1 and the model's input size (onnx shape inference)."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    del m.graph.value_info[:]  # stale dynamic-batch shapes from the exporter would conflict
    inp = graph_input(m)
    shape = input_shape(m, batch=1)
    dims = inp.type.tensor_type.shape.dim
    for d, v in zip(dims, shape):
        d.Clear()
        d.dim_value = v
    for out in m.graph.output:  # let inference decide the output batch instead of a symbol
        for d in out.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                d.Clear()
    try:
        m = shape_inference.infer_shapes(m, data_prop=True)
    except Exception as e:
        raise UserError(f"cannot infer the model's tensor shapes: {_first_line(e)}") from None
    shapes: dict[str, list[int | None]] = {}
    for vi in list(m.graph.input) + list(m.graph.value_info) + list(m.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for init in m.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _static(shape: list[int | None] | None) -> bool:
    return bool(shape) and all(isinstance(d, int) and d > 0 for d in shape)


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _conv_out_spatial(node: onnx.NodeProto, in_shape: list[int], w_shape: list[int]) -> list[int]:
    """Conv output spatial dims from attributes, when shape inference could not give them."""
    spatial = in_shape[2:]
    k = list(_attr(node, "kernel_shape", w_shape[2:]))
    n = len(spatial)
    strides = list(_attr(node, "strides", [1] * n))
    dil = list(_attr(node, "dilations", [1] * n))
    pads = list(_attr(node, "pads", [0] * 2 * n))
    auto = _attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    out = []
    for i in range(n):
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-spatial[i] // strides[i]))
        else:
            eff = dil[i] * (k[i] - 1) + 1
            pad = 0 if auto == "VALID" else pads[i] + pads[i + n]
            out.append((spatial[i] + pad - eff) // strides[i] + 1)
    return out


def _shapes_by_running(proto: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Shapes of every node output from one onnxruntime run at batch 1 (for graphs with com.microsoft
    ops such as QLinearAdd, which onnx shape inference cannot see through)."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    shape = input_shape(m, batch=1)
    inp = graph_input(m)
    for d, v in zip(inp.type.tensor_type.shape.dim, shape):
        d.Clear()
        d.dim_value = v
    have = {o.name for o in m.graph.output}
    for node in m.graph.node:
        for name in node.output:
            if name and name not in have:
                m.graph.output.add().name = name
                have.add(name)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        outs = sess.run(None, {inp.name: np.zeros(shape, dtype=dtype)})
    except Exception as e:
        raise UserError(f"cannot infer the model's tensor shapes: {_first_line(e)}") from None
    shapes = {o.name: list(r.shape) for o, r in zip(sess.get_outputs(), outs)}
    shapes[inp.name] = list(shape)
    for init in m.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _needs_shapes(proto: onnx.ModelProto, shapes: dict[str, list[int | None]]) -> bool:
    for node in proto.graph.node:
        if node.op_type in _CONV_WEIGHT_INPUT or node.op_type in _GEMM_INPUTS or node.op_type in _MATMUL_INPUTS:
            if not (_static(shapes.get(node.input[0])) and _static(shapes.get(node.output[0]))):
                return True
    return False


def count_macs(onnx_model: ModelLike) -> int:
    """Multiply-accumulates of Conv / ConvInteger / QLinearConv, Gemm / QGemm, MatMul / MatMulInteger /
    QLinearMatMul at batch 1 and the model's input size (see the module docstring for what is counted)."""
    proto = load_model(onnx_model)
    shapes = _inferred_shapes(proto)
    if _needs_shapes(proto, shapes):
        shapes = _shapes_by_running(proto)
    total = 0
    for node in proto.graph.node:
        op = node.op_type
        if op in _CONV_WEIGHT_INPUT:
            w = shapes.get(node.input[_CONV_WEIGHT_INPUT[op]])
            x = shapes.get(node.input[0])
            y = shapes.get(node.output[0])
            if not _static(w):
                raise UserError(f"cannot count MACs: {op} node {node.name!r} has a weight of unknown shape")
            if _static(y):
                out_elems = int(np.prod(y))
            elif _static(x):
                out_elems = x[0] * w[0] * int(np.prod(_conv_out_spatial(node, x, w)))
            else:
                raise UserError(f"cannot count MACs: {op} node {node.name!r} has an input of unknown shape")
            total += out_elems * int(np.prod(w[1:]))  # Cin/groups * kh * kw per output element
        elif op in _GEMM_INPUTS:
            ia, ib = _GEMM_INPUTS[op]
            a, b = shapes.get(node.input[ia]), shapes.get(node.input[ib])
            if not (_static(a) and _static(b)) or len(a) != 2 or len(b) != 2:
                raise UserError(f"cannot count MACs: {op} node {node.name!r} has inputs of unknown shape")
            m, k = (a[1], a[0]) if _attr(node, "transA", 0) else (a[0], a[1])
            n = b[0] if _attr(node, "transB", 0) else b[1]
            total += m * k * n
        elif op in _MATMUL_INPUTS:
            ia, ib = _MATMUL_INPUTS[op]
            a, y = shapes.get(node.input[ia]), shapes.get(node.output[0])
            if not (_static(a) and _static(y)):
                raise UserError(f"cannot count MACs: {op} node {node.name!r} has inputs of unknown shape")
            total += int(np.prod(y)) * a[-1]
    return int(total)


def network_macs(onnx_model: ModelLike) -> int:
    """The network's MACs: ``mnv3_compress.macs`` when the writer recorded them (a graph padded with zero
    channels executes more, see the module docstring), else :func:`count_macs`."""
    proto = load_model(onnx_model)
    value = get_metadata(proto).get("macs")
    try:
        return int(json.loads(value)) if value is not None else count_macs(proto)
    except (ValueError, TypeError):
        return count_macs(proto)


def initializer_params(onnx_model: ModelLike) -> int:
    """Elements stored in the graph's initializers (a fallback when the export metadata is missing)."""
    proto = load_model(onnx_model)
    return int(sum(int(np.prod(numpy_helper.to_array(i).shape)) for i in proto.graph.initializer))


# -- machine ------------------------------------------------------------------------------------------

def _cpuinfo() -> tuple[str | None, set[str]]:
    name, flags = None, set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if name is None and key in ("model name", "hardware", "cpu model"):
            name = value.strip() or None
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return name, flags


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """The machine a latency was measured on: CPU name, usable logical cores, int8-relevant ISA flags,
    onnxruntime and torch versions (read from the installed distributions, without importing torch)."""
    name, flags = _cpuinfo()
    if not name:
        name = platform.processor() or platform.machine() or None
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count()
    ort_version = _version("onnxruntime")
    if ort_version is None:
        try:
            import onnxruntime

            ort_version = onnxruntime.__version__
        except ImportError:
            pass
    return {"cpu": name, "cores": cores, "isa": [f for f in ISA_FLAGS if f in flags],
            "onnxruntime": ort_version, "torch": _version("torch")}
