"""The one quantization every target carries: a scale table, written beside the artifacts as ``scales.json``.

The table is read back from the reference int8 graph (``ort-x86``), whatever made it: calibration (PTQ, tuning,
mixed precision) or QAT's learned scales (exported with ``TensorQuantOverrides``).  It holds

* ``activations``: ``{tensor: (scale, zero_point)}`` of every activation QuantizeLinear, in the uint8 convention
  (an int8 target uses ``zero_point - 128``, the same real grid: exact);
* ``weights``: ``{Conv / Gemm node: per-output-channel scales}``, cut to the float network's channels (the x86
  graph's zero-padded depthwise channels are not part of the network);
* ``ranges``: the real range of every tensor calibration measured, also the ones the x86 graph leaves float (the
  logits, the SE gate's input): targets that quantize more take them from here (marked ``derived``);
* ``excluded``: nodes kept in fp32 (tuning's fallbacks, mixed precision's plan).

Keys are the tensor and node names of the float graph the project's exporter writes; they follow the torch module
paths (``/features/features.4/block/block.2/Mul_output_0`` is ``features.4.block.2``'s product,
:func:`compress.quant.qat.onnx_scope`), so a target built from the torch model maps its quantization points by
module path and operation, and an ONNX target by name.  Why a table and not a PT2E program: QAT's scales live in
eager fake-quant modules that no public API moves into PT2E, ORT's calibration yields tensor ranges, and a plain
JSON table is what every runtime's own quantizer can be told and what every artifact can be checked against.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from compress.errors import UserError
from compress.onnx.graph import producers_consumers, quantized_tensor_name, weight_channel_axis

__all__ = ["ScaleTable", "TABLE_FORMAT", "compare_scales", "table_qat_params"]

TABLE_FORMAT = 1


@dataclass
class ScaleTable:
    activations: dict[str, tuple[float, int]]  # uint8 convention
    weights: dict[str, np.ndarray]  # node -> per-channel scales (float network's channels)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)
    source: str = "calibration"  # "calibration" | "qat"
    weight_bits: int = 8
    reduce_range: bool = False

    # -- reading ----------------------------------------------------------------------------------------
    @classmethod
    def from_int8(cls, int8: onnx.ModelProto, fp32: onnx.ModelProto | None, ranges: Mapping[str, tuple[float, float]] = (),
                  excluded=(), source: str = "calibration", weight_bits: int = 8, reduce_range: bool = False
                  ) -> "ScaleTable":
        """The table of a QDQ int8 graph (``fp32``: the float graph it quantizes, whose channel counts cut the
        padded channels off; None: the scales as the graph has them)."""
        inits = {i.name: i for i in int8.graph.initializer}
        producer, _ = producers_consumers(int8.graph)
        acts: dict[str, tuple[float, int]] = {}
        outputs = {o.name for o in int8.graph.output}
        for n in int8.graph.node:
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
                scale = float(numpy_helper.to_array(inits[n.input[1]]))
                zp = numpy_helper.to_array(inits[n.input[2]])
                zp_u8 = int(zp) + (128 if zp.dtype == np.int8 else 0)
                acts[quantized_tensor_name(n.input[0], outputs)] = (scale, zp_u8)
        channels = ({n.name: _out_channels(n, fp32) for n in fp32.graph.node if n.op_type in ("Conv", "Gemm")}
                    if fp32 is not None else None)
        weights = {}
        for n in int8.graph.node:
            if n.op_type in ("Conv", "Gemm") and (channels is None or n.name in channels):
                dq = producer.get(n.input[1])
                if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
                    s = np.atleast_1d(numpy_helper.to_array(inits[dq.input[1]])).astype(np.float32)
                    weights[n.name] = s[:channels[n.name]] if s.size > 1 and channels else s
        return cls(acts, weights, dict(ranges), list(excluded), source, weight_bits, reduce_range)

    # -- writing ----------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"format": TABLE_FORMAT, "source": self.source, "convention": "uint8 (int8 targets: zero_point - 128)",
                "weight_bits": self.weight_bits, "reduce_range": self.reduce_range, "excluded": self.excluded,
                "activations": {k: [s, z] for k, (s, z) in self.activations.items()},
                "weights": {k: v.tolist() for k, v in self.weights.items()},
                "ranges": {k: [float(a), float(b)] for k, (a, b) in self.ranges.items()}}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> "ScaleTable":
        if doc.get("format") != TABLE_FORMAT:
            raise UserError(f"scale table format {doc.get('format')!r} is not {TABLE_FORMAT}")
        return cls({k: (float(s), int(z)) for k, (s, z) in doc["activations"].items()},
                   {k: np.asarray(v, np.float32) for k, v in doc["weights"].items()},
                   {k: (float(a), float(b)) for k, (a, b) in doc.get("ranges", {}).items()},
                   list(doc.get("excluded", [])), doc.get("source", "calibration"), int(doc.get("weight_bits", 8)),
                   bool(doc.get("reduce_range", False)))

    def save(self, path: str | os.PathLike) -> Path:
        from compress.io import write_text

        return write_text(path, json.dumps(self.to_json(), indent=1) + "\n")

    def real_range(self, tensor: str) -> tuple[float, float] | None:
        """The real interval a table entry covers (uint8 codes 0..255), else the calibrated range, else None."""
        if tensor in self.activations:
            s, z = self.activations[tensor]
            return (-z * s, (255 - z) * s)
        return self.ranges.get(tensor)


def _out_channels(node: onnx.NodeProto, fp32: onnx.ModelProto) -> int:
    inits = {i.name: i for i in fp32.graph.initializer}
    w = inits.get(node.input[1])
    return int(w.dims[weight_channel_axis(node)]) if w is not None else 0


def table_qat_params(table: ScaleTable, prepared: onnx.ModelProto, extra: Mapping[str, tuple[float, int]] = ()):
    """The table as quantization parameters for ``quantize_prepared(..., qat_params=...)`` on another shaping of
    the same float graph: every activation and weight scale given (no calibration; a tensor the shape quantizes
    that the table lacks is an error there).  ``extra``: scales of tensors only this shape has (derived)."""
    from compress.quant.core import weight_scale_overrides
    from compress.quant.qat_export import QATParams

    tensors = {v for n in prepared.graph.node for v in n.output} | {i.name for i in prepared.graph.input}
    inits = {i.name: i for i in prepared.graph.initializer}
    overrides: dict[str, list[dict[str, Any]]] = {}
    ranges: dict[str, tuple[float, float]] = {}
    for t, (s, z) in {**table.activations, **dict(extra)}.items():
        if t in tensors:
            overrides[t] = [{"scale": np.array(s, np.float32), "zero_point": np.array(z, np.uint8)}]
            ranges[t] = (-z * s, (255 - z) * s)
    for n in prepared.graph.node:
        if n.op_type == "Pad" and n.input[0] in overrides and n.output[0] not in overrides:  # the stem's pad
            overrides[n.output[0]], ranges[n.output[0]] = overrides[n.input[0]], ranges[n.input[0]]
        if n.op_type in ("Relu", "Clip") and n.output[0] in overrides and n.input[0] not in overrides:
            # onnxruntime folds the Relu / Clip into its input's QuantizeLinear: that tensor uses the output's grid
            overrides[n.input[0]], ranges[n.input[0]] = overrides[n.output[0]], ranges[n.output[0]]
    for n in prepared.graph.node:
        if n.op_type in ("Conv", "Gemm") and n.name in table.weights and n.input[1] in inits:
            s = table.weights[n.name]
            if s.size > 1:  # per channel: a shape with padded channels gets any scale for the zero channels
                c = int(inits[n.input[1]].dims[weight_channel_axis(n)])
                s = np.concatenate([s, np.ones(max(0, c - s.size), np.float32)])[:c]
            overrides[n.input[1]] = weight_scale_overrides(s, s.size > 1, weight_channel_axis(n))
    return QATParams(overrides, ranges, table.reduce_range, ())


def compare_scales(table: ScaleTable, got: Mapping[str, tuple[float, int]],
                   weights: Mapping[str, np.ndarray] = ()) -> dict[str, Any]:
    """How closely an artifact's scales (read back, uint8 convention) follow the table: the largest absolute and
    relative scale deviation over the tensors both have, zero-point mismatches, and the counts on each side."""
    common = sorted(set(table.activations) & set(got))
    dev = [abs(got[t][0] - table.activations[t][0]) for t in common]
    rel = [d / table.activations[t][0] for d, t in zip(dev, common)]
    zp = [t for t in common if got[t][1] != table.activations[t][1]]
    wdev = [float(np.abs(np.asarray(v)[:table.weights[k].size] - table.weights[k]).max() / table.weights[k].max())
            for k, v in dict(weights).items() if k in table.weights]
    return {"activations_compared": len(common), "table_only": len(set(table.activations) - set(got)),
            "artifact_only": len(set(got) - set(table.activations)),
            "max_abs_scale_deviation": max(dev) if dev else None, "max_rel_scale_deviation": max(rel) if rel else None,
            "zero_point_mismatches": len(zp), "weights_compared": len(wdev),
            "max_rel_weight_scale_deviation": max(wdev) if wdev else None}
