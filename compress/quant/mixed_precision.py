"""Latency-aware mixed precision: per layer int8 or fp32, chosen from latency MEASURED on this machine and
measured accuracy sensitivity, counting the Quantize/Dequantize transitions each choice creates.

A *unit* is one torch module of the network (``eval.profile.layer_of``: a conv with its activation, an SE block,
the classifier's Linear); units hold at least one Conv or Gemm.  :func:`plan`:

1. quantizes the whole network and profiles it and the float model with onnxruntime's profiler
   (``eval.profile.profile_onnx``, per-kernel medians): ``fp32_ms`` and ``int8_ms`` per unit;
2. prices transitions: keeping a unit in fp32 inside an int8 network adds a DequantizeLinear on each input and
   a QuantizeLinear on each output (plus a layout reorder, NHWC int8 <-> NCHWc float); the cost per element is
   measured from the int8 profile's QuantizeLinear, the element counts come from the graph's shapes.  A tensor
   between two fp32 units costs nothing, so the count depends on the whole plan;
3. latency pass: greedily moves to fp32 the unit with the largest ``int8_ms - fp32_ms - added transitions``
   while that gain exceeds ``min_gain_ms`` (recomputed after every move);
4. accuracy pass: measures the plan on a TRAIN-split holdout disjoint from calibration (labels: accuracy;
   ``--dataset synthetic``: agreement with the float model, or logit SQNR); while the loss exceeds
   ``tolerable_loss`` it measures each remaining unit's sensitivity (the share of the int8 model's logit error
   vs float that keeping that unit in fp32 removes) and moves the unit with the best reduction per ms of latency
   it costs;
5. before trusting the latency pass it measures the plan against the all-int8 model (``measure_interleaved``,
   real latency, no profiler) and keeps the latency moves only when the plan is faster by more than the
   measurement's round-to-round spread (both reported).  With a deploy target (``quantize --recipe int8-mixed
   --target openvino``) that check runs in the target's own runtime on its own artifacts (``measure``): the
   per-unit candidates still come from onnxruntime's profiler, the verdict from the runtime that ships; returns the node names to exclude plus the plan
   (every unit's measured times, sensitivity, precision and the reason).

Limits: profiler timing adds a few microseconds per kernel, so per-unit times are only meaningful when kernels
take tens of microseconds or more (MobileNetV3 at 224, not at 32x32); the interleaved check guards the result.

Every node stays in the network (``nodes_to_exclude`` only keeps units in float).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import onnx

from calibration.subsets import CALIBRATION_SPLIT, Holdout
from compress.errors import UserError
from compress.quant.core import holdout_logits, quantize_prepared, resolve_excluded_nodes
from eval.profile import layer_of, profile_onnx
from recipes.loader import MixedPrecisionConfig

__all__ = ["Unit", "MixedPlan", "layer_units", "boundary_tensors", "transition_ms", "greedy_latency_plan",
           "sensitivity_metric", "measured_gain", "plan", "plan_for_recipe", "render_plan"]

_WEIGHTED = ("Conv", "Gemm")
GRAPH_INPUT, GRAPH_OUTPUT = "(input)", "(output)"


@dataclass(frozen=True)
class Unit:
    name: str  # the layer (torch module path)
    nodes: tuple[str, ...]  # node names of the float graph
    convs: int  # Conv / Gemm nodes in it


@dataclass
class MixedPlan:
    nodes_to_exclude: list[str]
    report: dict[str, Any]


def layer_units(model: onnx.ModelProto) -> dict[str, Unit]:
    """Units of the float graph: nodes grouped by layer, only layers with a Conv or Gemm."""
    groups: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        groups.setdefault(layer_of(n.name or n.output[0]), []).append(n)
    return {k: Unit(k, tuple(n.name for n in v), sum(n.op_type in _WEIGHTED for n in v))
            for k, v in groups.items() if k != "(graph)" and any(n.op_type in _WEIGHTED for n in v)}


def _numel(model: onnx.ModelProto, batch: int = 1) -> dict[str, int]:
    out = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims:
            out[vi.name] = int(np.prod([d.dim_value if d.dim_value > 0 else batch for d in dims]))
    return out


def boundary_tensors(model: onnx.ModelProto, units: dict[str, Unit]) -> dict[str, list[tuple[str, str | None]]]:
    """Per unit: the activation tensors crossing its border, each with the unit on the other side (None: a
    node outside every unit; ``GRAPH_INPUT`` / ``GRAPH_OUTPUT``: the model's own input / output)."""
    inits = {i.name for i in model.graph.initializer}
    unit_of = {n: u.name for u in units.values() for n in u.nodes}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in model.graph.output}
    out: dict[str, list[tuple[str, str | None]]] = {u: [] for u in units}
    for u in units.values():
        mine = set(u.nodes)
        for n in model.graph.node:
            if n.name not in mine:
                continue
            for t in n.input:
                if t and t not in inits and (t not in producer or producer[t].name not in mine):
                    p = producer.get(t)
                    out[u.name].append((t, unit_of.get(p.name) if p is not None else GRAPH_INPUT))
            for t in n.output:
                for c in consumers.get(t, []):
                    if c.name not in mine:
                        out[u.name].append((t, unit_of.get(c.name)))
                if t in graph_outputs:
                    out[u.name].append((t, GRAPH_OUTPUT))
    return out


def transition_ms(unit: str, fp32: set[str], borders: dict[str, list[tuple[str, str | None]]],
                  numel: dict[str, int], ms_per_element: float) -> float:
    """Latency change of the Q/DQ transitions when ``unit`` joins the fp32 set ``fp32``: + for every border
    tensor whose other side stays int8, - for every one whose other side is already fp32 (that transition
    disappears).  The model's input is float: an int8 unit reading it needs a QuantizeLinear that an fp32 unit
    does not; the logits stay float either way."""
    total = 0.0
    for t, other in borders.get(unit, []):
        cost = ms_per_element * numel.get(t, 0)
        if other == GRAPH_OUTPUT:
            continue
        total += -cost if other in fp32 or other == GRAPH_INPUT else cost
    return total


def greedy_latency_plan(units: dict[str, Unit], fp32_ms: dict[str, float], int8_ms: dict[str, float],
                        borders, numel, ms_per_element: float, min_gain_ms: float, max_convs: int,
                        start: Sequence[str] = ()) -> tuple[set[str], list[dict[str, Any]]]:
    """Move units to fp32 while one saves more than ``min_gain_ms`` (transitions counted), best first."""
    chosen = set(start)
    steps = []
    while True:
        best, best_gain = None, min_gain_ms
        for u in units:
            if u in chosen or sum(units[c].convs for c in chosen) + units[u].convs > max_convs:
                continue
            gain = int8_ms.get(u, 0.0) - fp32_ms.get(u, 0.0) - transition_ms(u, chosen, borders, numel, ms_per_element)
            if gain > best_gain:
                best, best_gain = u, gain
        if best is None:
            return chosen, steps
        chosen.add(best)
        steps.append({"unit": best, "reason": "latency", "gain_ms": round(best_gain, 4)})


def sensitivity_metric(config: MixedPrecisionConfig, has_labels: bool) -> str:
    if config.sensitivity == "auto":
        return "accuracy" if has_labels else "agreement"
    if config.sensitivity == "accuracy" and not has_labels:
        raise UserError("mixed_precision.sensitivity = 'accuracy' needs a labelled dataset; use 'agreement' or "
                        "'sqnr' with --dataset synthetic")
    return config.sensitivity


def _score(logits: np.ndarray, fp32_logits: np.ndarray, labels: np.ndarray | None, metric: str) -> float:
    """Higher is better: accuracy, agreement with float top-1, or logit SQNR (dB)."""
    if metric == "accuracy":
        return float((logits.argmax(1) == labels).mean())
    if metric == "agreement":
        return float((logits.argmax(1) == fp32_logits.argmax(1)).mean())
    noise = float(((logits - fp32_logits) ** 2).mean())
    return float(10 * np.log10(float((fp32_logits ** 2).mean()) / max(noise, 1e-30)))


def plan(prepared: onnx.ModelProto, build: Callable[[Sequence[str]], onnx.ModelProto],
         predict: Callable[[onnx.ModelProto], np.ndarray], labels: np.ndarray | None,
         config: MixedPrecisionConfig, threads: int = 1, batch: int = 1, base_excluded: Sequence[str] = (),
         min_sqnr_db: float = 20.0, measure: Callable | None = None) -> MixedPlan:
    """The latency-aware plan for the float graph ``prepared``.

    ``build(extra_excluded)`` returns the int8 model with those float-graph nodes kept in fp32 (the recipe's
    quantizer with its calibration); ``predict(model)`` returns its logits on the holdout; ``labels`` are the
    holdout labels (None for unlabeled data).  Latency is profiled at ``threads`` / ``batch``.  With
    ``sensitivity = "sqnr"`` the plan must reach ``min_sqnr_db`` of logit SQNR instead of a tolerable loss.
    ``measure(all_int8, plan, plan_excluded)`` times the two int8 models interleaved and returns their latency
    dicts and the runtime's name (default: onnxruntime on these graphs).
    """
    units = layer_units(prepared)
    base = set(base_excluded)
    units = {k: u for k, u in units.items() if not set(u.nodes) <= base}
    if not units:
        return MixedPlan([], {"enabled": True, "units": {}, "note": "no quantizable layers"})
    p = _Planner(prepared, units, build, predict, labels, config, threads, batch, min_sqnr_db, measure)
    p.latency_pass()
    p.accuracy_pass()
    return MixedPlan(p.excluded(p.chosen), p.report())


class _Planner:
    """The state of one plan: measured unit times, the transition model, the chosen fp32 units and the steps."""

    def __init__(self, prepared, units: dict[str, Unit], build, predict, labels, config: MixedPrecisionConfig,
                 threads: int, batch: int, min_sqnr_db: float, measure: Callable | None = None) -> None:
        self.prepared, self.units, self.build, self.predict, self.labels = prepared, units, build, predict, labels
        self.measure = measure or self._measure_ort
        self.config, self.threads, self.batch, self.min_sqnr_db = config, threads, batch, min_sqnr_db
        self.n_convs = sum(n.op_type in _WEIGHTED for n in prepared.graph.node)
        self.max_convs = int(config.max_fp32_fraction * self.n_convs + 1e-9)
        self.metric = sensitivity_metric(config, labels is not None)
        self.all_int8 = build([])
        self.prof_fp32 = self.profile(prepared)
        self.prof_int8 = self.prof_plan = self.profile(self.all_int8)
        self.fp32_ms = {u: self.prof_fp32["by_layer"].get(u, {}).get("ms", 0.0) for u in units}
        self.int8_ms = {u: self.prof_int8["by_layer"].get(u, {}).get("ms", 0.0) for u in units}
        self.numel = _numel(prepared, batch)
        self.borders = boundary_tensors(prepared, units)
        self.ms_per_element = _transition_rate(self.prof_int8, self.all_int8, prepared, batch)
        self.chosen: set[str] = set()
        self.steps: list[dict[str, Any]] = []
        self.latency_check = None
        self.sensitivity: dict[str, float] = {}
        self.score = self.ref = float("nan")

    def _measure_ort(self, all_int8, candidate, excluded) -> tuple[dict[str, Any], dict[str, Any], str]:
        from eval.latency import measure_interleaved

        lat = measure_interleaved({"int8_all": all_int8, "plan": candidate}, threads=self.threads,
                                  batch=self.batch, rounds=5, round_time_s=0.1)
        return lat["int8_all"], lat["plan"], "ort-x86"

    def profile(self, model) -> dict[str, Any]:
        return profile_onnx(model, threads=self.threads, batch=self.batch, runs=self.config.profile_runs, warmup=5)

    def excluded(self, sel: set[str]) -> list[str]:
        return [n for u in sorted(sel) for n in self.units[u].nodes]

    def transition(self, u: str) -> float:
        return transition_ms(u, self.chosen, self.borders, self.numel, self.ms_per_element)

    def latency_pass(self) -> None:
        """Units the profile says are faster in fp32 go there; the plan is then measured against all-int8 and
        dropped when it is not faster."""
        self.chosen, self.steps = greedy_latency_plan(self.units, self.fp32_ms, self.int8_ms, self.borders,
                                                      self.numel, self.ms_per_element, self.config.min_gain_ms,
                                                      self.max_convs)
        if not self.chosen:
            return
        candidate = self.build(self.excluded(self.chosen))
        lat_all, lat_plan, runtime = self.measure(self.all_int8, candidate, self.excluded(self.chosen))
        self.latency_check = {**measured_gain(lat_all, lat_plan), "measured_on": runtime}
        if self.latency_check["kept"]:
            self.prof_plan = self.profile(candidate)
        else:
            self.chosen = set()
            self.steps = [{**st, "reverted": "measured plan not faster beyond the round-to-round spread"}
                          for st in self.steps]

    def failed(self) -> bool:
        return _failed(self.score, self.ref, self.metric, self.config.tolerable_loss, self.min_sqnr_db)

    def accuracy_pass(self) -> None:
        """While the plan loses too much, move the unit with the best error reduction per ms it costs."""
        fp32_logits = self.predict(self.prepared)
        self.ref = _score(fp32_logits, fp32_logits, self.labels, self.metric) if self.metric != "sqnr" else float("inf")
        model = self.build(self.excluded(self.chosen)) if self.chosen else self.all_int8
        logits = self.predict(model)
        self.score = _score(logits, fp32_logits, self.labels, self.metric)
        if not self.failed():
            return
        base_err = float(((logits - fp32_logits) ** 2).mean())
        for u in self.units:
            if u not in self.chosen:
                err = float(((self.predict(self.build(self.excluded(self.chosen | {u}))) - fp32_logits) ** 2).mean())
                self.sensitivity[u] = (base_err - err) / max(base_err, 1e-30)  # share of the logit error it removes

        def cost(u: str) -> float:
            return max(self.fp32_ms[u] + self.transition(u) - self.int8_ms[u], 1e-3)

        while self.failed():
            used = sum(self.units[c].convs for c in self.chosen)
            cands = [u for u in self.units if u not in self.chosen and self.sensitivity.get(u, 0.0) > 0
                     and used + self.units[u].convs <= self.max_convs]
            if not cands:
                break
            best = max(cands, key=lambda u: self.sensitivity[u] / cost(u))
            self.chosen.add(best)
            model = self.build(self.excluded(self.chosen))
            self.score = _score(self.predict(model), fp32_logits, self.labels, self.metric)
            self.steps.append({"unit": best, "reason": "accuracy", "sensitivity": round(self.sensitivity[best], 4),
                               "latency_cost_ms": round(cost(best), 4), "score_after": round(self.score, 5)})
        if any(st["reason"] == "accuracy" for st in self.steps):
            self.prof_plan = self.profile(model)

    def report(self) -> dict[str, Any]:
        table = {}
        for u, unit in self.units.items():
            table[u] = {"precision": "fp32" if u in self.chosen else "int8", "fp32_ms": round(self.fp32_ms[u], 4),
                        "int8_ms": round(self.int8_ms[u], 4), "convs": unit.convs,
                        "border_tensors": len(self.borders[u])}
            if u in self.sensitivity:
                table[u]["sensitivity"] = round(self.sensitivity[u], 4)
        return {
            "enabled": True, "metric": self.metric, "threads": self.threads, "batch": self.batch,
            "tolerable_loss": self.config.tolerable_loss,
            "reference_score": None if self.metric == "sqnr" else round(self.ref, 5), "score": round(self.score, 5),
            "meets_tolerance": not self.failed(), "transition_ms_per_element": self.ms_per_element,
            "fp32_units": sorted(self.chosen), "steps": self.steps, "latency_check": self.latency_check,
            "fp32_convs": sum(self.units[u].convs for u in self.chosen), "convs": self.n_convs,
            "profiled_kernel_ms": {"fp32": self.prof_fp32["kernel_ms"], "int8_all": self.prof_int8["kernel_ms"],
                                   "plan": self.prof_plan["kernel_ms"]},
            "units": table,
        }


def measured_gain(all_int8: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
    """Whether an interleaved measurement shows ``candidate`` faster than ``all_int8``: the gain in medians must
    exceed the measurement's own noise, the larger round-to-round range (max - min of the round medians) of the
    two.  A gain inside that range is not evidence of anything."""
    gain = all_int8["median"] - candidate["median"]
    noise = max(max(m["round_medians"]) - min(m["round_medians"]) for m in (all_int8, candidate))
    return {"int8_all_ms": all_int8["median"], "plan_ms": candidate["median"], "gain_ms": round(gain, 6),
            "round_spread_ms": round(noise, 6), "kept": bool(gain > noise)}


def _failed(score: float, ref: float, metric: str, tolerable: float, min_sqnr_db: float) -> bool:
    if metric == "sqnr":
        return score < min_sqnr_db
    return ref - score > tolerable + 1e-12


def _transition_rate(prof_int8: dict[str, Any], int8: onnx.ModelProto, prepared: onnx.ModelProto, batch: int
                     ) -> float:
    """ms per element of one fp32 <-> int8 transition: the int8 model's QuantizeLinear of the graph input
    (measured) per input element, doubled for the layout reorder that comes with it."""
    graph_inputs = {i.name for i in int8.graph.input}
    names = {n.name for n in int8.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in graph_inputs}
    q = [r for r in prof_int8["by_node"] if r["op_type"] == "QuantizeLinear" and r["node"] in names]
    inp = prepared.graph.input[0].type.tensor_type.shape.dim
    n_in = int(np.prod([d.dim_value if d.dim_value > 0 else batch for d in inp])) if inp else 0
    if not q or n_in == 0:
        return 2e-7  # ~0.2 ns per element: a vectorized quantize on one x86 core
    return 2 * q[0]["ms"] / n_in


def plan_for_recipe(prepared_path: str | os.PathLike, ranges, recipe, source, workdir: str | os.PathLike,
                    cpu: dict[str, Any] | None = None, threads: int = 1, batch: int = 1,
                    measure: Callable | None = None) -> MixedPlan:
    """:func:`plan` with the recipe's quantizer and calibration ``ranges``, on ``recipe.mixed_precision.eval_size``
    TRAIN images disjoint from the calibration images (:class:`calibration.subsets.Holdout`; fewer when the
    split has fewer to spare)."""
    cfg = recipe.mixed_precision
    prepared = onnx.load(str(prepared_path))
    # a small dataset (synthetic: 256 train images) gets a smaller holdout rather than an error
    spare = len(source.split(CALIBRATION_SPLIT)) - recipe.calibration.size
    if spare < 10:
        raise UserError(f"mixed precision needs at least 10 train images besides the {recipe.calibration.size} "
                        f"calibration images; use a smaller --calibration-size")
    holdout = Holdout(source, recipe.calibration.size, min(cfg.eval_size, spare), recipe.calibration.seed)
    cache: dict[tuple[str, ...], onnx.ModelProto] = {}

    def build(extra: Sequence[str]) -> onnx.ModelProto:
        key = tuple(sorted(extra))
        if key not in cache:
            cache.clear()  # keep one model: Large@224 int8 graphs are tens of MB
            cache[key] = quantize_prepared(prepared_path, ranges, recipe, workdir, extra_excluded=key, cpu=cpu).model
        return cache[key]

    def predict(model: onnx.ModelProto) -> np.ndarray:
        return holdout_logits(model, holdout)[0]

    labels = holdout_logits(prepared, holdout)[1] if source.has_labels else None
    excluded = set(resolve_excluded_nodes(prepared, recipe.quantize.nodes_to_exclude, recipe.quantize.quantize_head))
    base = [n.name for n in prepared.graph.node if n.name in excluded]
    result = plan(prepared, build, predict, labels, cfg, threads=threads, batch=batch, base_excluded=base,
                  measure=measure)
    result.report["holdout"] = holdout.describe()
    return result


def render_plan(report: dict[str, Any]) -> str:
    """The plan as markdown: the decision, the measured totals and one row per unit (``mixed_precision.md``)."""
    if not report.get("units"):
        return "# Mixed-precision plan\n\nNo quantizable layers.\n"
    k = report["profiled_kernel_ms"]
    ref = report["reference_score"]
    lines = ["# Mixed-precision plan", "",
             f"fp32 units: {', '.join(report['fp32_units']) or '(none)'} ({report['fp32_convs']}/{report['convs']} "
             f"convs); {report['metric']} {report['score']:.4f}"
             + ("" if ref is None else f" vs float {ref:.4f}") + f" (tolerable loss {report['tolerable_loss']}, "
             f"{'met' if report['meets_tolerance'] else 'NOT met'}).",
             f"Profiled kernel time per run ({report['threads']} thread(s), batch {report['batch']}): float "
             f"{k['fp32']:.3f} ms, all int8 {k['int8_all']:.3f} ms, this plan {k['plan']:.3f} ms.", "",
             "| unit | precision | fp32 ms | int8 ms | convs | border tensors | sensitivity |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, u in report["units"].items():
        sens = u.get("sensitivity")
        lines.append(f"| {name} | {u['precision']} | {u['fp32_ms']:.4f} | {u['int8_ms']:.4f} | {u['convs']} | "
                     f"{u['border_tensors']} | {'' if sens is None else f'{sens:.3g}'} |")
    check = report.get("latency_check")
    if check:
        lines += ["", f"Latency check (interleaved): all int8 {check['int8_all_ms']:.4f} ms, plan {check['plan_ms']:.4f} "
                      f"ms, gain {check['gain_ms']:.4f} ms vs a round-to-round spread of {check['round_spread_ms']:.4f} "
                      f"ms: the latency moves were {'kept' if check['kept'] else 'reverted'}."]
    if report["steps"]:
        lines += ["", "Steps: " + "; ".join(f"{s['unit']} ({s['reason']}"
                                            + (f", reverted: {s['reverted']}" if "reverted" in s else "") + ")"
                                            for s in report["steps"])]
    return "\n".join(lines) + "\n"
