"""Running one sub-run (the table :data:`RUNNERS`, by :attr:`compress.compare.plan.SubRun.kind`) and reading the
variants its ``report.json`` lists.

Every runner calls the command's own library function with the comparison's options, into ``OUT/runs/<recipe>/``;
the quantization runners skip their own latency measurement (the comparison times every variant of a runtime
together, in one run).  :func:`variants_of` names each variant by its recipe: ``fp32`` for the float model they
all start from, ``RECIPE`` for what the recipe makes (``int8``, ``int8-qat``, ``netadapt``, ``netadapt-int8``),
``RECIPE:VARIANT`` for the others (``int8-qat:int8-ptq``, QAT's calibrated baseline), one row per runtime.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from compress.compare.plan import SubRun
from eval.report import load_run_report

__all__ = ["RUNNERS", "Options", "variants_of"]

# weights, dataset, input_size (as asked), data_name and size (as resolved), limit_test, limit_train, threads,
# device, progress, model_options
Options = dict[str, Any]


def _run_quantize(sub: SubRun, o: Options) -> None:
    from compress.quant.pipeline import TRAINERS, quantize

    trains = sub.recipe.strategy in TRAINERS
    quantize(sub.recipe, weights=o["weights"], dataset=o["dataset"], input_size=o["input_size"],
             output_dir=sub.dir, eval_limit=o["limit_test"], threads=o["threads"], latency=False,
             progress=o["progress"], device=o["device"], limit_train=o["limit_train"] if trains else None,
             targets=",".join(sub.request["targets"]), **o["model_options"])


def _run_prune(sub: SubRun, o: Options) -> None:
    from compress.prune.netadapt import prune

    overrides = {"limit_train": o["limit_train"]} if o["limit_train"] else {}
    prune(sub.recipe, weights=o["weights"], dataset=o["dataset"], input_size=o["input_size"], output_dir=sub.dir,
          eval_limit=o["limit_test"], progress=o["progress"], device=o["device"], model_options=o["model_options"],
          target=sub.request["targets"][0], **overrides)


def _run_int8_of(sub: SubRun, o: Options) -> None:
    """The recipe's int8 step on its base run's pruned network, as ``prune`` runs it on its own (PruneRun)."""
    from compress.quant.pipeline import TRAINERS, quantize

    rec = sub.recipe.replace(command="quantize")
    quantize(rec, weights=sub.dir.parent / sub.base / "model.pt", dataset=o["data_name"], input_size=o["size"],
             output_dir=sub.dir, eval_limit=o["limit_test"], threads=o["threads"], latency=False,
             progress=o["progress"], device=o["device"],
             limit_train=o["limit_train"] if rec.strategy in TRAINERS else None,
             targets=",".join(sub.request["targets"]), workers=o["model_options"].get("workers"))


# the sub-run's kind -> how it runs (tests replace these to prove that a rerun runs nothing)
RUNNERS: dict[str, Callable[[SubRun, Options], None]] = {
    "quantize": _run_quantize, "prune": _run_prune, "int8-of": _run_int8_of}


def _label(sub: SubRun, variant: dict[str, Any]) -> str | None:
    """The comparison's name for a variant of ``sub``'s report (None: not a variant of its own)."""
    name = variant["name"]
    if variant.get("is_reference"):
        return None if sub.kind == "int8-of" else "fp32"  # int8-of's "float" is its base's pruned network
    main = {"quantize": "int8", "int8-of": "int8",
            "prune": "netadapt-int8" if sub.recipe.prune.quantize_after else "netadapt-fp32"}[sub.kind]
    if name == main or name.split("/")[0] == main:  # "int8/openvino": the same model for another runtime
        return sub.name
    return f"{sub.name}:{name.split('/')[0]}"


def variants_of(sub: SubRun, out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of ``sub``'s report (paths relative to ``out``) and the report itself.

    A row: ``name``, ``recipe``, ``runtime`` (the deploy target that runs it), ``precision``, ``is_float_reference``,
    ``file``, ``accuracy`` / ``agreement`` (share of equal top-1 with ``agreement_vs``: ``fp32``, or the pruned
    network an int8 step quantized) with ``evaluated_on`` (the split they were measured on), ``size_bytes``, ``params``, ``macs``, ``macs_executed`` and ``source`` (report and variant)."""
    report = load_run_report(sub.dir)
    evaluated_on = {**(report.get("evaluation") or {}),
                    "dataset": (report.get("model") or {}).get("dataset"),
                    "fingerprint": (report.get("model") or {}).get("dataset_fingerprint")}
    rel = sub.dir.relative_to(out)
    # what an int8 step's "agreement" was measured against: the start float, or the pruned network it quantized
    pruned = {"int8-of": sub.base, "prune": f"{sub.name}:netadapt-fp32"}.get(sub.kind)
    rows = []
    for v in report["variants"]:
        label = _label(sub, v)
        if label is None or not isinstance(v.get("file"), str):
            continue
        runtime = v.get("target") or "ort-x86"
        precision = "fp32" if v.get("is_reference") or v["name"].endswith("fp32") else "int8"
        rows.append({
            "name": label, "recipe": "float" if label == "fp32" else sub.name, "runtime": runtime,
            "precision": precision, "runner_variant": "int8" if precision == "int8" else "fp32",
            "is_float_reference": label == "fp32", "file": str(rel / v["file"]),
            "accuracy": v.get("accuracy"), "agreement": v.get("agreement"),
            "agreement_vs": pruned if pruned and precision == "int8" else "fp32",
            "evaluated_on": {k: evaluated_on.get(k) for k in ("split", "images", "dataset", "fingerprint")},
            "size_bytes": v.get("size_bytes"), "params": v.get("params"), "macs": v.get("macs"),
            "macs_executed": v.get("macs_executed"), "source": {"report": str(rel / "report.json"),
                                                               "variant": v["name"]}})
    return rows, report
