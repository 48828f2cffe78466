"""Where an ONNX model spends its time: onnxruntime's own profiler, aggregated per op type, per node and per layer.

:func:`profile_onnx` runs a model on a fresh CPU session (the same settings as ``eval.latency.make_session``)
with ``enable_profiling``, drops the warm-up runs and averages every kernel's time over the timed runs.  The
names it reports are the kernels ORT actually ran after its graph optimizations: QDQ groups appear as
``QLinearConv`` / ``QLinearAdd`` / ``QLinearMul``, fused float convs as ``Conv`` (``FusedConv`` / NCHWc), layout
changes as ``Transpose`` / ``ReorderInput`` / ``ReorderOutput``, and a leftover float island as
``QuantizeLinear`` / ``DequantizeLinear`` plus float ops.

Layers: a node's layer is its torch module path (``/features/features.4/block/block.1/block.1.0/Conv`` ->
``features.4.block.1``; the SE module ``features.4.block.2`` holds its pool, fcs, gate and multiply; a residual
``/features/features.4/Add`` is ``features.4``), so the fp32 and int8 profiles of one network line up
(:func:`compare_profiles`) although ORT fuses and renames nodes differently in each.

Profiling adds a small per-kernel overhead; the profile's ``run_ms`` is for finding where time goes, not for
headline latency (``eval.latency.measure_interleaved`` is).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections import defaultdict
from typing import Any, Mapping

import numpy as np

from compress.errors import UserError
from eval.model_info import ModelLike, load_model, model_bytes

__all__ = ["profile_onnx", "layer_of", "compare_profiles", "render_profile", "render_comparison"]

_TOKEN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.\d+)+$")
_ORT_SUFFIX = re.compile(r"(_token_\d+|_output_\d+|_nchwc|_kernel_time|_quant|_QuantizeLinear|_DequantizeLinear)+$")


def layer_of(node_name: str) -> str:
    """The torch module path a node belongs to (see the module docstring); ``(graph)`` for ORT-made nodes
    without a module path (layout reorders, the input QuantizeLinear)."""
    parts = [p for p in _ORT_SUFFIX.sub("", node_name).split("/") if p][:-1]  # the last component is the op
    out: list[str] = []
    for p in parts:
        # keep indexed module names; a child of the previous one (features.0 -> features.0.0, block.1 ->
        # block.1.0: a Conv2dNormActivation's conv / bn / activation) stays in its parent's layer
        if _TOKEN.match(p) and not (out and p.startswith(out[-1] + ".")):
            out.append(p)
    return ".".join(out) or "(graph)"


def profile_onnx(model: ModelLike, threads: int = 1, batch: int = 1, runs: int = 50, warmup: int = 10,
                 top: int | None = None) -> dict[str, Any]:
    """Profile ``model`` with onnxruntime's profiler: ``runs`` timed runs after ``warmup`` runs, batch ``batch``,
    ``threads`` intra-op threads.

    Returns ``{run_ms, kernel_ms, runs, threads, batch, by_op_type, by_node, by_layer}`` where ``run_ms`` is
    the median profiled run (ms), ``kernel_ms`` the sum of the kernels' median times per run, ``by_op_type`` maps
    op type -> ``{ms, nodes, share}`` (ms per run, share of ``kernel_ms``), ``by_node`` is a list of
    ``{node, op_type, layer, ms, share}`` (sorted by time, ``top`` longest when given) and ``by_layer`` maps
    layer -> ``{ms, share, ops}``.
    """
    import onnxruntime as ort

    from eval.latency import random_input

    if runs < 1 or warmup < 0 or threads < 1 or batch < 1:
        raise UserError(f"profile needs runs >= 1, warmup >= 0, threads >= 1, batch >= 1 "
                        f"(got runs={runs}, warmup={warmup}, threads={threads}, batch={batch})")
    proto = load_model(model)
    feed = random_input(proto, batch)
    with tempfile.TemporaryDirectory(prefix="mnv3-profile.") as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "ort")
        try:
            sess = ort.InferenceSession(model_bytes(proto), so, providers=["CPUExecutionProvider"])
        except Exception as e:
            text = str(e).strip().splitlines()
            raise UserError(f"onnxruntime cannot load the model: {text[0] if text else type(e).__name__}") from None
        for _ in range(warmup + runs):
            sess.run(None, feed)
        path = sess.end_profiling()
        with open(path, encoding="utf-8") as f:
            events = json.load(f)
    return summarize_events(events, warmup=warmup, runs=runs, threads=threads, batch=batch, top=top)


def summarize_events(events: list[dict[str, Any]], warmup: int, runs: int, threads: int = 1, batch: int = 1,
                     top: int | None = None) -> dict[str, Any]:
    """Aggregate ORT profiler events (the JSON list ``end_profiling`` writes) over the runs after ``warmup``."""
    model_runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    timed = model_runs[warmup:warmup + runs]
    if not timed:
        raise UserError("the profile holds no timed runs")
    start = timed[0]["ts"]
    kernels = [e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")
               and e["ts"] >= start]
    n = len(timed)
    # each kernel's time per run (a node runs once per run); the median over runs resists a neighbour's
    # process stealing the core for part of one run
    bounds = [e["ts"] for e in timed[1:]] + [float("inf")]
    per_node: dict[str, dict[str, Any]] = {}
    for e in kernels:
        name = e["name"][: -len("_kernel_time")]
        rec = per_node.setdefault(name, {"node": name, "op_type": e.get("args", {}).get("op_name", "?"),
                                         "layer": layer_of(name), "us": np.zeros(n)})
        rec["us"][int(np.searchsorted(bounds, e["ts"], side="right"))] += float(e["dur"])
    by_node = []
    for r in per_node.values():
        us = r.pop("us")
        by_node.append({**r, "ms": float(np.median(us)) / 1e3})
    total_us = sum(r["ms"] for r in by_node) * 1e3
    for r in by_node:
        r["share"] = round(r["ms"] * 1e3 / max(total_us, 1e-9), 4)
        r["ms"] = round(r["ms"], 4)
    by_node.sort(key=lambda r: -r["ms"])
    by_op: dict[str, dict[str, Any]] = defaultdict(lambda: {"ms": 0.0, "nodes": 0})
    by_layer: dict[str, dict[str, Any]] = defaultdict(lambda: {"ms": 0.0, "ops": defaultdict(float)})
    for r in by_node:
        by_op[r["op_type"]]["ms"] += r["ms"]
        by_op[r["op_type"]]["nodes"] += 1
        by_layer[r["layer"]]["ms"] += r["ms"]
        by_layer[r["layer"]]["ops"][r["op_type"]] += r["ms"]
    kernel_ms = total_us / 1e3
    ops = {k: {"ms": round(v["ms"], 4), "nodes": v["nodes"], "share": round(v["ms"] / max(kernel_ms, 1e-9), 4)}
           for k, v in sorted(by_op.items(), key=lambda kv: -kv[1]["ms"])}
    layers = {k: {"ms": round(v["ms"], 4), "share": round(v["ms"] / max(kernel_ms, 1e-9), 4),
                  "ops": {o: round(t, 4) for o, t in sorted(v["ops"].items(), key=lambda kv: -kv[1])}}
              for k, v in by_layer.items()}
    return {"run_ms": round(float(np.median([e["dur"] for e in timed])) / 1e3, 4), "kernel_ms": round(kernel_ms, 4),
            "runs": n, "threads": threads, "batch": batch, "by_op_type": ops,
            "by_node": by_node[:top] if top else by_node, "by_layer": layers}


def compare_profiles(profiles: Mapping[str, Mapping[str, Any]], reference: str | None = None) -> dict[str, Any]:
    """Line up profiles of variants of one network (e.g. ``{"fp32": ..., "int8": ...}``) per op type and per
    layer; ``ratio`` columns are reference ms / variant ms (> 1: the variant is faster there)."""
    names = list(profiles)
    if not names:
        raise UserError("compare_profiles needs at least one profile")
    ref = reference or names[0]
    layers = sorted({k for p in profiles.values() for k in p["by_layer"]}, key=_layer_sort_key)
    ops = sorted({k for p in profiles.values() for k in p["by_op_type"]},
                 key=lambda k: -max(p["by_op_type"].get(k, {}).get("ms", 0.0) for p in profiles.values()))

    def ms(p: Mapping[str, Any], table: str, key: str) -> float:
        return float(p[table].get(key, {}).get("ms", 0.0))

    out_layers = []
    for k in layers:
        row: dict[str, Any] = {"layer": k}
        for n in names:
            row[n] = round(ms(profiles[n], "by_layer", k), 4)
        for n in names:
            if n != ref:
                row[f"ratio_{n}"] = round(row[ref] / row[n], 3) if row[n] > 0 else None
        out_layers.append(row)
    out_ops = [{"op_type": k, **{n: round(ms(profiles[n], "by_op_type", k), 4) for n in names}} for k in ops]
    totals = {n: {"run_ms": profiles[n]["run_ms"], "kernel_ms": profiles[n]["kernel_ms"]} for n in names}
    return {"reference": ref, "variants": names, "totals": totals, "by_op_type": out_ops, "by_layer": out_layers}


def _layer_sort_key(layer: str) -> tuple:
    return tuple((0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"[.]", layer))


def render_profile(prof: Mapping[str, Any], top: int = 15) -> str:
    """Markdown: totals, the op-type table, the ``top`` longest nodes."""
    lines = [f"profiled run {prof['run_ms']:.3f} ms (median of {prof['runs']}), kernels {prof['kernel_ms']:.3f} ms; "
             f"{prof['threads']} thread(s), batch {prof['batch']}", "",
             "| op type | ms/run | nodes | share |", "|---|---:|---:|---:|"]
    for k, v in prof["by_op_type"].items():
        lines.append(f"| {k} | {v['ms']:.3f} | {v['nodes']} | {100 * v['share']:.1f}% |")
    lines += ["", f"| top {top} nodes | op type | layer | ms/run | share |", "|---|---|---|---:|---:|"]
    for r in prof["by_node"][:top]:
        lines.append(f"| {r['node']} | {r['op_type']} | {r['layer']} | {r['ms']:.3f} | {100 * r['share']:.1f}% |")
    return "\n".join(lines) + "\n"


def render_comparison(cmp: Mapping[str, Any]) -> str:
    """Markdown: totals, op types and layers side by side (ms per run, ratio = reference / variant)."""
    names, ref = cmp["variants"], cmp["reference"]
    others = [n for n in names if n != ref]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines.append("| profiled run ms | " + " | ".join(f"{cmp['totals'][n]['run_ms']:.3f}" for n in names) + " |")
    lines.append("| kernel ms | " + " | ".join(f"{cmp['totals'][n]['kernel_ms']:.3f}" for n in names) + " |")
    lines += ["", "| op type | " + " | ".join(f"{n} ms" for n in names) + " |", "|---|" + "---:|" * len(names)]
    for r in cmp["by_op_type"]:
        lines.append(f"| {r['op_type']} | " + " | ".join(f"{r[n]:.3f}" for n in names) + " |")
    head = "| layer | " + " | ".join(f"{n} ms" for n in names) + "".join(f" | {ref}/{n}" for n in others) + " |"
    lines += ["", head, "|---|" + "---:|" * (len(names) + len(others))]
    for r in cmp["by_layer"]:
        ratios = "".join(" | " + ("-" if r[f"ratio_{n}"] is None else f"{r[f'ratio_{n}']:.2f}x") for n in others)
        lines.append(f"| {r['layer']} | " + " | ".join(f"{r[n]:.3f}" for n in names) + ratios + " |")
    return "\n".join(lines) + "\n"
