"""``compare --recipes``: the comparison's ``report.json``, ``report.md``, ``report.html`` and ``pareto.png``, from
the numbers :mod:`compress.compare.pipeline` measured (one interleaved measurement per runtime, one test split).

The report (``report.json``) holds ``variants`` (one row per artifact and runtime: accuracy, agreement with the
float model, latency with its measurement id, size, params, MACs), ``measurements`` (per runtime: id, rounds,
settings, when), ``runs`` (each recipe's sub-run: ran or reused, how long), ``stages``, ``machine``,
``wall_s``, ``pareto_fronts`` (per runtime), ``size_front`` and ``plot`` (the panels drawn, as data).  The
markdown and HTML pages show the same numbers.
"""
from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any, Sequence

from compress.io import ensure_dir, write_json, write_text
from eval.report import PARETO_PNG, REPORT_JSON, REPORT_MD, _macs, _machines, _si, _size
from eval.tradeoff import holdout_panel, latency, latency_panel, latency_range, plot_tradeoff, size_panel, top1

__all__ = ["write_comparison", "comparison_panels", "table_rows", "markdown_table", "render_markdown", "render_html",
           "COLUMNS", "REPORT_HTML"]

REPORT_HTML = "report.html"
COLUMNS = ("variant", "runtime", "precision", "test top-1", "Δ vs float (pt)", "same top-1 as float",
           "latency median ms [fastest–slowest round]", "speedup vs the runtime's float", "size", "params", "MACs")


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "–"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 \
        else f"{seconds:.1f}s"


def comparison_panels(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One accuracy-vs-latency panel per runtime measured (its variants, timed together), accuracy vs size of the
    ort-x86 artifacts, and the NetAdapt searches' holdout panel when there are any."""
    variants = report["variants"]
    largest = max((v.get("size_bytes") or 0 for v in variants), default=0)
    images = report["evaluation"]["images"]
    panels = []
    for runtime, m in report["measurements"].items():
        panel = latency_panel(f"{runtime}: accuracy vs latency", [v for v in variants if v["runtime"] == runtime],
                              images, largest, note=f"one interleaved measurement ({m['id']}, {m['rounds']} rounds, "
                                                    f"{m['threads']} thread(s))")
        panels.append({**panel, "runtime": runtime})
    panels.append(size_panel([v for v in variants if v["runtime"] == "ort-x86"], images, largest))
    panels[-1]["title"] = "Accuracy vs model size (ort-x86 artifacts)"
    if report.get("trajectories"):
        panels.append(holdout_panel(report["trajectories"]))
    return panels


def table_rows(variants: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The table's cells: Δ and agreement against the float model (ort-x86 ``fp32``), speedup against the float
    model in the variant's own runtime."""
    floats = {v["runtime"]: v for v in variants if v["is_float_reference"] and v["precision"] == "fp32"}
    ref = floats.get("ort-x86")
    ref_top1 = top1(ref) if ref else None
    rows = []
    for v in variants:
        acc, lat = top1(v), latency(v)
        own = floats.get(v["runtime"])
        rng = latency_range(v)
        if lat is None:
            lat_text = v.get("latency_note") or "–"
        else:
            lat_text = f"{lat:.3f}" + (f" [{rng[0]:.3f}–{rng[1]:.3f}]" if rng else "")
        own_lat = latency(own) if own else None
        speed = "ref" if v is own else f"{own_lat / lat:.2f}×" if lat and own_lat else "–"
        delta = "ref" if v is ref else f"{100 * (acc - ref_top1):+.2f}" if acc is not None and ref_top1 is not None \
            else "–"
        agree = v.get("agreement")
        vs = v.get("agreement_vs") or "fp32"
        name = v["name"] + (f" (= {', '.join(v['same_as'])})" if v.get("same_as") else "")
        rows.append([name, v["runtime"], v["precision"], "–" if acc is None else f"{100 * acc:.2f} %", delta,
                     "ref" if v is ref else "–" if agree is None else f"{100 * agree:.2f} %"
                     + ("" if vs == "fp32" else f" (vs {vs})"), lat_text, speed,
                     _size(v.get("size_bytes")), _si(v.get("params")), _macs(v)])
    return rows


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], right_from: int = 1) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < right_from else "---:" for i in range(len(header))) + "|"]
    return lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]


def _runs_rows(report: dict[str, Any]) -> list[list[str]]:
    return [[r["recipe"], r["command"], r["status"] + (f" ({r['finished_at']})" if r["status"] == "reused" and
                                                        r.get("finished_at") else ""),
             _duration(r.get("seconds")) + (" (when it ran)" if r["status"] == "reused" else ""), f"`{r['dir']}`"]
            for r in report["runs"]]


def _text(report: dict[str, Any]) -> dict[str, list[str]]:
    """The prose around the table, as markdown lines per section (the HTML page shows the same lines)."""
    ev, runs = report["evaluation"], report["runs"]
    ran = [r["recipe"] for r in runs if r["status"] == "ran"]
    reused = [r["recipe"] for r in runs if r["status"] == "reused"]
    intro = [f"`{report['command_line']}`: wall time {_duration(report['wall_s'])}; sub-runs ran: "
             f"{', '.join(ran) or 'none'}; reused: {', '.join(reused) or 'none'}."]
    about = [f"Accuracy: top-1 on the first {ev['images']} test images of {ev['dataset']} (fingerprint "
             f"{ev['fingerprint']}), the same images for every variant; Δ against the float model (`fp32`, ort-x86); "
             f"\"same top-1 as float\": the share of those images on which the variant predicts what it predicts (an "
             f"int8 step of a pruned network: what that network predicts, marked \"vs\").",
             "", "Latency: one interleaved measurement per runtime (rounds in rotating order, so the machine's "
                 "drift hits every variant alike), never one across runtimes; speedup = the runtime's own float "
                 "median / the variant's median:"]
    for rt, m in report["measurements"].items():
        about.append(f"- {rt}: measurement `{m['id']}`, {len(m['variants'])} variants, {m['rounds']} rounds, "
                     f"{m['threads']} thread(s), batch {m['batch']}, measured {m['measured_at']}"
                     + (" (reused: the same artifacts were measured by an earlier compare; `--remeasure` times "
                        "them again)" if m.get("reused") else ""))
    unmeasured = sorted({v["runtime"] for v in report["variants"] if v.get("latency_note")})
    if unmeasured:
        about.append(f"- {', '.join(unmeasured)}: accuracy only (latency needs that target's CPU; never estimated).")
    fronts = ["Pareto front (accuracy vs latency), per runtime:"]
    fronts += [f"- {rt}: {', '.join(f) or 'none'}" for rt, f in report["pareto_fronts"].items()]
    fronts += ["", f"Pareto front (accuracy vs size, ort-x86): {', '.join(report['size_front']) or 'none'}.", "",
               "Marker area is proportional to the model's size; bars: latency from the fastest to the slowest "
               "round, top-1 a 95 % binomial interval over the test images."]
    notes = list(report.get("notes") or [])
    if report.get("trajectories"):
        notes.append(f"NetAdapt searches ({', '.join(report['trajectories'])}) score proposals on held-out TRAIN "
                     f"images: their trajectories are drawn in a panel of their own (holdout top-1, the search's "
                     f"own latencies), never on the test-accuracy axis.")
    machine = _machines([{"machine": report["machine"]}])
    return {"intro": intro, "about": about, "fronts": fronts, "notes": notes,
            "machine": [f"Machine: {machine[0]}." if machine else "Machine: unknown."]}


def markdown_table(report: dict[str, Any]) -> str:
    """The variants table alone (what the command prints when it is done)."""
    return "\n".join(_md_table(COLUMNS, table_rows(report["variants"]), 3))


def render_markdown(report: dict[str, Any]) -> str:
    t = _text(report)
    lines = [f"# {report['title']}", ""] + t["intro"] + [""] + _md_table(COLUMNS, table_rows(report["variants"]), 3)
    lines += [""] + t["about"] + [""] + t["fronts"] + ["", f"![accuracy vs latency per runtime, and vs size]"
                                                         f"({PARETO_PNG})", ""]
    lines += [f"- {n}" for n in t["notes"]] + ([""] if t["notes"] else [])
    lines += ["## What was run", ""] + _md_table(("recipe", "command", "status", "time", "directory"),
                                                  _runs_rows(report), 3)
    lines += ["", "## Stages", ""] + _md_table(("stage", "what", "time"),
                                               [[s["stage"], s["what"], _duration(s["seconds"])]
                                                for s in report["stages"]], 2)
    lines += ["", f"Wall time: {_duration(report['wall_s'])}.", "", *t["machine"]]
    return "\n".join(lines) + "\n"


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _inline(text: str) -> str:
    """Escaped text with the markdown's `code` and **bold** as HTML."""
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def _html_lines(lines: Sequence[str]) -> str:
    out, items = [], []
    for line in list(lines) + [""]:
        if line.startswith("- "):
            items.append(f"<li>{_inline(line[2:])}</li>")
            continue
        if items:
            out.append("<ul>" + "".join(items) + "</ul>")
            items = []
        if line:
            out.append(f"<p>{_inline(line)}</p>")
    return "\n".join(out)


def render_html(report: dict[str, Any]) -> str:
    t = _text(report)
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;font-size:14px}table{border-collapse:"
             "collapse}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child,th:first-child"
             "{text-align:left}img{max-width:100%}")
    stages = [[s["stage"], s["what"], _duration(s["seconds"])] for s in report["stages"]]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(report['title'])}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(report['title'])}</h1>\n{_html_lines(t['intro'])}\n"
            f"{_html_table(COLUMNS, table_rows(report['variants']))}\n{_html_lines(t['about'])}\n"
            f"<img src='{PARETO_PNG}' alt='accuracy vs latency per runtime, and vs size'>\n{_html_lines(t['fronts'])}"
            f"\n{_html_lines(['- ' + n for n in t['notes']])}\n<h2>What was run</h2>"
            f"{_html_table(('recipe', 'command', 'status', 'time', 'directory'), _runs_rows(report))}"
            f"<h2>Stages</h2>{_html_table(('stage', 'what', 'time'), stages)}"
            f"<p>Wall time: {_duration(report['wall_s'])}.</p>{_html_lines(t['machine'])}</body></html>\n")


def write_comparison(out_dir: str | Path, report: dict[str, Any]) -> dict[str, Any]:
    """Add the fronts and the panels to ``report``, draw ``pareto.png`` and write report.md, report.html and
    report.json (each atomically, the JSON last).  Returns the report as written."""
    out = ensure_dir(out_dir)
    panels = comparison_panels(report)
    report["pareto_fronts"] = {p["runtime"]: p["front"] for p in panels if p["kind"] == "latency"}
    report["size_front"] = next(p["front"] for p in panels if p["kind"] == "size")
    report["plot"] = {"file": PARETO_PNG, "panels": panels}
    report["files"] = {"json": REPORT_JSON, "markdown": REPORT_MD, "html": REPORT_HTML, "plot": PARETO_PNG}
    plot_tradeoff(out / PARETO_PNG, panels, report["title"])
    write_text(out / REPORT_MD, render_markdown(report))
    write_text(out / REPORT_HTML, render_html(report))
    write_json(out / REPORT_JSON, report)
    return report
