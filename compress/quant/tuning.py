"""Accuracy-driven int8 tuning with Intel neural-compressor's tuning loop over onnxruntime's QDQ quantizer.

neural-compressor 3.x has no ONNX Runtime backend (it moved to the separate ``onnx-neural-compressor``
package, whose only release, 1.0, pins numpy < 2 and so cannot be installed beside this project's numpy 2
stack; the run report's ``tuning.engine_notes`` records what is installed), so it cannot quantize an ONNX
model itself.  What it does provide, framework-free, is ``neural_compressor.common``: ``BaseConfig`` (a config whose
list-valued parameters expand into a config set), ``ConfigLoader``, ``TuningConfig`` and ``TuningMonitor``
(baseline, relative tolerable loss, max trials, stop rule, best trial).  :func:`tune` drives that loop with
configs of OUR quantizer (:class:`OrtQdqConfig`), in neural-compressor's classic order:

1. the recipe's quantization with each calibration method (``tuning.calibration_methods``);
2. if no method meets the criterion: rank layers by sensitivity (logit error of the int8 model when only
   that layer is kept in fp32) and fall back the most sensitive ones, 1, 2, 3 ... layers, until the
   criterion is met, ``max_trials`` is reached or ``max_fallback_fraction`` of the convs is in fp32.

Accuracy is measured on ``tuning.eval_size`` TRAIN-split images disjoint from the calibration images; the
test split is only used afterwards, to report.  Every int8 model stays the same QDQ ONNX form as the ORT path.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import onnx

from calibration.datasets import DataSource
from calibration.subsets import Holdout
from compress.errors import UserError
from compress.quant.core import QuantizedGraph, calibrate, holdout_logits, quantize_prepared, resolve_excluded_nodes
from recipes.loader import Recipe

__all__ = ["tune", "TuneResult", "OrtQdqConfig", "fallback_budget", "neural_compressor_status"]

log = logging.getLogger(__name__)
_FALLBACK_OPS = ("Conv", "Gemm")


def neural_compressor_status() -> dict[str, Any]:
    """What neural-compressor offers for ONNX models in this environment (recorded in the report)."""
    info: dict[str, Any] = {}
    try:
        import neural_compressor

        info["neural_compressor"] = getattr(neural_compressor, "__version__", "unknown")
        import importlib.util

        info["onnxrt_backend_in_neural_compressor"] = importlib.util.find_spec("neural_compressor.onnxrt") is not None
    except Exception as e:  # missing dependencies (psutil, prettytable, pydantic) surface here
        info["neural_compressor"] = f"not importable: {type(e).__name__}: {e}"
    try:
        import importlib.metadata as md

        info["onnx_neural_compressor"] = md.version("onnx-neural-compressor")
    except Exception:
        info["onnx_neural_compressor"] = None
    return info


def _nc():
    try:
        from neural_compressor.common.base_config import DEFAULT_WHITE_LIST, BaseConfig
        from neural_compressor.common.base_tuning import ConfigLoader, TuningConfig, TuningMonitor
    except ImportError as e:
        raise UserError(f"recipe needs neural-compressor's tuning loop, which cannot be imported ({e}); "
                        f"install neural-compressor with its dependencies (psutil, prettytable, pydantic)") from None
    return BaseConfig, DEFAULT_WHITE_LIST, ConfigLoader, TuningConfig, TuningMonitor


def _make_config_class():
    BaseConfig, DEFAULT_WHITE_LIST, *_ = _nc()

    class OrtQdqConfig(BaseConfig):
        """One point of our ORT quantizer's space, as a neural-compressor config.  List-valued parameters
        expand (``BaseConfig.expand``) into one config per value, like neural-compressor's own configs."""

        name = "mnv3_ort_qdq"
        params_list = ["calibration_method", "nodes_to_exclude"]

        def __init__(self, calibration_method: str | list = "minmax", nodes_to_exclude: tuple = (),
                     white_list=DEFAULT_WHITE_LIST) -> None:
            super().__init__(white_list=white_list)
            self.calibration_method = calibration_method
            self.nodes_to_exclude = tuple(nodes_to_exclude)
            self._post_init()

        @classmethod
        def register_supported_configs(cls) -> None:
            cls.supported_configs = []

        @classmethod
        def get_config_set_for_tuning(cls) -> "OrtQdqConfig":
            from recipes.loader import CALIBRATION_METHODS

            return cls(calibration_method=list(CALIBRATION_METHODS))

        def to_dict(self) -> dict[str, Any]:
            return {"calibration_method": self.calibration_method, "nodes_to_exclude": list(self.nodes_to_exclude)}

        def __eq__(self, other: object) -> bool:
            return (isinstance(other, OrtQdqConfig) and self.calibration_method == other.calibration_method
                    and self.nodes_to_exclude == other.nodes_to_exclude)

        __hash__ = None

    return OrtQdqConfig


_CONFIG_CLASS = None


def OrtQdqConfig(*args, **kwargs):  # noqa: N802 - a class built lazily (neural-compressor imports are slow)
    global _CONFIG_CLASS
    if _CONFIG_CLASS is None:
        _CONFIG_CLASS = _make_config_class()
    return _CONFIG_CLASS(*args, **kwargs)


@dataclass
class TuneResult:
    graph: QuantizedGraph
    report: dict[str, Any]
    recipe: Recipe  # the recipe that reproduces the chosen model without tuning


def _score(logits: np.ndarray, labels: np.ndarray, ref_correct: np.ndarray | None, metric: str) -> float:
    """``top1``: plain top-1.  ``retained_top1``: share of images that the float model AND this model get
    right - gains on images the float model gets wrong do not cancel losses (on a few thousand images such
    luck is worth tenths of a point).  For the float model itself both are its top-1."""
    correct = logits.argmax(1) == labels
    if metric == "retained_top1" and ref_correct is not None:
        correct = correct & ref_correct
    return float(correct.mean())


def _fallback_candidates(prepared: onnx.ModelProto, excluded: Sequence[str]) -> list[str]:
    return [n.name for n in prepared.graph.node if n.op_type in _FALLBACK_OPS and n.name not in excluded]


def tune(prepared_path: str | os.PathLike, reader, source: DataSource, recipe: Recipe, workdir: str | os.PathLike,
         cpu: dict | None = None, progress: bool = False) -> TuneResult:
    """neural-compressor's accuracy-driven loop over our QDQ quantizer (see the module docstring)."""
    if not source.has_labels:
        raise UserError(f"recipe {recipe.name} tunes for accuracy and needs a labelled dataset; "
                        f"{source.name} has no labels")
    return _quiet_nc(lambda: _Tuner(prepared_path, reader, source, recipe, workdir, cpu, progress).run())


class _Tuner:
    """One tuning run: the holdout, the float baseline, neural-compressor's monitor and every trial's model."""

    def __init__(self, prepared_path, reader, source: DataSource, recipe: Recipe, workdir, cpu, progress: bool):
        _, _, self.ConfigLoader, TuningConfig, TuningMonitor = _nc()
        self.t0 = time.time()
        self.prepared_path, self.reader, self.recipe, self.workdir = prepared_path, reader, recipe, workdir
        self.cpu, self.progress, self.cfg = cpu, progress, recipe.tuning
        self.prepared = onnx.load(str(prepared_path))
        self.holdout = Holdout(source, recipe.calibration.size, self.cfg.eval_size, recipe.calibration.seed)
        self.fp32_logits, self.labels = holdout_logits(self.prepared, self.holdout)
        self.fp32_correct = self.fp32_logits.argmax(1) == self.labels
        self.baseline = _score(self.fp32_logits, self.labels, None, self.cfg.metric)
        # an absolute loss becomes the relative loss neural-compressor's monitor compares against
        self.tolerable = (self.cfg.tolerable_loss if self.cfg.criterion == "relative"
                          else self.cfg.tolerable_loss / max(self.baseline, 1e-9))
        self.monitor = TuningMonitor(TuningConfig(config_set=None, tolerable_loss=self.tolerable,
                                                  max_trials=self.cfg.max_trials))
        self.monitor.set_baseline(self.baseline)
        self.ranges: dict[str, Any] = {}
        self.trials: list[dict[str, Any]] = []
        self.graphs: dict[int, QuantizedGraph] = {}

    def ranges_for(self, method: str):
        if method not in self.ranges:
            cal = dataclasses.replace(self.recipe.calibration, method=method)
            self.ranges[method] = calibrate(self.prepared_path, self.reader, cal, self.workdir, progress=self.progress)
        return self.ranges[method]

    def build(self, config) -> QuantizedGraph:
        rec = self.recipe.with_overrides("calibration", method=config.calibration_method)
        return quantize_prepared(self.prepared_path, self.ranges_for(config.calibration_method), rec, self.workdir,
                                 extra_excluded=config.nodes_to_exclude, cpu=self.cpu)

    def trial(self, stage: str, config) -> None:
        g = self.build(config)
        logits, _ = holdout_logits(g.model, self.holdout)
        score = _score(logits, self.labels, self.fp32_correct, self.cfg.metric)
        idx = self.monitor.get_number_of_trials()
        self.monitor.add_trial_result(idx, score, config)
        self.graphs[idx] = g
        self.trials.append({
            "trial": idx, "stage": stage, "calibration_method": config.calibration_method,
            "fallback": list(config.nodes_to_exclude), self.cfg.metric: round(score, 5),
            "top1": round(float((logits.argmax(1) == self.labels).mean()), 5),
            "relative_loss": round((self.baseline - score) / max(self.baseline, 1e-9), 5),
            "agreement": round(float((logits.argmax(1) == self.fp32_logits.argmax(1)).mean()), 5)})
        if self.progress:
            print(f"  trial {idx}: {stage} {config.calibration_method} fallback={len(config.nodes_to_exclude)} "
                  f"{self.cfg.metric}={score:.4f} (float {self.baseline:.4f})", flush=True)

    def run_stage(self, stage: str, configs: list) -> None:
        for config in self.ConfigLoader(config_set=configs):
            if self.monitor.get_number_of_trials() >= self.cfg.max_trials:
                return
            self.trial(stage, config)
            if self.monitor.need_stop():
                return

    def passed(self) -> bool:
        return _passed(self.monitor, self.baseline, self.tolerable)

    def fallback_configs(self, method: str, sensitivity: list[dict[str, Any]]) -> list:
        """1, 2, 3 ... of the most sensitive layers in fp32, within the recipe's fallback budget."""
        conv_names = {n.name for n in self.prepared.graph.node if n.op_type == "Conv"}
        budget = fallback_budget(self.prepared, self.recipe)
        configs, chosen, convs_out = [], [], 0
        for name in [s["node"] for s in sensitivity if s["gain"] > 0]:
            is_conv = name in conv_names
            if is_conv and convs_out + 1 > budget:
                continue
            chosen.append(name)
            convs_out += is_conv
            configs.append(OrtQdqConfig(calibration_method=method, nodes_to_exclude=tuple(chosen)))
        return configs

    def run(self) -> TuneResult:
        # stage 1: calibration methods, expanded by neural-compressor from one list-valued config
        self.run_stage("calibration", OrtQdqConfig(calibration_method=list(self.cfg.calibration_methods)).expand())
        sensitivity: list[dict[str, Any]] = []
        if not self.passed() and self.monitor.get_number_of_trials() < self.cfg.max_trials:
            method = max(self.trials, key=lambda t: t[self.cfg.metric])["calibration_method"]
            sensitivity = _sensitivity(self.prepared, self.holdout, self.fp32_logits, lambda names: self.build(
                OrtQdqConfig(calibration_method=method, nodes_to_exclude=tuple(names))), self.recipe, self.progress)
            self.run_stage("fallback", self.fallback_configs(method, sensitivity))
        return self.result(sensitivity)

    def result(self, sensitivity: list[dict[str, Any]]) -> TuneResult:
        passed = self.passed()
        # neural-compressor stops at the first config that meets the goal: the fewest fallbacks
        idx = self.monitor.get_number_of_trials() - 1 if passed else self.monitor.get_best_trial_record().trial_index
        chosen = self.trials[idx]
        final = self.recipe.with_overrides("calibration", method=chosen["calibration_method"])
        final = final.with_overrides("quantize", nodes_to_exclude=tuple(final.quantize.nodes_to_exclude)
                                     + tuple(chosen["fallback"]))
        final = final.with_overrides("tuning", enabled=False)
        final = final.replace(name=f"{self.recipe.name}-result", description=f"the configuration "
                              f"{self.recipe.name} chose (tuning off): reproduces its model")
        report = {
            "engine": "neural-compressor " + str(neural_compressor_status().get("neural_compressor")),
            "loop": "neural_compressor.common.base_tuning: TuningConfig + TuningMonitor + ConfigLoader over "
                    "OrtQdqConfig(BaseConfig) of onnxruntime.quantization.quantize_static (QDQ)",
            "criterion": {"kind": self.cfg.criterion, "tolerable_loss": self.cfg.tolerable_loss,
                          "relative_tolerable_loss": round(self.tolerable, 6), "metric": self.cfg.metric},
            "tuning_set": self.holdout.describe(), "baseline": round(self.baseline, 5), "met": passed,
            "chosen_trial": idx, "calibration_method": chosen["calibration_method"],
            "fallback_fp32_nodes": chosen["fallback"], "trials": self.trials,
            "sensitivity_top": sensitivity[:10], "seconds": round(time.time() - self.t0, 1),
            "engine_notes": neural_compressor_status(),
        }
        return TuneResult(self.graphs[idx], report, final)


def fallback_budget(prepared: onnx.ModelProto, recipe: Recipe) -> int:
    """How many more convs tuning may keep in fp32: ``max_fallback_fraction`` of them, and no more than
    ``min_int8_conv_fraction`` leaves, less the convs the recipe's own ``nodes_to_exclude`` (names or fnmatch
    patterns, resolved to the graph's node names) already keeps in fp32."""
    conv_names = {n.name for n in prepared.graph.node if n.op_type == "Conv"}
    n_convs = len(conv_names)
    q = recipe.quantize
    already = len(conv_names & set(resolve_excluded_nodes(prepared, q.nodes_to_exclude, q.quantize_head)))
    return min(int(np.floor(recipe.tuning.max_fallback_fraction * n_convs + 1e-9)),
               int(np.floor((1 - q.min_int8_conv_fraction) * n_convs + 1e-9)) - already)


def _passed(monitor, baseline: float, tolerable: float) -> bool:
    hist = monitor.tuning_history
    return bool(hist) and hist[-1].trial_result >= baseline * (1 - tolerable)


def _sensitivity(prepared: onnx.ModelProto, holdout: Holdout, fp32_logits: np.ndarray, build_fn, recipe: Recipe,
                 progress: bool) -> list[dict[str, Any]]:
    """Mean squared logit error vs float of the int8 model with ONE layer kept in fp32, per candidate layer;
    most sensitive (largest error reduction) first.  Logit error is a finer signal than top-1 on a few
    thousand images."""
    base_excluded = list(recipe.quantize.nodes_to_exclude)
    candidates = _fallback_candidates(prepared, base_excluded)
    base_err = float(((holdout_logits(build_fn([]).model, holdout)[0] - fp32_logits) ** 2).mean())
    it = candidates
    if progress:
        from tqdm import tqdm

        it = tqdm(candidates, desc="layer sensitivity", unit="layer", leave=False)
    out = []
    for name in it:
        err = float(((holdout_logits(build_fn([name]).model, holdout)[0] - fp32_logits) ** 2).mean())
        out.append({"node": name, "mse_all_int8": round(base_err, 6), "mse_without": round(err, 6),
                    "gain": round(base_err - err, 6)})
    out.sort(key=lambda d: d["gain"], reverse=True)
    return out


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def _quiet_nc(fn):
    """neural-compressor logs every expanded config and a table per trial at INFO, and resets its logger's
    level on every call; a logger filter (which it does not reset) keeps only warnings and errors."""
    nc_log = logging.getLogger("neural_compressor")
    flt = _BelowWarning()
    nc_log.addFilter(flt)
    try:
        return fn()
    finally:
        nc_log.removeFilter(flt)
