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
from calibration.reader import CALIBRATION_SPLIT, holdout_indices, train_batches
from compress.errors import UserError
from compress.quantize import QuantizedGraph, calibrate, quantize_prepared
from recipes.loader import Recipe

__all__ = ["tune", "TuneResult", "OrtQdqConfig", "HoldoutSet", "neural_compressor_status"]

log = logging.getLogger(__name__)
_FALLBACK_OPS = ("Conv", "Gemm")
_CACHE_LIMIT_BYTES = 512 << 20


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


class HoldoutSet:
    """Train-split images disjoint from calibration: what the tuning accuracy is measured on."""

    def __init__(self, source: DataSource, calib_size: int, size: int, seed: int = 0, batch_size: int = 250) -> None:
        n_train = len(source.split(CALIBRATION_SPLIT))
        self.indices = holdout_indices(n_train, calib_size, size, seed)
        self.source = source
        self.batch_size = batch_size
        h, w = source.preprocess.input_size
        self._cached = size * 3 * h * w * 4 <= _CACHE_LIMIT_BYTES
        self._batches = list(self._load()) if self._cached else None

    def _load(self):
        return train_batches(self.source, self.indices, self.batch_size)

    def batches(self):
        return iter(self._batches) if self._cached else self._load()

    def predict(self, model: onnx.ModelProto | bytes) -> tuple[np.ndarray, np.ndarray]:
        from eval.latency import make_session

        sess = make_session(model if isinstance(model, bytes) else model.SerializeToString(), threads=None)
        name = sess.get_inputs()[0].name
        logits, labels = [], []
        for x, y in self.batches():
            logits.append(sess.run(None, {name: x})[0])
            labels.append(y)
        return np.concatenate(logits), np.concatenate(labels)

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.source.name, "split": CALIBRATION_SPLIT, "images": int(len(self.indices)),
                "disjoint_from_calibration": True}


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
    return _quiet_nc(lambda: _tune(prepared_path, reader, source, recipe, workdir, cpu, progress))


def _tune(prepared_path, reader, source: DataSource, recipe: Recipe, workdir, cpu, progress: bool) -> TuneResult:
    _, _, ConfigLoader, TuningConfig, TuningMonitor = _nc()
    if not source.has_labels:
        raise UserError(f"recipe {recipe.name} tunes for accuracy and needs a labelled dataset; "
                        f"{source.name} has no labels")
    t0 = time.time()
    tcfg = recipe.tuning
    prepared = onnx.load(str(prepared_path))
    holdout = HoldoutSet(source, recipe.calibration.size, tcfg.eval_size, recipe.calibration.seed)
    fp32_logits, labels = holdout.predict(prepared)
    fp32_correct = fp32_logits.argmax(1) == labels
    baseline = _score(fp32_logits, labels, None, tcfg.metric)
    if tcfg.criterion == "relative":
        tolerable = tcfg.tolerable_loss
    else:  # absolute loss -> the relative loss neural-compressor's monitor compares against
        tolerable = tcfg.tolerable_loss / max(baseline, 1e-9)
    tuning_config = TuningConfig(config_set=None, tolerable_loss=tolerable, max_trials=tcfg.max_trials)
    monitor = TuningMonitor(tuning_config)
    monitor.set_baseline(baseline)

    ranges_cache: dict[str, Any] = {}
    trials: list[dict[str, Any]] = []
    graphs: dict[int, QuantizedGraph] = {}

    def ranges_for(method: str):
        if method not in ranges_cache:
            cal = dataclasses.replace(recipe.calibration, method=method)
            ranges_cache[method] = calibrate(prepared_path, reader, cal, workdir, progress=progress)
        return ranges_cache[method]

    def build(config) -> tuple[QuantizedGraph, Recipe]:
        rec = recipe.with_overrides("calibration", method=config.calibration_method)
        g = quantize_prepared(prepared_path, ranges_for(config.calibration_method), rec, workdir,
                              extra_excluded=config.nodes_to_exclude, cpu=cpu)
        return g, rec

    def run_stage(stage: str, configs: list) -> bool:
        loader = ConfigLoader(config_set=configs)
        for config in loader:
            if monitor.get_number_of_trials() >= tcfg.max_trials:
                return True
            g, _ = build(config)
            logits, _ = holdout.predict(g.model)
            score = _score(logits, labels, fp32_correct, tcfg.metric)
            idx = monitor.get_number_of_trials()
            monitor.add_trial_result(idx, score, config)
            graphs[idx] = g
            trials.append({"trial": idx, "stage": stage, "calibration_method": config.calibration_method,
                           "fallback": list(config.nodes_to_exclude), tcfg.metric: round(score, 5),
                           "top1": round(float((logits.argmax(1) == labels).mean()), 5),
                           "relative_loss": round((baseline - score) / max(baseline, 1e-9), 5),
                           "agreement": round(float((logits.argmax(1) == fp32_logits.argmax(1)).mean()), 5)})
            if progress:
                print(f"  trial {idx}: {stage} {config.calibration_method} fallback={len(config.nodes_to_exclude)} "
                      f"{tcfg.metric}={score:.4f} (float {baseline:.4f})", flush=True)
            if monitor.need_stop():
                return True
        return False

    # stage 1: calibration methods, expanded by neural-compressor from one list-valued config
    stage1 = OrtQdqConfig(calibration_method=list(tcfg.calibration_methods)).expand()
    run_stage("calibration", stage1)
    sensitivity: list[dict[str, Any]] = []
    if not _passed(monitor, baseline, tolerable) and monitor.get_number_of_trials() < tcfg.max_trials:
        best_method = max(trials, key=lambda t: t[tcfg.metric])["calibration_method"]
        sensitivity = _sensitivity(prepared, holdout, fp32_logits, lambda names: build(
            OrtQdqConfig(calibration_method=best_method, nodes_to_exclude=tuple(names)))[0], recipe, progress)
        conv_names = {n.name for n in prepared.graph.node if n.op_type == "Conv"}
        n_convs = len(conv_names)
        already = len(conv_names & set(recipe.quantize.nodes_to_exclude))
        budget = min(int(np.floor(tcfg.max_fallback_fraction * n_convs + 1e-9)),
                     int(np.floor((1 - recipe.quantize.min_int8_conv_fraction) * n_convs + 1e-9)) - already)
        order = [s["node"] for s in sensitivity if s["gain"] > 0]
        stage2, chosen, convs_out = [], [], 0
        for name in order:
            is_conv = name in conv_names
            if is_conv and convs_out + 1 > budget:
                continue
            chosen.append(name)
            convs_out += is_conv
            stage2.append(OrtQdqConfig(calibration_method=best_method, nodes_to_exclude=tuple(chosen)))
        run_stage("fallback", stage2)

    passed = _passed(monitor, baseline, tolerable)
    if passed:  # neural-compressor stops at the first config that meets the goal: the fewest fallbacks
        chosen_idx = monitor.get_number_of_trials() - 1
    else:
        best = monitor.get_best_trial_record()
        chosen_idx = best.trial_index
    chosen_trial = trials[chosen_idx]
    graph = graphs[chosen_idx]
    final = recipe.with_overrides("calibration", method=chosen_trial["calibration_method"])
    final = final.with_overrides("quantize", nodes_to_exclude=tuple(final.quantize.nodes_to_exclude)
                                 + tuple(chosen_trial["fallback"]))
    final = final.with_overrides("tuning", enabled=False)
    final = final.replace(name=f"{recipe.name}-result",
                          description=f"the configuration {recipe.name} chose (tuning off): reproduces its model")
    report = {
        "engine": "neural-compressor " + str(neural_compressor_status().get("neural_compressor")),
        "loop": "neural_compressor.common.base_tuning: TuningConfig + TuningMonitor + ConfigLoader over "
                "OrtQdqConfig(BaseConfig) of onnxruntime.quantization.quantize_static (QDQ)",
        "criterion": {"kind": tcfg.criterion, "tolerable_loss": tcfg.tolerable_loss,
                      "relative_tolerable_loss": round(tolerable, 6), "metric": tcfg.metric},
        "tuning_set": holdout.describe(),
        "baseline": round(baseline, 5),
        "met": passed,
        "chosen_trial": chosen_idx,
        "calibration_method": chosen_trial["calibration_method"],
        "fallback_fp32_nodes": chosen_trial["fallback"],
        "trials": trials,
        "sensitivity_top": sensitivity[:10],
        "seconds": round(time.time() - t0, 1),
        "engine_notes": neural_compressor_status(),
    }
    return TuneResult(graph, report, final)


def _passed(monitor, baseline: float, tolerable: float) -> bool:
    hist = monitor.tuning_history
    return bool(hist) and hist[-1].trial_result >= baseline * (1 - tolerable)


def _sensitivity(prepared: onnx.ModelProto, holdout: HoldoutSet, fp32_logits: np.ndarray, build_fn, recipe: Recipe,
                 progress: bool) -> list[dict[str, Any]]:
    """Mean squared logit error vs float of the int8 model with ONE layer kept in fp32, per candidate layer;
    most sensitive (largest error reduction) first.  Logit error is a finer signal than top-1 on a few
    thousand images."""
    base_excluded = list(recipe.quantize.nodes_to_exclude)
    candidates = _fallback_candidates(prepared, base_excluded)
    base_err = float(((holdout.predict(build_fn([]).model)[0] - fp32_logits) ** 2).mean())
    it = candidates
    if progress:
        from tqdm import tqdm

        it = tqdm(candidates, desc="layer sensitivity", unit="layer", leave=False)
    out = []
    for name in it:
        err = float(((holdout.predict(build_fn([name]).model)[0] - fp32_logits) ** 2).mean())
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
