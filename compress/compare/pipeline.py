"""``mnv3-compress compare --recipes int8,int8-qat,netadapt,netadapt-int8 -o OUT``: one command, every variant,
one measured picture of the float / quantized trade-off.

1. resolve the start model and the data once (what every sub-run's request is keyed by);
2. run each recipe that is not finished into ``OUT/runs/<recipe>/`` (:mod:`compress.compare.plan` says which are
   finished, :data:`compress.compare.runs.RUNNERS` runs the others), reusing every finished one;
3. collect every variant, one row per distinct artifact and runtime (:func:`compress.compare.measure.collect`);
4. time every variant of a runtime in one interleaved run, per runtime
   (:func:`compress.compare.measure.measure_latencies`), and check that every accuracy is on the same test images
   (:func:`compress.compare.measure.check_accuracy`);
5. write ``report.json``, ``report.md``, ``report.html`` and ``pareto.png`` (:func:`eval.comparison.write_comparison`).

Each stage prints one line with its time, the time since the start and an estimate of what remains
(:mod:`compress.compare.progress`).  Interrupted, the same command resumes: finished sub-runs are kept, an
unfinished one runs again (QAT from its checkpoint).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from compress.compare import measure
from compress.compare.plan import Plan, SubRun, file_sha256, parse_recipes, plan_subruns
from compress.compare.progress import Progress, estimate_subrun_s, probe
from compress.compare.runs import RUNNERS, variants_of
from compress.errors import UserError
from compress.io import ensure_dir
from compress.targets.base import Target
from compress.targets.registry import TARGETS, parse_targets
from eval.comparison import write_comparison
from eval.model_info import machine_info

__all__ = ["compare_recipes", "installed_targets", "COMMANDS"]

# how each kind of sub-run reads in "What was run"
COMMANDS = {"quantize": "quantize --recipe {name}", "prune": "prune --recipe {name}",
            "int8-of": "quantize --recipe {name} (its int8 step) --weights runs/{base}/model.pt"}


def installed_targets() -> list[str]:
    """Every deploy target whose runtime is installed here (``ort-x86`` first)."""
    names = []
    for name, t in TARGETS.items():
        try:
            t.check_installed()
        except UserError:
            continue
        names.append(name)
    return names


def _model_digest(loaded) -> str:
    """The start model's identity: its architecture and every weight."""
    h = hashlib.sha256(json.dumps(loaded.spec.to_dict(), sort_keys=True).encode())
    for k, v in loaded.model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _resolve(weights, arch, dataset, input_size, progress, model_options):
    from compress.training.default_model import resolve_model

    loaded, source = resolve_model(weights, arch, dataset=dataset, input_size=input_size, progress=progress,
                                   **model_options)
    if not source.has_labels:
        raise UserError(f"compare measures accuracy: {source.name} has no labels (use fashion-mnist or "
                        f"imagefolder:PATH)")
    return loaded, source


def _estimates(subs: Sequence[SubRun], plan: Plan, loaded, source, runtimes: Sequence[Target]) -> dict[str, float]:
    """Expected seconds per stage, in stage order (see compress.compare.progress)."""
    todo = [s for s in subs if not plan.finished(s)]
    costs = probe(loaded.model, source.preprocess.input_size) if any(plan.previous_seconds(s.name) is None
                                                                     for s in todo) else None
    from compress.prune.channels import channel_groups

    groups = len(channel_groups(loaded.spec))
    n_train, n_test = len(source.split("train")), len(source.split("test"))
    est = {"model": 0.0}
    for s in subs:
        previous = plan.previous_seconds(s.name)
        est[f"run {s.name}"] = (0.5 if s not in todo else previous if previous is not None
                       else estimate_subrun_s(s, costs, n_train, n_test, groups))
    est["variants"] = 2.0
    cache = measure.Cache(plan.path.parent)
    rows = 2 + 2 * len(subs)
    for t in runtimes:  # nothing to run and a measurement on record: most likely reused (known after "variants")
        reuse = not todo and t.name in cache.latency
        est[f"latency {t.name}"] = 0.2 if reuse else rows * (measure.ROUNDS * measure.ROUND_TIME_S * 1.1 + 0.5)
    # the float networks in each other runtime's form are evaluated here (batch 1)
    est["accuracy"] = 0.5 if not todo and cache.accuracy else 2 * (len(runtimes) - 1) * n_test * 2e-3
    est["report"] = 2.0
    return est


def _run_subruns(subs: Sequence[SubRun], plan: Plan, options: dict[str, Any], prog: Progress) -> None:
    for s in subs:
        t = time.time()
        if s.kind == "int8-of":  # its request includes the pruned network it quantizes
            s.request["base_model"] = file_sha256(s.dir.parent / s.base / "model.pt")
        if plan.finished(s):
            s.status, s.seconds = "reused", plan.previous_seconds(s.name)
            prog.done(f"run {s.name}", f"reused (finished {plan.finished_at(s.name)})", t, "reused")
            continue
        plan.start(s)
        RUNNERS[s.kind](s, options)
        s.status, s.seconds = "ran", time.time() - t
        plan.finish(s, s.seconds)
        prog.done(f"run {s.name}", "ran", t, "ran")


def _trajectory(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"iteration": p.get("iteration"), "latency_ms": (p.get("latency_ms") or {}).get("median"),
             "top1": p.get("top1")} for p in report.get("trajectory") or []]


def compare_recipes(recipes: str | Sequence[str], output_dir: str | Path, weights: str | Path | None = None,
                    arch: str | None = None, dataset: str | None = None, input_size: int | None = None,
                    targets: str | None = None, limit_train: int | None = None, limit_test: int | None = None,
                    threads: int = 1, device: str = "auto", remeasure: bool = False, progress: bool = True,
                    log: Callable[[str], Any] = print, **model_options: Any) -> dict[str, Any]:
    """Run what is missing of ``recipes`` (comma-separated names or TOML paths) into ``output_dir``, measure every
    variant (latency: one interleaved run per runtime; accuracy: one test split) and write the report.

    ``targets``: the deploy targets (``"ort-x86,openvino"``; None: every one installed here).  ``weights``,
    ``arch``, ``dataset``, ``input_size``, ``model_options`` (``width_mult``, ``minimalistic``, ``num_classes``,
    ``train_default``, ``workers``), ``limit_test``, ``limit_train`` (recipes that train), ``threads`` (latency)
    and ``device`` (training) are passed to every sub-run as the commands take them.  ``remeasure``: time again
    even when the artifacts of a runtime were measured before.  Returns the report (``report.json``)."""
    from compress.training.distributed import launched_by_torchrun

    if launched_by_torchrun():
        raise UserError("compare runs its sub-runs one after another in one process: launch it without torchrun "
                        "(run a QAT or NetAdapt recipe under torchrun with quantize / prune, then compare DIR...)")
    recs = parse_recipes(recipes)
    deploy_to = parse_targets(targets or ",".join(installed_targets()))
    out = ensure_dir(output_dir)
    prog = Progress({"model": 0.0}, enabled=progress, log=log)
    t = time.time()
    loaded, source = _resolve(weights, arch, dataset, input_size, progress, model_options)
    size = source.preprocess.input_size
    common = {"model": _model_digest(loaded), "data": source.identity, "input_size": size[0],
              "limit_test": limit_test, "limit_train": limit_train, "targets": [d.name for d in deploy_to],
              "threads": threads}
    from compress.quant.pipeline import TRAINERS

    trains = {r.name for r in recs if r.command == "prune" or r.strategy in TRAINERS}
    subs = plan_subruns(recs, out, common, trains)
    plan = Plan(out)
    plan.request = {"recipes": [r.name for r in recs], **common}
    for s in subs:  # an int8-of whose base is finished can be judged now (for the estimates)
        if s.kind == "int8-of" and plan.finished(next(b for b in subs if b.name == s.base)):
            s.request["base_model"] = file_sha256(s.dir.parent / s.base / "model.pt")
    runtimes = [d for d in deploy_to if d.measurable_here]
    prog.estimates = _estimates(subs, plan, loaded, source, runtimes)
    prog.done("model", f"{loaded.spec.arch} @{size[0]} on {source.name}; {len(subs)} sub-run(s), "
                       f"{sum(not plan.finished(s) for s in subs)} to run", t)
    options = {"weights": weights, "dataset": dataset, "input_size": input_size, "data_name": source.name,
               "size": size[0], "limit_test": limit_test, "limit_train": limit_train, "threads": threads,
               "device": device, "progress": progress, "model_options": model_options}
    _run_subruns(subs, plan, options, prog)
    given = {"target": ",".join(d.name for d in deploy_to), "weights": weights, "dataset": dataset,
             "input-size": input_size, "limit-train": limit_train, "limit-test": limit_test,
             "threads": threads if threads != 1 else None, "device": device if device != "auto" else None,
             "remeasure": remeasure, **{k.replace("_", "-"): v for k, v in model_options.items()}, "output-dir": out}
    line = " ".join(["mnv3-compress compare --recipes", recipes if isinstance(recipes, str) else ",".join(recipes)]
                    + [f"--{k}" if v is True else f"--{k} {v}" for k, v in given.items() if v not in (None, False)])
    return _measure_and_report(subs, plan, deploy_to, out, source, limit_test, threads, remeasure, prog, loaded,
                               line)


def _measure_and_report(subs: Sequence[SubRun], plan: Plan, deploy_to: Sequence[Target], out: Path, source,
                        limit_test, threads: int, remeasure: bool, prog: Progress, loaded, command_line: str
                        ) -> dict[str, Any]:
    t = time.time()
    rows, reports = [], {}
    for s in subs:
        found, reports[s.name] = variants_of(s, out)
        rows += found
    rows, notes = measure.collect(rows, deploy_to, out, source.preprocess.input_size, loaded.model.eval())
    prog.done("variants", f"{len(rows)} variants of {len({r['runtime'] for r in rows})} runtime(s)", t)
    cache = measure.Cache(out)
    for target in deploy_to:  # now that the artifacts are known: 0 for a runtime whose measurement still holds
        if f"latency {target.name}" in prog.estimates:
            prog.estimates[f"latency {target.name}"] = measure.expected_latency_s(rows, target, threads, cache,
                                                                                  remeasure)
    measurements = {}
    for target in deploy_to:
        t = time.time()
        done = measure.measure_latencies(rows, [target], out, source, threads, cache, remeasure)
        if target.measurable_here and done:
            m = measurements[target.name] = done[target.name]
            what = (f"reused measurement {m['id']} ({len(m['variants'])} variants)" if m["reused"]
                    else f"{len(m['variants'])} variants timed together, measurement {m['id']}")
            prog.done(f"latency {target.name}", what, t)
        elif target.measurable_here:
            prog.done(f"latency {target.name}", "no variant for this runtime", t)
    t = time.time()
    evaluated, cached = measure.check_accuracy(rows, deploy_to, out, source, limit_test, cache)
    prog.done("accuracy", "the same test images for every variant; " + "; ".join(
        [f"evaluated now: {', '.join(evaluated)}"] * bool(evaluated)
        + [f"evaluated by an earlier compare: {', '.join(cached)}"] * bool(cached)
        + ["the others from their sub-runs"]), t)
    t = time.time()
    names = ", ".join(s.name for s in subs)
    report = {
        "title": f"compare: {names} on {loaded.spec.arch} @{source.preprocess.input_size[0]} ({source.name})",
        "command": "compare", "command_line": command_line,
        "request": plan.request, "evaluation": measure.test_split(source, limit_test),
        "model": {"arch": loaded.spec.arch, "source": loaded.source, "input_size": list(source.preprocess.input_size),
                  "dataset": source.name, "dataset_fingerprint": source.fingerprint},
        "variants": rows, "measurements": measurements,
        "runs": [{"recipe": s.name, "kind": s.kind, "command": COMMANDS[s.kind].format(name=s.name, base=s.base),
                  "dir": str(s.dir.relative_to(out)), "status": s.status, "seconds": s.seconds,
                  "finished_at": plan.finished_at(s.name)} for s in subs],
        "trajectories": {s.name: _trajectory(reports[s.name]) for s in subs if reports[s.name].get("trajectory")},
        "notes": notes + [f"`{s.name}` is the int8 step of its recipe on `runs/{s.base}/model.pt`: its [prune] "
                          f"section is `{s.base}`'s, so one NetAdapt search serves both." for s in subs
                          if s.kind == "int8-of"],
        "machine": machine_info(), "stages": list(prog.stages),
        "wall_s": round(prog.elapsed(), 2),  # to the writing of the report
    }
    write_comparison(out, report)
    prog.done("report", "report.json, report.md, report.html, pareto.png", t)
    return report
