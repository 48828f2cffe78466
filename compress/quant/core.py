"""The post-training int8 core: shape the float graph, calibrate, write the QDQ graph.  No strategy here.

1. :func:`prepare_float`: the graph passes (:mod:`compress.onnx.graph_passes`: private Conv/Gemm initializers,
   the recipe's h-swish / SE-gate forms; :mod:`compress.onnx.padding`: depthwise convs padded to the channel
   multiple of ORT's fast int8 depthwise kernel, the stem to 4 input channels) and onnxruntime's
   ``quant_pre_process`` (shape inference, BN folding);
2. :func:`calibrate`: activation ranges on a deterministic TRAIN-split subset (:mod:`calibration.reader`) with
   the recipe's method (minmax / percentile / entropy), via ORT's calibrators;
3. :func:`quantize_prepared`: ``quantize_static`` in QDQ format: weights int8 per-channel symmetric,
   activations per the recipe, hard-sigmoid / relu6 outputs with fixed qparams (TensorQuantOverrides), weights
   7-bit (reduce_range) only where :mod:`compress.quant.cpu` says so; then the post-quantization folds.

The strategies (:mod:`~compress.quant.qat`, :mod:`~compress.quant.tuning`, :mod:`~compress.quant.mixed_precision`)
build on these; :mod:`compress.quant.pipeline` picks one from the recipe, checks the result
(:mod:`compress.quant.checks`), evaluates it and writes the outputs.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx

from compress.errors import UserError
from compress.onnx.graph import conv_nodes, weight_channel_axis
from compress.onnx.graph_passes import (
    fixed_range_tensors,
    fold_gate_scales,
    rewrite_hard_sigmoid,
    rewrite_hswish,
    unshare_initializers,
)
from compress.onnx.padding import fold_input_pads, pad_depthwise_channels, pad_input_channels
from compress.quant.checks import check_bias_range, check_covered
from compress.quant.cpu import resolve_reduce_range
from recipes.loader import CalibrationConfig, QuantizeConfig, Recipe

__all__ = ["QuantizedGraph", "range_dict", "prepare_float", "calibrate", "quantize_prepared", "fixed_qparam_overrides",
           "weight_scale_overrides", "low_bit_weight_overrides", "resolve_excluded_nodes", "holdout_logits",
           "quiet"]

log = logging.getLogger(__name__)

# op types quantized in QDQ form: ORT's defaults (QLinearOps + QDQ registries) plus HardSigmoid, whose output
# (the SE gate and, with hswish = "x_hardsigmoid", the h-swish gate) gets fixed qparams.
_EXTRA_OP_TYPES = ("HardSigmoid",)


# -- graph preparation ------------------------------------------------------------------------------

def prepare_float(fp32: onnx.ModelProto, q: QuantizeConfig, workdir: str | os.PathLike, optimize: bool = True
                  ) -> Path:
    """Graph passes + ORT ``quant_pre_process``; returns the path of the model that calibration and
    quantization read (it is still a float model computing the same function).  ``optimize=False`` skips ORT's
    graph optimizer (which expands HardSwish into ``x * HardSigmoid(x)``: OpenVINO wants the op)."""
    from onnxruntime.quantization import quant_pre_process

    shaped = rewrite_hard_sigmoid(rewrite_hswish(unshare_initializers(fp32), q.hswish), q.hard_sigmoid)
    if q.depthwise_channel_multiple:
        shaped, _ = pad_depthwise_channels(shaped, q.depthwise_channel_multiple)
    if q.pad_input_channels:
        shaped, _ = pad_input_channels(shaped, 4)
    src = Path(workdir) / "shaped.onnx"
    dst = Path(workdir) / "prepared.onnx"
    onnx.save(shaped, str(src))
    with quiet():
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True, skip_optimization=not optimize)
    return dst


def op_types_to_quantize() -> list[str]:
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QLinearOpsRegistry) | set(QDQRegistry) | set(_EXTRA_OP_TYPES))


_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


def calibrate(prepared: str | os.PathLike, reader, cal: CalibrationConfig, workdir: str | os.PathLike,
              progress: bool = False):
    """Collect activation ranges of ``prepared`` over ``reader`` with ``cal.method``: ORT's calibrators
    (MinMax / Percentile / Entropy).  Returns ORT ``TensorsData`` (reusable by :func:`quantize_prepared`)."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    method = getattr(CalibrationMethod, _METHODS[cal.method])
    extra: dict[str, Any] = {"symmetric": cal.symmetric_activations}
    if cal.method == "percentile":
        extra.update(percentile=cal.percentile, num_bins=cal.num_bins)
    elif cal.method == "entropy":
        extra.update(num_bins=cal.num_bins, num_quantized_bins=128)
    with tempfile.TemporaryDirectory(dir=workdir, prefix="calib.") as tmp, quiet():
        calibrator = create_calibrator(Path(prepared), op_types_to_quantize(),
                                       augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=method, extra_options=extra)
        calibrator.execution_providers = ["CPUExecutionProvider"]
        reader.rewind()
        feed = _progress(reader, progress, f"calibrating ({cal.method})")
        while (first := feed.get_next()) is not None:  # ORT merges the ranges / histograms of every call
            calibrator.collect_data(_Chunk(feed, first, CALIBRATION_CHUNK_IMAGES))
        ranges = calibrator.compute_data()
        del calibrator
    reader.rewind()
    return ranges


def range_dict(ranges) -> dict[str, tuple[float, float]]:
    """ORT ``TensorsData`` (what :func:`calibrate` returns) as ``{tensor: (low, high)}``."""
    out = {}
    for name, v in ranges.data.items():
        lo, hi = v.range_value
        out[name] = (float(np.asarray(lo).reshape(-1)[0]), float(np.asarray(hi).reshape(-1)[0]))
    return out


CALIBRATION_CHUNK_IMAGES = 64  # images per collect_data call (at 224x224: ~1 GB of activations of MobileNetV3-Large)


class _Chunk:
    """The next whole batches of ``reader``, ``first`` included, up to ``limit`` images.  ORT's calibrators hold
    every activation of one ``collect_data`` call until it ends (512 images of MobileNetV3-Large at 224x224: an
    estimated 10 GB or more), then merge them into their ranges (MinMax: min / max, exact) or histograms (percentile,
    entropy: re-binned as the range grows), so calibration feeds them chunk by chunk."""

    def __init__(self, reader, first: dict, limit: int) -> None:
        self.reader, self.pending, self.limit, self.seen = reader, first, limit, 0

    def get_next(self):
        if self.pending is not None:
            item, self.pending = self.pending, None
        elif self.seen >= self.limit:
            return None
        else:
            item = self.reader.get_next()
        if item is not None:
            self.seen += len(next(iter(item.values())))
        return item


class _progress:
    """Wrap a CalibrationDataReader with a tqdm bar (ORT pulls batches with ``get_next``)."""

    def __init__(self, reader, enabled: bool, desc: str) -> None:
        self.reader = reader
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=len(reader), desc=desc, unit="batch", leave=False)

    def get_next(self):
        item = self.reader.get_next()
        if self.bar is not None:
            if item is None:
                self.bar.close()
            else:
                self.bar.update(1)
        return item

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item

    def __len__(self) -> int:
        return len(self.reader)


def fixed_qparam_overrides(model: onnx.ModelProto, q: QuantizeConfig) -> dict[str, list[dict[str, Any]]]:
    """TensorQuantOverrides for tensors whose range the math fixes (hard-sigmoid outputs [0, 1], relu6 outputs
    [0, 6]): scale hi/255 and zero point 0 (uint8) or -128 (int8), so every code is used and both ends are
    exact.  Calibration data does not move them."""
    if not q.hard_sigmoid_fixed_qparams:
        return {}
    zp = np.array(0, dtype=np.uint8) if q.activation_type == "uint8" else np.array(-128, dtype=np.int8)
    return {name: [{"scale": np.array((hi - lo) / 255.0, dtype=np.float32), "zero_point": zp}]
            for name, (lo, hi) in fixed_range_tensors(model).items()}


def weight_scale_overrides(scales: np.ndarray, per_channel: bool, axis: int = 0) -> list[dict[str, Any]]:
    """TensorQuantOverrides for one symmetric int8 weight: a scale per output channel (along ``axis``, see
    :func:`compress.onnx.graph.weight_channel_axis`) or one scale."""
    zero = np.array(0, dtype=np.int8)
    scales = np.asarray(scales, dtype=np.float32).reshape(-1)
    if per_channel:
        return [{"axis": axis, "scale": np.array(sc, dtype=np.float32), "zero_point": zero} for sc in scales]
    return [{"scale": np.array(scales[0], dtype=np.float32), "zero_point": zero}]


def low_bit_weight_overrides(model: onnx.ModelProto, q: QuantizeConfig, excluded: Sequence[str] = ()
                             ) -> dict[str, list[dict[str, Any]]]:
    """TensorQuantOverrides putting every Conv / Gemm weight on the recipe's ``weight_bits`` grid: symmetric
    scale ``absmax / (2^(bits-1) - 1)`` per output channel (or per tensor), stored as int8 codes so
    onnxruntime's int8 kernels still run it.  Empty for 8-bit weights (onnxruntime's own scales)."""
    if q.weight_bits >= 8:
        return {}
    qmax = 2 ** (q.weight_bits - 1) - 1
    inits = {i.name: i for i in model.graph.initializer}
    out: dict[str, list[dict[str, Any]]] = {}
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm") or n.name in excluded or n.input[1] not in inits:
            continue
        w = onnx.numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
        axis = weight_channel_axis(n)
        w = np.moveaxis(w, axis, 0)  # output channels first
        absmax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1) if q.per_channel else np.abs(w).max().reshape(1)
        out[n.input[1]] = weight_scale_overrides(np.maximum(absmax / qmax, np.finfo(np.float32).tiny), q.per_channel,
                                                 axis)
    return out


def resolve_excluded_nodes(model: onnx.ModelProto, patterns: Sequence[str], quantize_head: bool = True) -> list[str]:
    """Node names matching the recipe's ``nodes_to_exclude`` (exact names or fnmatch patterns), plus the
    classifier Gemms when ``quantize_head`` is false.  A pattern that matches nothing is an error."""
    names = [n.name for n in model.graph.node]
    out: list[str] = []
    for pat in patterns:
        hits = [n for n in names if n == pat or fnmatchcase(n, pat)]
        if not hits:
            raise UserError(f"nodes_to_exclude: {pat!r} matches no node of the model (node names look like "
                            f"{names[0]!r}; conv names: {', '.join(n.name for n in conv_nodes(model)[:3])} ...)")
        out += [h for h in hits if h not in out]
    if not quantize_head:
        out += [n.name for n in model.graph.node if n.op_type == "Gemm" and n.name not in out]
    return out


@dataclass
class QuantizedGraph:
    model: onnx.ModelProto
    excluded: list[str]
    reduce_range: bool
    reduce_range_reason: str
    fixed_qparams: list[str]
    folded_gate_scales: int = 0


def quantize_prepared(prepared: str | os.PathLike, ranges, recipe: Recipe, workdir: str | os.PathLike,
                      extra_excluded: Sequence[str] = (), cpu: dict[str, Any] | None = None,
                      qat_params=None) -> QuantizedGraph:
    """``quantize_static`` (QDQ) of the prepared float model with precomputed calibration ``ranges``.

    ``qat_params`` (:class:`compress.quant.qat.QATParams`, with ``ranges=None``): every activation and weight scale /
    zero point comes from a QAT model instead of calibration; a tensor it does not cover is an error.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    q = recipe.quantize
    model = onnx.load(str(prepared))
    excluded = resolve_excluded_nodes(model, q.nodes_to_exclude, q.quantize_head)
    excluded += [n for n in extra_excluded if n not in excluded]
    if qat_params is None:
        reduce_range, reason = resolve_reduce_range(q.reduce_range, cpu)
    else:  # the grid the QAT model trained on, whatever this CPU would choose
        reduce_range = qat_params.reduce_range
        reason = f"the QAT model was trained with {'7' if reduce_range else '8'}-bit weights"
    overrides = fixed_qparam_overrides(model, q)
    if qat_params is not None:
        overrides.update(qat_params.overrides)
        known = {**fixed_range_tensors(model), **qat_params.ranges}  # the gates' fixed ranges, the QAT ranges
        ranges = TensorsData(CalibrationMethod.MinMax, {
            k: TensorData(lowest=np.array(lo, dtype=np.float32), highest=np.array(hi, dtype=np.float32))
            for k, (lo, hi) in known.items()})
    else:
        overrides.update(low_bit_weight_overrides(model, q, excluded))
    act = QuantType.QUInt8 if q.activation_type == "uint8" else QuantType.QInt8
    method = getattr(CalibrationMethod, _METHODS[recipe.calibration.method])
    with tempfile.TemporaryDirectory(dir=workdir, prefix="qdq.") as tmp, quiet():
        cache = Path(tmp) / "ranges.json"
        ranges.calibration_method = method
        save_tensors_data(ranges, cache)
        out = Path(tmp) / "int8.onnx"
        quantize_static(
            str(prepared), str(out), calibration_data_reader=None, calibration_cache_path=str(cache),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types_to_quantize(),
            per_channel=q.per_channel, reduce_range=reduce_range, activation_type=act,
            weight_type=QuantType.QInt8, nodes_to_exclude=excluded, calibrate_method=method,
            extra_options={
                "WeightSymmetric": True,
                "ActivationSymmetric": recipe.calibration.symmetric_activations,
                "TensorQuantOverrides": overrides,
                # logits stay float: a uint8 grid over the logits would create argmax ties
                "OpTypesToExcludeOutputQuantization": ["Gemm"],
                # learned (QAT) weight scales are kept as given; a bias that then overflows int32 is an error
                # (checks.check_bias_range), where PTQ lets onnxruntime widen that weight's scale
                "QDQDisableWeightAdjustForInt32Bias": qat_params is not None,
            })
        int8 = onnx.load(str(out))
    if qat_params is not None:
        check_covered(int8, set(overrides), qat_params.quantized)
    check_bias_range(int8)
    int8, folded = fold_gate_scales(int8)
    int8, _ = fold_input_pads(int8)
    return QuantizedGraph(int8, excluded, reduce_range, reason, sorted(overrides), folded)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """ORT's quantization tools print and log chatter (and a pre-processing hint we follow anyway)."""
    import io
    import sys

    import onnxruntime as ort

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)  # the sessions these tools open log graph clean-ups as warnings
    buf = io.StringIO()
    old = sys.stdout
    sys.stdout = buf
    try:
        yield
    finally:
        sys.stdout = old
        root.setLevel(level)


def holdout_logits(model: onnx.ModelProto | bytes, holdout) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of ``model`` (an ONNX graph) on a :class:`calibration.subsets.Holdout`'s batches, with
    a session on every core (tuning and mixed precision score candidates with it)."""
    from eval.latency import make_session

    sess = make_session(model if isinstance(model, bytes) else model.SerializeToString(), threads=None)
    name = sess.get_inputs()[0].name
    logits, labels = [], []
    for x, y in holdout.batches():
        logits.append(sess.run(None, {name: x})[0])
        labels.append(y)
    return np.concatenate(logits), np.concatenate(labels)
