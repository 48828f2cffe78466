"""The sections of a recipe, one frozen dataclass each; every one validates itself in ``__post_init__`` and
raises ``ValueError`` naming the key and what is allowed (the loader turns it into a one-line error naming the
file and section)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from compress.onnx.graph_passes import HARD_SIGMOID_FORMS, HSWISH_FORMS  # the graph passes own the forms

__all__ = ["QuantizeConfig", "CalibrationConfig", "TuningConfig", "PruneConfig", "MixedPrecisionConfig",
           "QATConfig", "SECTIONS", "HSWISH_FORMS", "HARD_SIGMOID_FORMS", "CALIBRATION_METHODS"]

FORMATS = ("qdq",)
WEIGHT_TYPES = ("int8",)
ACTIVATION_TYPES = ("uint8", "int8")
REDUCE_RANGE = ("auto", "always", "never")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
TUNING_ENGINES = ("neural-compressor",)
TUNING_CRITERIA = ("relative", "absolute")
TUNING_METRICS = ("retained_top1", "top1")


def _allowed(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{key} = {value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")


def _check_range(key: str, value: float, lo: float, hi: float, lo_open: bool = False) -> None:
    ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok or (isinstance(value, float) and math.isnan(value)):
        left = "(" if lo_open else "["
        raise ValueError(f"{key} = {value!r} is out of range; allowed: {left}{lo}, {hi}]")


@dataclass(frozen=True)
class QuantizeConfig:
    """How the float graph becomes a QDQ int8 graph (onnxruntime.quantization.quantize_static)."""

    format: str = "qdq"
    weight_type: str = "int8"
    activation_type: str = "uint8"
    per_channel: bool = True
    reduce_range: str = "auto"  # auto: 7-bit weights only on CPUs without VNNI (ORT's U8S8 saturation advice)
    hswish: str = "hardswish"
    hard_sigmoid: str = "op"
    # hard-sigmoid outputs are in [0, 1] (scale 1/255, zero point 0 for uint8) and relu6 outputs in [0, 6]
    # (scale 6/255): fixed quantization parameters instead of calibrated ones
    hard_sigmoid_fixed_qparams: bool = True
    quantize_head: bool = True  # the classifier Gemms
    nodes_to_exclude: tuple[str, ...] = ()  # node names or fnmatch patterns kept in fp32
    min_int8_conv_fraction: float = 0.9
    # pad depthwise convs to this channel multiple with zero channels (same function) so onnxruntime's fast
    # symmetric int8 depthwise kernel applies (it needs groups % 16 == 0 on x86); 0 = off
    depthwise_channel_multiple: int = 16
    # pad the stem's 3 input channels to 4 (a Pad of the quantized image with its zero point, zero weights):
    # MLAS's symmetric int8 conv kernels need input channels % 4 == 0
    pad_input_channels: bool = True
    # weight grid: 8 = int8; 2..7 = a narrower symmetric grid (codes in [-(2^(b-1)-1), 2^(b-1)-1]) still stored
    # as int8, so onnxruntime's int8 kernels run it (a stress setting: 4-bit weights show what QAT recovers)
    weight_bits: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes_to_exclude", tuple(self.nodes_to_exclude))
        _check_range("weight_bits", self.weight_bits, 2, 8)
        if self.depthwise_channel_multiple not in (0, 4, 8, 16, 32, 64):
            raise ValueError(f"depthwise_channel_multiple = {self.depthwise_channel_multiple!r} is not allowed; "
                             f"allowed values: 0 (off), 4, 8, 16, 32, 64")
        _allowed("format", self.format, FORMATS)
        _allowed("weight_type", self.weight_type, WEIGHT_TYPES)
        _allowed("activation_type", self.activation_type, ACTIVATION_TYPES)
        _allowed("reduce_range", self.reduce_range, REDUCE_RANGE)
        _allowed("hswish", self.hswish, HSWISH_FORMS)
        _allowed("hard_sigmoid", self.hard_sigmoid, HARD_SIGMOID_FORMS)
        _check_range("min_int8_conv_fraction", self.min_int8_conv_fraction, 0.0, 1.0)
        if any(not n for n in self.nodes_to_exclude):
            raise ValueError("nodes_to_exclude must not contain empty names")


@dataclass(frozen=True)
class CalibrationConfig:
    """Which train-split images calibrate the activation ranges, and how ranges are computed."""

    method: str = "minmax"
    size: int = 512  # images drawn (deterministically, by ``seed``) from the TRAIN split
    batch_size: int = 32
    percentile: float = 99.999  # percentile method only
    num_bins: int = 2048  # histogram bins for percentile / entropy
    symmetric_activations: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _allowed("method", self.method, CALIBRATION_METHODS)
        _check_range("size", self.size, 1, 1_000_000)
        _check_range("batch_size", self.batch_size, 1, 4096)
        _check_range("percentile", self.percentile, 50.0, 100.0, lo_open=True)
        _check_range("num_bins", self.num_bins, 128, 65536)


@dataclass(frozen=True)
class TuningConfig:
    """Accuracy-driven tuning: try calibration methods, then fall back the most sensitive layers to fp32.

    The accuracy that drives the tuning is measured on ``eval_size`` TRAIN-split images that calibration does
    not use; the test split only measures the final result.
    """

    enabled: bool = False
    engine: str = "neural-compressor"
    criterion: str = "relative"
    # retained_top1: images the float model AND the int8 model get right (gains do not cancel losses); top1
    metric: str = "retained_top1"
    tolerable_loss: float = 0.005  # 0.005 relative = at most 0.5 % of the float accuracy may be lost
    max_trials: int = 24
    eval_size: int = 2000
    calibration_methods: tuple[str, ...] = ("minmax", "percentile", "entropy")
    max_fallback_fraction: float = 0.1  # never keep more than this fraction of convs in fp32

    def __post_init__(self) -> None:
        object.__setattr__(self, "calibration_methods", tuple(self.calibration_methods))
        _allowed("engine", self.engine, TUNING_ENGINES)
        _allowed("criterion", self.criterion, TUNING_CRITERIA)
        _allowed("metric", self.metric, TUNING_METRICS)
        _check_range("tolerable_loss", self.tolerable_loss, 0.0, 1.0)
        _check_range("max_trials", self.max_trials, 1, 10_000)
        _check_range("eval_size", self.eval_size, 10, 1_000_000)
        _check_range("max_fallback_fraction", self.max_fallback_fraction, 0.0, 1.0)
        if not self.calibration_methods:
            raise ValueError("calibration_methods must list at least one method")
        for m in self.calibration_methods:
            _allowed("calibration_methods[]", m, CALIBRATION_METHODS)


@dataclass(frozen=True)
class PruneConfig:
    """NetAdapt channel pruning (``mnv3-compress prune``, see compress/prune/netadapt.py); unused by other commands.

    Proposals are scored on ``eval_images`` held-out TRAIN images; the test split only measures the result.
    """

    target_latency_ratio: float = 0.6  # stop once measured latency <= this x the unpruned model's
    delta_ratio: float = 0.01  # each proposal cuts predicted latency by >= delta_ratio x the seed latency
    importance: str = "bn"  # channel importance: "l1" / "l2" filter norm, "bn" (|gamma|; kept the most accuracy)
    selection: str = "ratio"  # "ratio": max dAcc/|dLatency| (MobileNetV3); "min_drop": max accuracy (NetAdapt)
    finetune_steps: int = 10  # short fine-tune of every proposal (train batches)
    final_finetune_epochs: int = 2
    eval_images: int = 2000
    batch_size: int = 128
    lr: float = 0.0001  # short fine-tunes (cosine decay); 1e-3 lowers a converged model's accuracy
    final_lr: float = 0.001  # final fine-tune (one-cycle)
    threads: int = 1  # onnxruntime intra-op threads of the deployment
    batch: int = 1  # images per forward pass of the deployment
    max_iterations: int = 100
    torch_threads: int = 1  # threads for the fine-tunes (0: torch's default)
    seed: int = 0
    quantize_after: bool = False  # then apply [quantize] / [calibration] to the pruned network (netadapt-int8)
    limit_train: int = 0  # 0: the whole train split; else its first N images (holdout and fine-tune pool)
    latency_precision: str = "fp32"  # what the latency table and the loop's measurements time: "fp32" or "int8"
    channel_step: int = 0  # channels per cut; 0: the target's kernel multiple (16 for ort-x86 int8, else 8)

    def __post_init__(self) -> None:
        _check_range("target_latency_ratio", self.target_latency_ratio, 0.0, 1.0, lo_open=True)
        _check_range("delta_ratio", self.delta_ratio, 0.0, 0.5, lo_open=True)
        _allowed("importance", self.importance, ("l1", "l2", "bn"))
        _allowed("selection", self.selection, ("ratio", "min_drop"))
        _check_range("finetune_steps", self.finetune_steps, 0, 100_000)
        _check_range("final_finetune_epochs", self.final_finetune_epochs, 0, 1000)
        _check_range("eval_images", self.eval_images, 100, 1_000_000)
        _check_range("batch_size", self.batch_size, 1, 4096)
        _check_range("lr", self.lr, 0.0, 1.0, lo_open=True)
        _check_range("final_lr", self.final_lr, 0.0, 1.0, lo_open=True)
        _check_range("threads", self.threads, 1, 1024)
        _check_range("batch", self.batch, 1, 4096)
        _check_range("max_iterations", self.max_iterations, 1, 10_000)
        _check_range("torch_threads", self.torch_threads, 0, 1024)
        _check_range("limit_train", self.limit_train, 0, 100_000_000)
        _allowed("latency_precision", self.latency_precision, ("fp32", "int8"))
        _check_range("channel_step", self.channel_step, 0, 1024)
        if self.channel_step % 8:
            raise ValueError(f"channel_step = {self.channel_step} is not allowed; allowed: 0 or a multiple of 8 "
                             f"(the architecture's channel divisor)")


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """Latency-aware mixed precision (compress/quant/mixed_precision.py): per layer int8 or fp32 from latency measured
    with onnxruntime's profiler on this machine and measured accuracy sensitivity, Q/DQ transitions counted."""

    enabled: bool = False
    # what a fallback must buy back: "auto" = labeled TRAIN holdout accuracy when the dataset has labels, else
    # agreement with the float model; "accuracy"; "agreement"; "sqnr" (logit SQNR vs float >= 20 dB)
    sensitivity: str = "auto"
    tolerable_loss: float = 0.005  # absolute accuracy / agreement loss vs float allowed on the holdout
    eval_size: int = 1000  # TRAIN-split holdout images (disjoint from calibration)
    profile_runs: int = 30  # profiled runs per latency measurement
    min_gain_ms: float = 0.0  # a layer goes to fp32 for speed only if that saves more (ms, transitions counted)
    max_fp32_fraction: float = 0.25  # at most this fraction of convs in fp32

    def __post_init__(self) -> None:
        _allowed("sensitivity", self.sensitivity, ("auto", "accuracy", "agreement", "sqnr"))
        _check_range("tolerable_loss", self.tolerable_loss, 0.0, 1.0)
        _check_range("eval_size", self.eval_size, 10, 1_000_000)
        _check_range("profile_runs", self.profile_runs, 3, 10_000)
        _check_range("min_gain_ms", self.min_gain_ms, 0.0, 1000.0)
        _check_range("max_fp32_fraction", self.max_fp32_fraction, 0.0, 1.0)


@dataclass(frozen=True)
class QATConfig:
    """Quantization-aware training (compress/quant/qat.py): fine-tune the float model with fake quantization that
    mirrors the exported int8 graph, then export the learned scales and zero points (no re-calibration).

    Freeze points are in epochs and may be fractional (torchvision's reference freezes BN statistics, then
    the observers, a few epochs into QAT).
    """

    enabled: bool = False
    epochs: int = 2
    batch_size: int = 128
    lr: float = 1e-4  # AdamW; a converged float model needs a small one
    weight_decay: float = 0.0
    schedule: str = "cosine"  # "cosine" or "onecycle"
    label_smoothing: float = 0.1
    hflip: bool = True
    pad_crop: int = 0
    freeze_bn_epochs: float = 1.0  # BN running statistics frozen (and used for folding) from here on
    freeze_observers_epochs: float = 1.5  # activation ranges and weight scales frozen from here on
    observer_momentum: float = 0.01  # moving-average constant of the activation range observers
    limit_train: int = 0  # 0: the whole train split; else the first N (shuffled per epoch)
    limit_test: int = 0  # per-epoch progress evaluation on the first N test images (0: all); not the report's
    seed: int = 0
    compare_ptq: bool = True  # also calibrate + quantize the float model (PTQ, same [quantize]) as a baseline
    min_onnx_agreement: float = 0.99  # the exported int8 ONNX must predict the fake-quant model's top-1 this often

    def __post_init__(self) -> None:
        _check_range("epochs", self.epochs, 1, 1000)
        _check_range("batch_size", self.batch_size, 1, 4096)
        _check_range("lr", self.lr, 0.0, 1.0, lo_open=True)
        _check_range("weight_decay", self.weight_decay, 0.0, 1.0)
        _allowed("schedule", self.schedule, ("cosine", "onecycle"))
        _check_range("label_smoothing", self.label_smoothing, 0.0, 0.5)
        _check_range("pad_crop", self.pad_crop, 0, 16)
        _check_range("freeze_bn_epochs", self.freeze_bn_epochs, 0.0, float(self.epochs))
        # observers must see data before they freeze: 0 would export the initial scale 1.0
        _check_range("freeze_observers_epochs", self.freeze_observers_epochs, 0.0, float(self.epochs), lo_open=True)
        _check_range("observer_momentum", self.observer_momentum, 0.0, 1.0, lo_open=True)
        _check_range("limit_train", self.limit_train, 0, 100_000_000)
        _check_range("limit_test", self.limit_test, 0, 100_000_000)
        _check_range("min_onnx_agreement", self.min_onnx_agreement, 0.0, 1.0)


SECTIONS: dict[str, type] = {"quantize": QuantizeConfig, "calibration": CalibrationConfig, "tuning": TuningConfig,
                             "prune": PruneConfig, "mixed_precision": MixedPrecisionConfig, "qat": QATConfig}
