"""``executorch``: PyTorch's on-device runtime, the network lowered to one XNNPACK delegate (``.pte``).

Built from the one quantization (:mod:`compress.targets.executorch_pt2e`): the float network exported with
``torch.export``, annotated with XNNPACKQuantizer's placement (SE gate folded into fc2, pools un-shared, excluded
nodes float), every observer replaced by the table's scale, converted with ``convert_pt2e`` and lowered with
``to_edge_transform_and_lower`` + ``XnnpackPartitioner``.  One change to the lowering: the input's NCHW -> NHWC
transpose runs in fp32 before the input is quantized (XNNPACK's int8 transpose of a 3-channel image costs more
than the stem conv; its fp32 one a third of that).  No forward pass is needed (every observer is fixed before
any data), so the calibration images are not used.  The program is static at batch 1.  It runs in
``executorch.runtime`` with XNNPACK's threadpool set to the measurement's thread count; the fp32 baseline is the
same float network lowered to XNNPACK unquantized.

The scales are read back from the converted program (:meth:`ExecuTorch.scales`), and :func:`delegate_qparams`
checks the ``.pte`` itself: its XNNPACK flatbuffer must hold exactly those grids and weight scales.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import UserError
from compress.targets.base import BuildInputs, Runner, Target, require

__all__ = ["ExecuTorch", "lower", "pte_facts", "delegate_qparams"]


def _nhwc_input(name: str):
    """An edge pass: the user input ``name`` is made channels-last (an fp32 copy) before anything reads it, so
    XNNPACK transposes the float image and quantizes it in NHWC, instead of transposing int8 codes."""
    import torch
    from executorch.exir.dialects._ops import ops as exir_ops
    from torch.fx.passes.infra.pass_base import PassResult

    def run(gm: torch.fx.GraphModule) -> PassResult:
        x = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == name), None)
        if x is None or getattr(x.meta.get("val"), "ndim", 0) != 4:
            return PassResult(gm, False)
        users = list(x.users)
        with gm.graph.inserting_after(x):
            nhwc = gm.graph.call_function(exir_ops.edge.dim_order_ops._to_dim_order_copy.default, (x,),
                                          {"dim_order": [0, 2, 3, 1]})
        val = x.meta["val"]
        with val.fake_mode:
            nhwc.meta["val"] = val.contiguous(memory_format=torch.channels_last)
        for u in users:
            u.replace_input_with(x, nhwc)
        gm.recompile()
        return PassResult(gm, True)

    return run


def lower(module, shape: tuple[int, ...], nhwc_input: bool = False) -> bytes:
    """``module`` (a torch module) exported at ``shape`` and lowered to XNNPACK: the ``.pte`` bytes."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    ep = torch.export.export(module, (torch.zeros(shape),), strict=False)
    passes = [_nhwc_input(ep.graph_signature.user_inputs[0])] if nhwc_input else None
    edge = to_edge_transform_and_lower(ep, transform_passes=passes, partitioner=[XnnpackPartitioner()])
    return edge.to_executorch().buffer


def pte_facts(artifact: bytes) -> dict[str, Any]:
    """Read from the ``.pte`` itself: its delegate partitions (by backend) and the operators run outside them."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    plan = deserialize_pte_binary(bytes(artifact)).program.execution_plan[0]
    calls = Counter(plan.operators[i.instr_args.op_index].name for i in plan.chains[0].instructions
                    if type(i.instr_args).__name__ == "KernelCall")
    return {"delegate_partitions": len(plan.delegates),
            "delegate_backends": dict(Counter(d.id for d in plan.delegates)),
            "ops_outside_delegates": dict(calls)}


_QINT8, _QCINT8 = 3, 6  # XNNDatatype (backends/xnnpack/serialization/schema.fbs)
_PER_CHANNEL, _PER_TENSOR = 1, 2  # XNNQuantParams


def _fb_vector(t, field: int) -> list:
    from flatbuffers.table import Table

    o = t.Offset(4 + 2 * field)
    return [Table(t.Bytes, t.Indirect(t.Vector(o) + 4 * j)) for j in range(t.VectorLen(o))] if o else []


def _fb_scalar(t, field: int, flags, default=0):
    o = t.Offset(4 + 2 * field)
    return t.Get(flags, o + t.Pos) if o else default


def _fb_union(t, field: int):
    from flatbuffers.table import Table

    o = t.Offset(4 + 2 * field)
    if not o:
        return None
    u = Table(bytearray(), 0)
    t.Union(u, o)
    return u


def delegate_qparams(artifact: bytes) -> tuple[set[tuple[float, int]], list[np.ndarray]]:
    """What the ``.pte``'s XNNPACK delegates really carry, read from their flatbuffers (schema.fbs): the int8
    (scale, zero point) of every per-tensor quantized value, and the scales of every per-channel int8 weight."""
    import flatbuffers
    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader
    from executorch.exir._serialize._program import deserialize_pte_binary
    from flatbuffers import number_types as nt
    from flatbuffers.table import Table

    pte = deserialize_pte_binary(bytes(artifact))
    named = pte.named_data
    acts: set[tuple[float, int]] = set()
    weights: list[np.ndarray] = []
    for blob in pte.program.backend_delegate_data:
        data = bytes(blob.data)
        h = XNNHeader.from_bytes(data[:XNNHeader.EXPECTED_LENGTH])
        buf = bytearray(data[h.flatbuffer_offset:h.flatbuffer_offset + h.flatbuffer_size])
        graph = Table(buf, flatbuffers.encode.Get(nt.UOffsetTFlags.packer_type, buf, 0))
        keys = [c.String(c.Offset(8) + c.Pos).decode() if c.Offset(8) else "" for c in _fb_vector(graph, 8)]
        for value in _fb_vector(graph, 2):  # XNNGraph.xvalues -> XValue
            q = _fb_union(value, 1) if _fb_scalar(value, 0, nt.Uint8Flags) == 2 else None  # XNNQuantizedTensorValue
            if q is None:
                continue
            dtype = _fb_scalar(Table(q.Bytes, q.Indirect(q.Offset(4) + q.Pos)), 0, nt.Int16Flags)  # tensor_value
            kind, params = _fb_scalar(q, 1, nt.Uint8Flags), _fb_union(q, 2)
            if dtype == _QINT8 and kind == _PER_TENSOR:
                acts.add((float(_fb_scalar(params, 0, nt.Float32Flags)), int(_fb_scalar(params, 1, nt.Int32Flags))))
            elif dtype == _QCINT8 and kind == _PER_CHANNEL:
                o = params.Offset(4)
                if o and params.VectorLen(o):
                    weights.append(params.GetVectorAsNumpy(nt.Float32Flags, o).astype(np.float32))
                else:
                    entry = named.pte_data[keys[_fb_scalar(params, 2, nt.Uint32Flags)]]
                    n = _fb_scalar(params, 3, nt.Uint32Flags)
                    weights.append(np.frombuffer(named.buffers[entry.buffer_index], np.float32)[:n].copy())
    return acts, weights


def _digest(artifact: bytes) -> str:
    return hashlib.sha256(bytes(artifact)).hexdigest()


class ExecuTorch(Target):
    name, runtime, suffix = "executorch", "ExecuTorch (XNNPACK)", ".pte"
    extra, module = "executorch", "executorch"
    fixed_batch = 1
    notes = ("XNNPACKQuantizer's placement with the table's scales (h-swish as XNNPACK's int8 lookup table, pools "
             "un-shared), SE gate folded into fc2 as on x86, input transposed in fp32; 1 XNNPACK delegate, batch 1")

    def __init__(self) -> None:
        self._built: dict[str, dict[str, Any]] = {}  # sha256 of a .pte built here -> its converted program's facts

    def check_installed(self) -> None:
        require("executorch", "executorch")
        require("torchao", "executorch")

    def build(self, inputs: BuildInputs) -> bytes:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        from compress.targets import executorch_pt2e as pt2e

        shape = (1, inputs.channels, *inputs.input_size)
        names = pt2e.GraphNames(inputs.fp32_onnx, inputs.table.excluded)
        model, folded = pt2e.fold_se_gates(inputs.float_model)
        prepared = pt2e.prepare(model, shape, pt2e.table_quantizer(names))
        imposed = pt2e.impose(prepared, inputs.table, names, folded)
        converted = convert_pt2e(prepared, fold_quantize=True)
        artifact = lower(converted, shape, nhwc_input=True)
        self._built[_digest(artifact)] = {
            "read_back": pt2e.converted_scales(converted, names, folded), "from_table": imposed.from_table,
            "weights_imposed": imposed.weights, "derived": imposed.derived, "folded_gates": len(folded),
            "float_nodes": sorted(inputs.table.excluded)}
        return artifact

    def build_fp32(self, inputs: BuildInputs) -> dict[str, bytes]:
        import copy

        model = copy.deepcopy(inputs.float_model).cpu().eval()
        return {"fp32": lower(model, (1, inputs.channels, *inputs.input_size))}

    peer_name = "XNNPACKQuantizer"

    def peer(self, inputs: BuildInputs) -> bytes:
        """ExecuTorch's own int8, for comparison: the stock XNNPACKQuantizer (per-channel symmetric) through
        prepare_pt2e, calibrated on the same images one at a time (the program is static at batch 1),
        convert_pt2e, lowered as ``build`` lowers (one XNNPACK delegate)."""
        import copy

        import torch
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                              get_symmetric_quantization_config)
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        shape = (1, inputs.channels, *inputs.input_size)
        model = copy.deepcopy(inputs.float_model).cpu().eval()
        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        prepared = prepare_pt2e(torch.export.export(model, (torch.zeros(shape),), strict=False).module(),
                                quantizer)
        with torch.no_grad():
            for batch in inputs.calibration:
                for row in np.asarray(batch, np.float32):
                    prepared(torch.from_numpy(row[None]))
        return lower(convert_pt2e(prepared, fold_quantize=True), shape)

    def runner(self, artifact: bytes, threads: int, variant: str = "int8") -> Runner:
        import torch
        from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count, _unsafe_reset_threadpool
        from executorch.runtime import Runtime

        if _threadpool_get_thread_count() != int(threads):
            _unsafe_reset_threadpool(int(threads))
        program = Runtime.get().load_program(bytes(artifact))
        method = program.load_method("forward")

        def run(x: np.ndarray, _program=program) -> np.ndarray:  # the program outlives its method
            x = np.ascontiguousarray(x, np.float32)
            outs = [method.execute([torch.from_numpy(x[i:i + 1])])[0].numpy().copy() for i in range(len(x))]
            return np.concatenate(outs)

        return run

    def scales(self, artifact: bytes):
        """Read back from the converted PT2E program the ``.pte`` was lowered from (quantize nodes' scale / zero
        point, uint8 convention; weight scales per conv / Gemm node)."""
        built = self._built.get(_digest(artifact))
        if built is None:
            raise UserError("executorch: scales are read back from the converted program of a .pte built in this "
                            "process; this .pte was not")
        return built["read_back"].acts, built["read_back"].weights

    def extras(self, artifact: bytes, workdir: Path) -> dict[str, Any]:
        """Partitions and outside ops (from the .pte), what the table gave (imposed / derived / float), and whether
        the delegate's own quantization parameters are the converted program's, every one."""
        facts = pte_facts(artifact)
        built = self._built.get(_digest(artifact))
        if built is None:
            return facts
        facts.update({k: built[k] for k in ("from_table", "weights_imposed", "derived", "folded_gates",
                                            "float_nodes")})
        acts, weights = delegate_qparams(artifact)
        program = built["read_back"]
        facts["delegate_qparams"] = {
            "activation_grids": len(acts), "equal_to_program": acts == program.qparams,
            "weights": len(weights),
            "weights_equal_to_program": sorted(map(tuple, weights)) == sorted(map(tuple, program.weight_scales))}
        return facts
