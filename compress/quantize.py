"""Post-training int8 quantization: float model -> QDQ ONNX (int8 weights, uint8/int8 activations) + evidence.

One entry point, :func:`quantize`, applies a recipe (``recipes/*.toml``):

1. load the model (``--weights``) or the embedded default; export fp32 ONNX with :func:`compress.export.export_onnx`;
2. shape the float graph (``compress/graph_passes.py``: private Conv/Gemm initializers, the recipe's h-swish
   form, depthwise convs padded to the channel multiple of ORT's fast int8 depthwise kernel) and run
   onnxruntime's ``quant_pre_process`` (shape inference, BN folding);
3. calibrate activation ranges on a deterministic TRAIN-split subset (``calibration/reader.py``) with the
   recipe's method (minmax / percentile / entropy), via ORT's calibrators;
4. ``quantize_static`` in QDQ format: weights int8 per-channel symmetric, activations per the recipe,
   hard-sigmoid outputs with fixed qparams (TensorQuantOverrides), weights 7-bit (reduce_range) only on CPUs
   without VNNI, as ORT's documentation prescribes against U8S8 saturation;
5. checks: onnx.checker, the whole network kept, the fraction of convs with int8 weights, ORT runs it;
6. (recipe ``[tuning]``) accuracy-driven tuning with neural-compressor (``compress/tuning.py``), or (recipe
   ``[mixed_precision]``) the latency-aware per-layer int8 / fp32 plan (``compress/mixed_precision.py``);
7. evaluate fp32 and int8 with ``eval.evaluate`` and write ``model_fp32.onnx``, ``model_int8.onnx``,
   ``report.json``, ``report.md``, ``recipe.toml`` (and ``mixed_precision.md``, the plan) atomically into the
   output directory.
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx

from compress.errors import UserError
from compress.graph_passes import (GATE_SCALE_SUFFIX, conv_nodes, fixed_range_tensors, fold_gate_scales, op_counts,
                                   fold_input_pads, pad_depthwise_channels, pad_input_channels, rewrite_hard_sigmoid,
                                   rewrite_hswish, unshare_initializers)
from recipes.loader import CalibrationConfig, QuantizeConfig, Recipe, load_recipe

__all__ = ["quantize", "QuantizedGraph", "prepare_float", "calibrate", "quantize_prepared", "int8_checks",
           "cpu_int8_info", "resolve_reduce_range", "fixed_qparam_overrides", "resolve_excluded_nodes",
           "int8_conv_stats", "DEFAULT_OUTPUT_DIR"]

DEFAULT_OUTPUT_DIR = "runs/quantize"
QAT_CHECKPOINT = "qat_checkpoint.pt"  # in the output directory: written every QAT epoch, resumed from
log = logging.getLogger(__name__)

# op types quantized in QDQ form: ORT's defaults (QLinearOps + QDQ registries) plus HardSigmoid, whose output
# (the SE gate and, with hswish = "x_hardsigmoid", the h-swish gate) gets fixed qparams.
_EXTRA_OP_TYPES = ("HardSigmoid",)
_REMOVABLE = ("Relu", "Clip")
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


# -- the CPU --------------------------------------------------------------------------------------------

def cpu_int8_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """Which int8 dot-product instructions this CPU has (x86: VNNI/AMX; Arm: sdot)."""
    machine = platform.machine().lower()
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.lower().startswith(("flags", "features")):
            flags.update(line.split(":", 1)[1].split())
    x86 = machine in ("x86_64", "amd64", "i686", "i386") or "avx2" in flags or "sse2" in flags
    return {"machine": machine, "x86": x86, "vnni": sorted(f for f in _VNNI_FLAGS if f in flags),
            "avx2": "avx2" in flags, "avx512": "avx512f" in flags, "arm_dot": "asimddp" in flags}


def resolve_reduce_range(setting: str, info: dict[str, Any] | None = None) -> tuple[bool, str]:
    """Decide 7-bit weights.  ORT's docs: U8S8 on x86 without VNNI can saturate (VPMADDUBSW adds two u8*s8
    products into int16), so quantize weights to 7 bits there; with VNNI (VPDPBUSD, int32 accumulation) or on
    Arm there is no such saturation and full 8 bits are used."""
    info = info or cpu_int8_info()
    if setting == "always":
        return True, "recipe: reduce_range = always"
    if setting == "never":
        return False, "recipe: reduce_range = never"
    if info["x86"] and not info["vnni"]:
        return True, "auto: x86 CPU without VNNI -> 7-bit weights against U8S8 saturation"
    if info["x86"]:
        return False, f"auto: CPU has {', '.join(info['vnni'])} -> full 8-bit weights"
    return False, f"auto: {info['machine']} CPU (no U8S8 saturation issue) -> full 8-bit weights"


# -- graph preparation ------------------------------------------------------------------------------

def prepare_float(fp32: onnx.ModelProto, q: QuantizeConfig, workdir: str | os.PathLike) -> Path:
    """Graph passes + ORT ``quant_pre_process``; returns the path of the model that calibration and
    quantization read (it is still a float model computing the same function)."""
    from onnxruntime.quantization import quant_pre_process

    shaped = rewrite_hard_sigmoid(rewrite_hswish(unshare_initializers(fp32), q.hswish), q.hard_sigmoid)
    if q.depthwise_channel_multiple:
        shaped, _ = pad_depthwise_channels(shaped, q.depthwise_channel_multiple)
    if q.pad_input_channels:
        shaped, _ = pad_input_channels(shaped, 4)
    src = Path(workdir) / "shaped.onnx"
    dst = Path(workdir) / "prepared.onnx"
    onnx.save(shaped, str(src))
    with _quiet():
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
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
    with tempfile.TemporaryDirectory(dir=workdir, prefix="calib.") as tmp, _quiet():
        calibrator = create_calibrator(Path(prepared), op_types_to_quantize(),
                                       augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=method, extra_options=extra)
        calibrator.execution_providers = ["CPUExecutionProvider"]
        reader.rewind()
        calibrator.collect_data(_progress(reader, progress, f"calibrating ({cal.method})"))
        ranges = calibrator.compute_data()
        del calibrator
    reader.rewind()
    return ranges


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


def weight_scale_overrides(scales: np.ndarray, per_channel: bool) -> list[dict[str, Any]]:
    """TensorQuantOverrides for one symmetric int8 weight: a scale per output channel (axis 0) or one scale."""
    zero = np.array(0, dtype=np.int8)
    scales = np.asarray(scales, dtype=np.float32).reshape(-1)
    if per_channel:
        return [{"axis": 0, "scale": np.array(sc, dtype=np.float32), "zero_point": zero} for sc in scales]
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
        if n.op_type == "Gemm" and any(a.name == "transB" and a.i == 0 for a in n.attribute):
            w = w.T  # output channels first, as onnxruntime's per-channel axis for Gemm expects
        absmax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1) if q.per_channel else np.abs(w).max().reshape(1)
        out[n.input[1]] = weight_scale_overrides(np.maximum(absmax / qmax, np.finfo(np.float32).tiny), q.per_channel)
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

    ``qat_params`` (:class:`compress.qat.QATParams`, with ``ranges=None``): every activation and weight scale /
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
    with tempfile.TemporaryDirectory(dir=workdir, prefix="qdq.") as tmp, _quiet():
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
                # (_check_bias_range), where PTQ lets onnxruntime widen that weight's scale
                "QDQDisableWeightAdjustForInt32Bias": qat_params is not None,
            })
        int8 = onnx.load(str(out))
    if qat_params is not None:
        _check_covered(int8, set(overrides), qat_params.quantized)
    _check_bias_range(int8)
    int8, folded = fold_gate_scales(int8)
    int8, _ = fold_input_pads(int8)
    return QuantizedGraph(int8, excluded, reduce_range, reason, sorted(overrides), folded)


# -- checks ---------------------------------------------------------------------------------------------

def _check_covered(int8: onnx.ModelProto, given: set[str], quantized: Sequence[str]) -> None:
    """A QAT export quantizes exactly what the QAT model quantized: every activation QuantizeLinear uses a
    scale the QAT model gave (no calibration), and every tensor the QAT model quantized has a QuantizeLinear."""
    inits = {i.name for i in int8.graph.initializer}
    q_inputs = {n.input[0] for n in int8.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    missing = sorted(q_inputs - given)
    if missing:
        raise UserError(f"QAT export: onnxruntime quantizes {len(missing)} tensor(s) the QAT model has no fake "
                        f"quant for, e.g. {missing[0]!r}")
    unquantized = [t for t in quantized if t not in q_inputs]
    if unquantized:
        raise UserError(f"QAT export: {len(unquantized)} tensor(s) fake-quantized in training stay float in the "
                        f"int8 graph, e.g. {unquantized[0]!r}")


def _check_bias_range(int8: onnx.ModelProto) -> None:
    """int32 biases at the type's limits were clipped by the quantizer (a bias far larger than input scale x
    weight scale): the int8 model would silently compute something else."""
    limits = (np.iinfo(np.int32).min, np.iinfo(np.int32).max)
    for init in int8.graph.initializer:
        if init.data_type == onnx.TensorProto.INT32:
            b = onnx.numpy_helper.to_array(init)
            if b.size and (b.min() <= limits[0] or b.max() >= limits[1]):
                raise UserError(f"int32 bias {init.name!r} saturates (input scale x weight scale is too small "
                                f"for it): that layer cannot be quantized with these scales")


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def int8_conv_stats(model: onnx.ModelProto) -> dict[str, Any]:
    """Convs whose weight is an int8 initializer seen through DequantizeLinear (the QDQ form of int8 weights)."""
    inits = {i.name: i for i in model.graph.initializer}
    prod = _producers(model)
    convs = conv_nodes(model)
    int8, fp32 = [], []
    for c in convs:
        p = prod.get(c.input[1])
        ok = (p is not None and p.op_type == "DequantizeLinear" and p.input[0] in inits
              and inits[p.input[0]].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8))
        (int8 if ok else fp32).append(c.name)
    return {"convs": len(convs), "int8_convs": len(int8), "fraction": len(int8) / max(1, len(convs)),
            "fp32_convs": fp32}


def int8_checks(int8: onnx.ModelProto, prepared: onnx.ModelProto, q: QuantizeConfig,
                input_size: Sequence[int]) -> dict[str, Any]:
    """What must hold for every int8 model; raises UserError on a violation, returns the facts otherwise."""
    import onnxruntime as ort

    onnx.checker.check_model(int8)
    # Every float node must still be there, by name, except two exact folds: ORT's QDQ quantizer folds Relu/Clip
    # into the range of the following QuantizeLinear (the uint8 range starts at 0 / ends at the clip bound), and
    # fold_gate_scales folds the relu6 gates' "* 1/6" into a DequantizeLinear scale.
    kept = {n.name for n in int8.graph.node}
    lost = [n for n in prepared.graph.node if n.name not in kept and n.op_type not in _REMOVABLE
            and not n.name.endswith(GATE_SCALE_SUFFIX)]
    if lost:
        raise UserError(f"the int8 model lost part of the network: {len(lost)} nodes missing, e.g. "
                        f"{lost[0].op_type} {lost[0].name!r}")
    int8_ops = op_counts(int8)
    stats = int8_conv_stats(int8)
    if stats["fraction"] + 1e-9 < q.min_int8_conv_fraction:
        raise UserError(f"only {stats['int8_convs']}/{stats['convs']} convs have int8 weights "
                        f"({stats['fraction']:.0%}), the recipe requires min_int8_conv_fraction = "
                        f"{q.min_int8_conv_fraction}")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(int8.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, *input_size)).astype(np.float32)
    y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    if not np.isfinite(y).all():
        raise UserError("the int8 model produces non-finite outputs")
    return {"onnx_checker": "passed", "ort_runs": True, "int8_convs": stats["int8_convs"], "convs": stats["convs"],
            "int8_conv_fraction": round(stats["fraction"], 4), "fp32_convs": stats["fp32_convs"],
            "quantize_linear_nodes": int8_ops.get("QuantizeLinear", 0),
            "dequantize_linear_nodes": int8_ops.get("DequantizeLinear", 0)}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ORT's quantization tools print and log chatter (and a pre-processing hint we follow anyway)."""
    import io
    import sys

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    buf = io.StringIO()
    old = sys.stdout
    sys.stdout = buf
    try:
        yield
    finally:
        sys.stdout = old
        root.setLevel(level)


# -- the entry point ------------------------------------------------------------------------------------

def _int8_metadata(fp32: onnx.ModelProto, recipe: Recipe, facts: dict[str, Any]) -> dict[str, Any]:
    from compress.export import get_metadata

    meta: dict[str, Any] = dict(get_metadata(fp32))
    meta.update({"recipe": recipe.name, "quantization": facts})
    return meta


def quantize(recipe: str | os.PathLike | Recipe = "int8", weights: str | os.PathLike | None = None,
             arch: str | None = None, dataset: str = "fashion-mnist", input_size: int | None = None,
             calibration_size: int | None = None, output_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR,
             eval_limit: int | None = None, threads: int = 1, latency: bool = True,
             progress: bool = True, device: str = "auto") -> dict[str, Any]:
    """Apply ``recipe`` to a float model and write the deployable int8 model with its evidence.

    ``weights=None`` uses the embedded default (MobileNetV3-Small trained on Fashion-MNIST).  Writes
    ``model_fp32.onnx``, ``model_int8.onnx``, ``recipe.toml`` (the resolved recipe), ``report.json`` and
    ``report.md`` into ``output_dir`` - each atomically, the report last.  Accuracy is measured on the first
    ``eval_limit`` test images (all when None); latency with ``threads`` threads at batch 1, both variants
    interleaved in one measurement.  ``device`` (auto / cpu / cuda) is where a QAT recipe trains; export and
    evaluation run on the CPU.  Returns the report (``report.json``'s content).
    """
    from calibration.reader import TrainSplitReader
    from compress.default_model import resolve_model
    from compress.export import export_onnx, set_metadata
    from compress.io import ensure_dir, write_bytes, write_text
    from eval.evaluate import evaluate_onnx
    from eval.latency import measure_interleaved
    from eval.report import run_header, write_run_report

    from compress.distributed import DistContext, choose_device, launched_by_torchrun

    t_start = time.time()
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if launched_by_torchrun():
        raise UserError("quantize runs in one process (QAT included); launch it without torchrun "
                        "(multi-process training: mnv3-compress train under torchrun)")
    train_on = DistContext(device=choose_device(device))
    if calibration_size is not None:
        rec = rec.with_overrides("calibration", size=int(calibration_size))
    out = ensure_dir(output_dir)
    loaded, source = resolve_model(weights, arch, dataset=dataset, input_size=input_size, progress=progress)
    size = source.preprocess.input_size
    cpu = cpu_int8_info()
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="mnv3-quantize.") as wd:
        t = time.time()
        fp32_path = Path(wd) / "model_fp32.onnx"
        export_onnx(loaded.model, fp32_path, source.preprocess, recipe="fp32",
                    extra_meta={"dataset": source.name, "weights": str(weights) if weights else "default"})
        fp32 = onnx.load(str(fp32_path))
        prepared_path = prepare_float(fp32, rec.quantize, wd)
        prepared = onnx.load(str(prepared_path))
        timings["export_s"] = time.time() - t

        t = time.time()
        reader = TrainSplitReader(source, rec.calibration.size, rec.calibration.batch_size,
                                  rec.calibration.seed, progress=progress)
        tuning_report = None
        tuned_recipe = None
        mixed = None
        qat = None
        ptq = None
        checked_against = prepared  # the float graph the int8 one must keep whole
        if rec.qat.enabled:  # fine-tune with fake quantization, export its own scales (compress/qat.py)
            from compress.qat import export_qat, qat_fingerprint, run_qat

            reduce_range, _ = resolve_reduce_range(rec.quantize.reduce_range, cpu)
            fingerprint = qat_fingerprint(loaded.model, rec.quantize, rec.qat, reduce_range,
                                          data=f"{source.name}@{size[0]}x{size[1]}")
            qat = run_qat(loaded.model, source, rec.quantize, rec.qat, out / QAT_CHECKPOINT, fingerprint,
                          reduce_range, progress, dist=train_on)
            timings["qat_train_s"] = time.time() - t
            qg, qat_prepared = export_qat(qat.model, rec, wd, source.preprocess, cpu=cpu)
            checked_against = onnx.load(str(qat_prepared))
            if rec.qat.compare_ptq:  # the PTQ baseline: the same [quantize] settings, calibrated
                ptq = quantize_prepared(prepared_path, calibrate(prepared_path, reader, rec.calibration, wd,
                                                                 progress=progress), rec, wd, cpu=cpu)
        elif rec.tuning.enabled:
            from compress.tuning import tune

            result = tune(prepared_path, reader, source, rec, wd, cpu=cpu, progress=progress)
            qg, tuning_report, tuned_recipe = result.graph, result.report, result.recipe
        else:
            ranges = calibrate(prepared_path, reader, rec.calibration, wd, progress=progress)
            if rec.mixed_precision.enabled:  # latency-aware per-layer int8 / fp32 (compress/mixed_precision.py)
                from compress.mixed_precision import plan_for_recipe

                mixed = plan_for_recipe(prepared_path, ranges, rec, source, wd, cpu=cpu, threads=threads)
            qg = quantize_prepared(prepared_path, ranges, rec, wd, cpu=cpu,
                                   extra_excluded=mixed.nodes_to_exclude if mixed else ())
        timings["quantize_s"] = time.time() - t
        checks = int8_checks(qg.model, checked_against, rec.quantize, size)
        facts = {
            "format": rec.quantize.format, "weights": "int8 per-channel symmetric" if rec.quantize.per_channel
            else "int8 per-tensor symmetric", "activations": rec.quantize.activation_type,
            "reduce_range": qg.reduce_range, "reduce_range_reason": qg.reduce_range_reason,
            "hswish": rec.quantize.hswish, "hard_sigmoid": rec.quantize.hard_sigmoid,
            "fixed_qparam_tensors": len(qg.fixed_qparams), "folded_gate_scales": qg.folded_gate_scales,
            "calibration_method": "none (QAT scales)" if qat else (tuned_recipe or rec).calibration.method,
            "weight_bits": rec.quantize.weight_bits,
            "nodes_excluded": qg.excluded,
        }
        int8 = set_metadata(qg.model, _int8_metadata(fp32, rec, facts))
        int8.producer_name = "mnv3-compress"
        int8_bytes = int8.SerializeToString()
        fp32_bytes = fp32_path.read_bytes()

        ptq_bytes = None
        if ptq is not None:
            ptq_model = set_metadata(ptq.model, _int8_metadata(fp32, rec, {**facts, "calibration_method":
                                                                             rec.calibration.method}))
            ptq_bytes = ptq_model.SerializeToString()

        t = time.time()
        ev_fp32 = evaluate_onnx(fp32_bytes, dataset=source, limit=eval_limit, threads=threads, latency=False)
        ev_int8 = evaluate_onnx(int8_bytes, dataset=source, limit=eval_limit, threads=threads,
                                reference=fp32_bytes, latency=False)
        ev_ptq = None if ptq_bytes is None else evaluate_onnx(ptq_bytes, dataset=source, limit=eval_limit,
                                                                threads=threads, reference=fp32_bytes,
                                                                latency=False)
        if latency:
            models = {"fp32": fp32_bytes, "int8": int8_bytes} | ({"ptq": ptq_bytes} if ptq_bytes else {})
            lat = measure_interleaved(models, threads=threads, batch=1)
            ev_fp32["latency_ms"], ev_int8["latency_ms"] = lat["fp32"], lat["int8"]
            if ev_ptq is not None:
                ev_ptq["latency_ms"] = lat["ptq"]
        qat_report = None
        if qat is not None:
            from compress.qat import fake_quant_logits
            from eval.accuracy import agreement, predict, topk_accuracy

            fq_logits, labels = fake_quant_logits(qat.model, source, eval_limit)
            onnx_logits, _ = predict(int8_bytes, source, limit=eval_limit)
            qat_report = {**qat.report, "fake_quant_top1": topk_accuracy(fq_logits, labels, (1,))["top1"],
                          "onnx_vs_fake_quant_agreement": agreement(fq_logits, onnx_logits),
                          "onnx_vs_fake_quant_max_abs_logit_diff": float(np.abs(fq_logits - onnx_logits).max()),
                          "checkpoint": QAT_CHECKPOINT}
            if qat_report["onnx_vs_fake_quant_agreement"] < rec.qat.min_onnx_agreement:
                raise UserError(f"the exported int8 ONNX agrees with the fake-quant model on only "
                                f"{qat_report['onnx_vs_fake_quant_agreement']:.2%} of test images (recipe "
                                f"requires {rec.qat.min_onnx_agreement:.0%}): the export does not reproduce QAT")
        timings["evaluate_s"] = time.time() - t

    write_bytes(out / "model_fp32.onnx", fp32_bytes)
    write_bytes(out / "model_int8.onnx", int8_bytes)
    write_text(out / "recipe.toml", rec.to_toml())
    if tuned_recipe is not None:
        write_text(out / "recipe_tuned.toml", tuned_recipe.to_toml())
    if ptq_bytes is not None:
        write_bytes(out / "model_int8_ptq.onnx", ptq_bytes)
    variants = [
        {"name": "fp32", "file": "model_fp32.onnx", "is_reference": True, **ev_fp32},
        {"name": "int8", "file": "model_int8.onnx", "is_reference": False, "recipe": rec.name, **ev_int8},
    ]
    if ev_ptq is not None:
        variants.append({"name": "int8-ptq", "file": "model_int8_ptq.onnx", "is_reference": False,
                         "recipe": f"{rec.name} without QAT (calibrated, {rec.calibration.method})", **ev_ptq})
    ref_top1 = ev_fp32["accuracy"]["top1"]
    q_top1 = ev_int8["accuracy"]["top1"]
    extra = {
        **run_header("quantize", rec, loaded.spec, weights, loaded.source, size, source.name),
        "evaluation": {"split": "test", "images": eval_limit or len(source.split("test")),
                       "top1_drop_pt": None if ref_top1 is None or q_top1 is None
                       else round(100 * (ref_top1 - q_top1), 3)},
        "calibration": ({**reader.describe(), "method": facts["calibration_method"]} if qat is None else
                        {**reader.describe(), "method": rec.calibration.method,
                         "used_by": "the int8-ptq baseline only: the QAT model's own scales are exported"}
                        if ptq is not None else None),
        "quantization": facts,
        "checks": checks,
        "cpu": cpu,
        "tuning": tuning_report,
        "qat": qat_report,
        "mixed_precision": mixed.report if mixed else None,
        "timings_s": {k: round(v, 2) for k, v in timings.items()} | {"total": round(time.time() - t_start, 2)},
    }
    if mixed:
        from compress.mixed_precision import render_plan

        write_text(out / "mixed_precision.md", render_plan(mixed.report))
    write_run_report(out, variants, extra, notes=_qat_notes(qat_report) if qat_report else ())
    return {"variants": variants, **extra, "output_dir": str(out)}


def _qat_notes(q: dict[str, Any]) -> list[str]:
    """report.md's QAT section: training, freeze points, and how the export matches the fake-quant model."""
    lines = ["", "## Quantization-aware training", "",
             f"{q['epochs']} epoch(s) from the float model"
             + (" (a finished checkpoint, reused: no training in this run)" if q["resumed_from_epoch"] >= q["epochs"]
                else f", resumed from epoch {q['resumed_from_epoch']}" if q["resumed_from_epoch"] else "")
             + f"; {q['activation_sites']} activation and {q['weight_sites']} weight fake quantizers "
               f"({q['machinery']}). Freeze points: {'; '.join(q['freeze_events']) or 'restored from the checkpoint'}.",
             "", "| epoch | train loss | fake-quant test top-1 | seconds |", "|---:|---:|---:|---:|"]
    lines += [f"| {h['epoch']} | {h['train_loss']:.4f} | {100 * h['test_top1']:.2f} % | {h['seconds']:.0f} |"
              for h in q["history"]]
    lines += ["", f"Exported with the QAT model's own scales and zero points (no calibration): the fake-quant torch "
                  f"model scores {100 * q['fake_quant_top1']:.2f} % and the int8 ONNX predicts the same class on "
                  f"{100 * q['onnx_vs_fake_quant_agreement']:.2f} % of the evaluated test images (max abs logit "
                  f"difference {q['onnx_vs_fake_quant_max_abs_logit_diff']:.3f}). Checkpoint: `{q['checkpoint']}`."]
    return lines
