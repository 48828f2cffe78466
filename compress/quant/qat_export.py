"""The export of a frozen QAT model (:mod:`compress.quant.qat`) as a QDQ int8 graph with its learned qparams.

It never re-calibrates: :func:`to_float` turns the QAT model into a float MobileNetV3 whose conv weights are the
folded, fake-quantized weights (every value already on its int8 grid) and whose BN layers are the identity,
exported like any float model; then onnxruntime's QDQ quantizer writes the int8 graph with every activation
scale / zero point and every weight scale taken from the QAT model (``TensorQuantOverrides``,
:func:`qat_qparams`).  A QuantizeLinear that the QAT model has no fake quant for, a fake quant with no
QuantizeLinear, a conv without a QAT weight quantizer and an int32 bias that saturates are errors, never a
silent calibration or a drift.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn
from torch.ao import quantization as tq

from compress.errors import UserError
from compress.models.mobilenetv3 import MobileNetV3
from compress.onnx.export import export_onnx
from compress.onnx.graph import weight_channel_axis
from compress.quant.core import QuantizedGraph, prepare_float, quantize_prepared, weight_scale_overrides
from compress.quant.qat import QATMobileNetV3, act_range
from recipes.loader import QuantizeConfig

__all__ = ["to_float", "QATParams", "qat_qparams", "export_qat", "fake_quant_logits", "QAT_FLOAT_ONNX"]

QAT_FLOAT_ONNX = "qat_float.onnx"  # beside the prepared graph export_qat returns: the folded float model


def _folded(mod: nn.Module, kind: str) -> tuple[Tensor, Tensor]:
    """(weight, bias) the int8 graph's node computes with: conv + BN folded with the running statistics, the
    weight already fake-quantized with its frozen scale (so every value sits on the int8 grid)."""
    w = mod.weight.detach()
    bias = mod.bias.detach() if mod.bias is not None else torch.zeros(w.shape[0], device=w.device)
    if kind == "convbn":
        bn = mod.bn
        std = torch.sqrt(bn.running_var + bn.eps)
        factor = bn.weight.detach() / std
        w = w * factor.reshape(-1, *([1] * (w.ndim - 1)))
        bias = bn.bias.detach() + (bias - bn.running_mean) * factor
    fq = mod.weight_fake_quant
    with torch.no_grad():
        if fq.is_per_channel:
            wq = torch.fake_quantize_per_channel_affine(w, fq.scale, fq.zero_point.to(torch.int32), fq.ch_axis,
                                                        fq.quant_min, fq.quant_max)
        else:
            wq = torch.fake_quantize_per_tensor_affine(w, float(fq.scale), int(fq.zero_point), fq.quant_min,
                                                       fq.quant_max)
    return wq, bias


def to_float(model: QATMobileNetV3) -> MobileNetV3:
    """The float MobileNetV3 that computes the QAT model without its activation fake quants: folded,
    grid-valued weights; BN layers are the identity (weight 1, mean 0, var 1, eps 0) holding the folded bias.
    Export it like any float model; :func:`qat_qparams` supplies the quantization parameters."""
    if not model.observers_frozen:
        raise UserError("freeze the QAT model's observers before export (the exported scales must be final)")
    flt = MobileNetV3(model.spec).to(next(model.parameters()).device).eval()
    mods = dict(model.named_modules())
    fmods = dict(flt.named_modules())
    with torch.no_grad():
        for s in model.weight_sites:
            w, b = _folded(mods[s.module], s.kind)
            target = fmods[s.float_path]
            target.weight.copy_(w.reshape(target.weight.shape))
            if s.kind == "convbn":
                bn = fmods[s.float_path.rsplit(".", 1)[0] + ".1"]
                bn.weight.fill_(1.0)
                bn.bias.copy_(b)
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0)
                bn.eps = 0.0
            else:
                target.bias.copy_(b)
    return flt


def _qparams(fq: tq.FakeQuantizeBase) -> tuple[np.ndarray, np.ndarray]:
    scale, zp = fq.calculate_qparams() if isinstance(fq, tq.FixedQParamsFakeQuantize) else (fq.scale, fq.zero_point)
    return scale.detach().cpu().numpy().astype(np.float32), zp.detach().cpu().numpy()


@dataclass
class QATParams:
    overrides: dict[str, list[dict[str, Any]]]  # onnxruntime TensorQuantOverrides
    ranges: dict[str, tuple[float, float]]  # the real range each activation scale / zero point encodes
    reduce_range: bool  # the QAT model's weight grid: the export reports (and must use) the same
    quantized: tuple[str, ...] = ()  # the tensors the QAT model quantizes: each needs a QuantizeLinear


def qat_qparams(model: QATMobileNetV3, prepared: onnx.ModelProto, q: QuantizeConfig) -> QATParams:
    """Every scale / zero point of ``model`` as onnxruntime ``TensorQuantOverrides`` for the tensors of the
    prepared float graph (exported from :func:`to_float`, then ``compress.quant.core.prepare_float``)."""
    _, lo, hi = act_range(q.activation_type)
    np_zp = np.uint8 if q.activation_type == "uint8" else np.int8
    tensors = {v for n in prepared.graph.node for v in n.output} | {i.name for i in prepared.graph.input}
    nodes = {n.name: n for n in prepared.graph.node}
    inits = {i.name: i for i in prepared.graph.initializer}
    mods = dict(model.named_modules())
    overrides: dict[str, list[dict[str, Any]]] = {}
    ranges: dict[str, tuple[float, float]] = {}
    for site in model.sites:
        scale, zp = _qparams(mods[site.module])
        s, z = float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0])
        for t in site.tensors:
            if t not in tensors:
                raise UserError(f"QAT export: the float graph has no tensor {t!r} for fake quant {site.module!r} "
                                f"(the exporter's names changed?)")
            overrides[t] = [{"scale": np.array(s, dtype=np.float32), "zero_point": np.array(z, dtype=np_zp)}]
            ranges[t] = ((lo - z) * s, (hi - z) * s)
    for n in prepared.graph.node:  # the stem's channel Pad (pad_input_channels): the image's values plus zeros
        if n.op_type == "Pad" and n.input[0] in overrides and n.output[0] not in overrides:
            overrides[n.output[0]], ranges[n.output[0]] = overrides[n.input[0]], ranges[n.input[0]]
    for ws in model.weight_sites:
        node = nodes.get(ws.node)
        if node is None or node.input[1] not in inits:
            raise UserError(f"QAT export: no node {ws.node!r} with a weight initializer in the float graph")
        fq = mods[ws.module].weight_fake_quant
        scale, _ = _qparams(fq)
        if fq.is_per_channel:
            # depthwise padding (compress.onnx.graph_passes.pad_depthwise_channels) appends zero channels: any scale
            scale = np.concatenate([scale, np.ones(int(inits[node.input[1]].dims[0]) - scale.size, np.float32)])
        overrides[node.input[1]] = weight_scale_overrides(scale, fq.is_per_channel, weight_channel_axis(node))
    covered = {nodes[ws.node].input[1] for ws in model.weight_sites}
    stray = [n.name for n in prepared.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in inits
             and n.input[1] not in covered]
    if stray:
        raise UserError(f"QAT export: {len(stray)} conv/gemm node(s) have no QAT weight quantizer, e.g. "
                        f"{stray[0]!r}")
    return QATParams(overrides, ranges, model.reduce_range, tuple(s.tensors[0] for s in model.sites))


def export_qat(model: QATMobileNetV3, recipe, workdir, preprocess, cpu=None, extra_meta=None
               ) -> tuple[QuantizedGraph, Path]:
    """The frozen QAT model as a QDQ int8 graph with its own scales: (QuantizedGraph, prepared float path).

    :func:`to_float` -> fp32 ONNX -> ``prepare_float`` (the recipe's graph shaping) -> ``quantize_prepared``
    with :func:`qat_qparams` as the only source of quantization parameters.
    """
    work = Path(workdir) / "qat"
    work.mkdir(parents=True, exist_ok=True)
    flt = to_float(model)
    path = work / QAT_FLOAT_ONNX
    export_onnx(flt.cpu(), path, preprocess, recipe="qat-float", extra_meta=extra_meta or {})
    prepared_path = prepare_float(onnx.load(str(path)), recipe.quantize, work)
    params = qat_qparams(model, onnx.load(str(prepared_path)), recipe.quantize)
    return quantize_prepared(prepared_path, None, recipe, work, cpu=cpu, qat_params=params), prepared_path


@torch.no_grad()
def fake_quant_logits(model: QATMobileNetV3, source, limit: int | None = None, batch_size: int = 500
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of the frozen fake-quant torch model on the test split (compare with the ONNX's)."""
    model.eval()
    device = next(model.parameters()).device
    logits, labels = [], []
    for x, y in source.loader("test", batch_size=batch_size, limit=limit):
        logits.append(model(x.to(device)).float().cpu().numpy())
        labels.append(y.numpy())
    return np.concatenate(logits), np.concatenate(labels).astype(np.int64)
