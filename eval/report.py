"""Run reports and comparisons: ``report.json`` + ``report.md`` per run, and ``compare DIR...`` across runs with
the trade-off picture drawn to ``pareto.png`` (:mod:`eval.tradeoff`).

A run report is ``{"variants": [{"name", "file", "is_reference", ...evaluate_onnx fields}, ...], ...extra}``;
"Δ vs float" and "speedup" are taken against the run's reference variant (``is_reference``), which is the
float model the run compressed.  A run may add a ``trajectory`` list (e.g. NetAdapt iterations) of points
with a latency (``latency_ms`` as a number or ``{"median": ...}``) and an accuracy (``top1`` or
``accuracy.top1``) measured on a holdout: compare draws it in a panel of its own, never on the test axis.

Latencies compare only when they were timed together: ``compare DIR...`` groups variants by their
measurement (the id :func:`eval.latency.interleave` gives them; a report without ids counts as one measurement
per run) and machine, and with more than one group it says so and draws one front per group, never one across
them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from compress.errors import UserError
from compress.io import ensure_dir, write_json, write_text
from eval.tradeoff import finite, holdout_panel, latency, latency_panel, pareto_front, plot_tradeoff, size_panel, top1

REPORT_JSON, REPORT_MD, PARETO_PNG = "report.json", "report.md", "pareto.png"
COLUMNS = ("variant", "top-1", "Δ vs float (pt)", "latency median ms (p90)", "speedup vs float", "size",
           "params", "MACs")


# -- field access ---------------------------------------------------------------------------------------

_finite, _top1, _latency = finite, top1, latency


def _p90(v: dict) -> float | None:
    lat = v.get("latency_ms")
    value = lat.get("p90") if isinstance(lat, dict) else None
    return float(value) if _finite(value) else None


def _reference(variants: Sequence[dict]) -> dict | None:
    refs = [v for v in variants if v.get("is_reference")]
    return refs[0] if refs else None


# -- formatting -----------------------------------------------------------------------------------------

def _si(n: Any, unit: str = "") -> str:
    if not _finite(n):
        return "–"
    for div, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:g}{' ' + unit if unit else ''}"


def _size(n: Any) -> str:
    if not _finite(n):
        return "–"
    for div, suffix in ((2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{int(n)} B"


def _row(v: dict, ref: dict | None) -> list[str]:
    top1, lat, p90 = _top1(v), _latency(v), _p90(v)
    rtop1, rlat = (_top1(ref), _latency(ref)) if ref is not None else (None, None)
    is_ref = ref is not None and v is ref
    if is_ref:
        delta, speed = "ref", "1.00×"
    else:
        delta = f"{100 * (top1 - rtop1):+.2f}" if top1 is not None and rtop1 is not None else "–"
        speed = f"{rlat / lat:.2f}×" if lat and rlat else "–"
    lat_text = "–" if lat is None else f"{lat:.3f}" + (f" ({p90:.3f})" if p90 is not None else "")
    return [str(v.get("name", "?")), "–" if top1 is None else f"{100 * top1:.2f} %", delta, lat_text, speed,
            _size(v.get("size_bytes")), _si(v.get("params")), _macs(v)]


def _macs(v: dict) -> str:
    """The network's MACs, with what the graph executes beside them when padding makes that more."""
    macs, run = v.get("macs"), v.get("macs_executed")
    return _si(macs) + (f" ({_si(run)} executed)" if _finite(run) and _finite(macs) and run != macs else "")


def _table(groups: Sequence[tuple[list[dict], dict | None]]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    for variants, ref in groups:
        for v in variants:
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _row(v, ref)) + " |")
    return lines


def _machines(variants: Sequence[dict]) -> list[str]:
    seen = []
    for v in variants:
        m = v.get("machine")
        if isinstance(m, dict):
            text = (f"{m.get('cpu')}, {m.get('cores')} cores, ISA {', '.join(m.get('isa') or []) or 'none'}, "
                    f"onnxruntime {m.get('onnxruntime')}, torch {m.get('torch')}")
            if text not in seen:
                seen.append(text)
    return seen


def _settings(variants: Sequence[dict]) -> list[str]:
    seen = []
    for v in variants:
        lat = v.get("latency_ms")
        if isinstance(lat, dict):
            text = f"{lat.get('threads')} thread(s), batch {lat.get('batch')}"
            if text not in seen:
                seen.append(text)
    return seen


def _markdown(title: str, groups: Sequence[tuple[list[dict], dict | None]], notes: Sequence[str] = ()) -> str:
    variants = [v for vs, _ in groups for v in vs]
    lines = [f"# {title}", ""] + _table(groups) + [""]
    settings = _settings(variants)
    if settings:
        lines.append(f"Latency: median (p90) of one forward pass, {'; '.join(settings)}; "
                     "speedup = float median / variant median.")
    machines = _machines(variants)
    if len(machines) == 1:
        lines.append(f"Machine: {machines[0]}.")
    elif machines:
        lines.append("**Warning: latencies were measured on different machines and are not comparable:**")
        lines += [f"- {m}" for m in machines]
    lines += list(notes)
    return "\n".join(lines).rstrip() + "\n"


# -- run reports ----------------------------------------------------------------------------------------

def run_header(command: str, recipe, spec, weights, model_source: str, input_size, dataset: dict) -> dict:
    """The keys every command's report starts with: title, command, recipe, the model it started from and the
    data's identity (``dataset``: ``{"name", "fingerprint"}``)."""
    return {
        "title": f"{command} --recipe {recipe.name}: {spec.arch} @ {input_size[0]}x{input_size[1]} on "
                 f"{dataset['name']}",
        "command": command,
        "recipe": {"name": recipe.name, "source": recipe.source, "file": "recipe.toml"},
        "model": {"arch": spec.arch, "weights": str(weights) if weights else "default", "source": model_source,
                  "input_size": list(input_size), "dataset": dataset["name"],
                  "dataset_fingerprint": dataset["fingerprint"]},
    }


def write_run_report(out_dir: str | os.PathLike, variants: list[dict], extra: dict | None = None,
                     notes: Sequence[str] = ()) -> tuple[Path, Path]:
    """Write ``out_dir/report.json`` (``{"variants": variants, **extra}``) and ``out_dir/report.md`` (the table,
    then the markdown lines ``notes``).

    Each variant is ``{"name", "file", "is_reference", ...evaluate_onnx fields}``; the reference (float)
    variant is the baseline of "Δ vs float" and "speedup"."""
    out = ensure_dir(out_dir)
    extra = dict(extra or {})
    if "variants" in extra:
        raise ValueError("extra must not contain 'variants'")
    for v in variants:
        if "name" not in v:
            raise ValueError(f"every variant needs a name, got keys {sorted(v)}")
    json_path = write_json(out / REPORT_JSON, {"variants": list(variants), **extra})
    title = str(extra.get("title") or f"Run {out.resolve().name}")
    md_path = write_text(out / REPORT_MD, _markdown(title, [(list(variants), _reference(variants))], notes))
    return json_path, md_path


def load_run_report(run_dir: str | os.PathLike) -> dict:
    """``run_dir/report.json`` (or the file itself), checked to list its variants."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / REPORT_JSON
    if not path.is_file():
        raise UserError(f"no run report at {path} (every run writes report.json listing its variants)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read run report {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("variants"), list):
        raise UserError(f"run report {path} has no 'variants' list")
    for v in data["variants"]:
        if not isinstance(v, dict) or "name" not in v:
            raise UserError(f"run report {path} has a variant without a name")
    return data


def _run_names(dirs: Sequence[str | os.PathLike]) -> list[str]:
    names = [Path(d).resolve().name if Path(d).is_dir() else Path(d).resolve().parent.name for d in dirs]
    counts: dict[str, int] = {}
    out = []
    for n in names:
        counts[n] = counts.get(n, 0) + 1
        out.append(n if names.count(n) == 1 else f"{n}#{counts[n]}")
    return out


def _machine_text(v: dict) -> str | None:
    m = v.get("machine")
    return _machines([v])[0] if isinstance(m, dict) else None


def latency_groups(variants: Sequence[dict]) -> list[dict[str, Any]]:
    """The variants that have a latency, grouped by what timed them together: their measurement id (a report
    without ids: its run) and their machine.  Each group: ``label``, ``measurement``, ``run``, ``machine``,
    ``variants`` (names) and ``pareto_front`` (names, within the group)."""
    groups: dict[tuple, dict[str, Any]] = {}
    for v in variants:
        if _latency(v) is None:
            continue
        mid = v["latency_ms"].get("measurement") if isinstance(v["latency_ms"], dict) else None
        key = (mid or f"run:{v.get('run')}", _machine_text(v))
        g = groups.setdefault(key, {"measurement": mid, "run": v.get("run"), "runtime": v.get("runtime"),
                                    "machine": key[1], "variants": []})
        g["variants"].append(v["name"])
    per_run = [(g["run"], g["runtime"]) for g in groups.values()]
    by_name = {v["name"]: v for v in variants}
    for g in groups.values():
        g["label"] = str(g["run"]) + (f" {g['runtime']}" if g["runtime"] else "")
        if per_run.count((g["run"], g["runtime"])) > 1 and g["measurement"]:
            g["label"] += f" [{g['measurement']}]"
        members = [by_name[n] for n in g["variants"]]
        g["pareto_front"] = [members[i]["name"] for i in pareto_front([(_latency(m), _top1(m)) for m in members])]
    return list(groups.values())


def _comparison_notes(groups: list[dict[str, Any]], trajectories: dict) -> tuple[list[str], list[str]]:
    """report.md's lines after the table, and the warnings (also for the command line)."""
    warnings = []
    if len(groups) > 1:
        machines = {g["machine"] for g in groups}
        why = "on different machines" if len(machines) > 1 else "in separate runs"
        warnings.append(f"latencies come from {len(groups)} separate measurements (timed {why}: "
                        f"{', '.join(g['label'] for g in groups)}); they do not compare across measurements, so "
                        f"each has its own Pareto front and none is drawn across them")
        notes = ["", f"**Warning: {warnings[0]}.** To time variants together, use `mnv3-compress compare --recipes "
                     f"...`.", ""]
        notes += [f"- Pareto front within {g['label']}: {', '.join(g['pareto_front']) or 'none'}." for g in groups]
    else:
        front = groups[0]["pareto_front"] if groups else []
        notes = ["", f"Pareto front (accuracy vs latency): {', '.join(front) or 'none'}."]
    if trajectories:
        notes += ["", f"NetAdapt trajectories ({', '.join(trajectories)}) score on held-out TRAIN images: they are "
                      f"drawn in their own holdout panel, never on the test-accuracy axis."]
    return notes + ["", f"![accuracy vs latency and size]({PARETO_PNG})"], warnings


def compare_runs(dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> dict:
    """Gather the variants of the runs in ``dirs`` into ``out_dir``: report.json, report.md and pareto.png.

    Variants are named ``RUN/VARIANT``; "Δ vs float" and "speedup" use each run's own reference.  Latencies are
    grouped by measurement (:func:`latency_groups`): with more than one group, the report warns and each group
    gets its own front and panel.  Returns the written report (``variants``, ``runs``, ``latency_groups``,
    ``pareto_front`` names - None when there is more than one group -, ``warnings``, ``plot``, ``files``)."""
    if not dirs:
        raise UserError("compare needs at least one run directory")
    loaded = [(d, run, load_run_report(d)) for d, run in zip(dirs, _run_names(dirs))]  # fail before writing
    out = ensure_dir(out_dir)
    groups, trajectories, all_variants, runs = [], {}, [], []
    for d, run, data in loaded:
        base = Path(d) if Path(d).is_dir() else Path(d).parent
        variants = []
        for v in data["variants"]:
            on = f"@{v['runtime']}" if v.get("runtime") not in (None, "ort-x86") else ""  # a comparison's rows
            v = dict(v, name=f"{run}/{v['name']}{on}", run=run)
            if "machine" not in v and isinstance(data.get("machine"), dict):  # a comparison records it once
                v["machine"] = data["machine"]
            if isinstance(v.get("file"), str):
                v["file"] = os.path.relpath((base / v["file"]).resolve(), out.resolve())
            variants.append(v)
        groups.append((variants, _reference(variants)))
        all_variants += variants
        runs.append({"name": run, "dir": os.path.relpath(base.resolve(), out.resolve())})
        if data.get("trajectory"):
            trajectories[run] = data["trajectory"]
    measured = latency_groups(all_variants)
    largest = max((v.get("size_bytes") or 0 for v in all_variants if finite(v.get("size_bytes"))), default=0)
    by_name = {v["name"]: v for v in all_variants}
    panels = ([latency_panel("Accuracy vs measured latency", all_variants, largest=largest)] if len(measured) <= 1
              else [latency_panel(f"{g['label']}: one measurement", [by_name[n] for n in g["variants"]],
                                  largest=largest, note="not comparable with the other latency panels")
                    for g in measured])
    panels.append(size_panel(all_variants, largest=largest))
    if trajectories:
        panels.append(holdout_panel(trajectories))
    plot_tradeoff(out / PARETO_PNG, panels)
    notes, warnings = _comparison_notes(measured, trajectories)
    md = _markdown("Comparison of " + ", ".join(r["name"] for r in runs), groups, notes)
    write_text(out / REPORT_MD, md)
    report = {"variants": all_variants, "runs": runs, "latency_groups": measured,
              "pareto_front": measured[0]["pareto_front"] if len(measured) == 1 else [] if not measured else None,
              "warnings": warnings, "plot": {"file": PARETO_PNG, "panels": panels},
              "files": {"json": REPORT_JSON, "markdown": REPORT_MD, "plot": PARETO_PNG}}
    write_json(out / REPORT_JSON, report)
    return report
