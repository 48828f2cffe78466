"""What ``compare --recipes`` was asked, and which of its sub-runs are already done (``OUT/plan.json``).

Each recipe becomes one sub-run in ``OUT/runs/<recipe>/``, of a kind (:data:`compress.compare.runs.RUNNERS`):

* ``quantize``: a quantization recipe, by :func:`compress.quant.pipeline.quantize`;
* ``prune``: a recipe with a ``[prune]`` section, by :func:`compress.prune.netadapt.prune`;
* ``int8-of``: a pruning recipe with an int8 step (``netadapt-int8``) whose ``[prune]`` section is that of
  another requested pruning recipe (``netadapt``): one NetAdapt search, then its int8 step applied to that run's
  pruned network (``runs/netadapt/model.pt``), exactly as ``prune`` applies it to its own.

A sub-run's *request* is everything that shapes its result: the resolved recipe, the start model (a digest of
its weights and architecture), the data's identity, the input size, the test images, the training limit, the
deploy targets and the latency threads (``int8-mixed`` times layers with them); for ``int8-of`` the digest of the
pruned network it quantizes.  Where it trains (``--device``) and how images are decoded (``--workers``) are not
part of it.  A sub-run is *finished* when the plan recorded it finished for this exact request and its
``report.json`` is still the one that run wrote (its sha256); anything else runs again (an interrupted QAT run
resumes from its checkpoint).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from compress.errors import UserError
from compress.io import write_json
from recipes.loader import Recipe, load_recipe

__all__ = ["SubRun", "Plan", "plan_subruns", "parse_recipes", "file_sha256", "PLAN_FILE", "RUNS_DIR"]

PLAN_FILE = "plan.json"
PLAN_FORMAT = 1
RUNS_DIR = "runs"


@dataclass
class SubRun:
    """One recipe's run inside a comparison."""
    name: str  # the recipe's name: its directory OUT/runs/<name>/ and its label in the table
    recipe: Recipe
    kind: str  # a key of compress.compare.runs.RUNNERS
    dir: Path
    request: dict[str, Any]
    base: str | None = None  # int8-of: the prune sub-run whose pruned network it quantizes
    status: str = "pending"  # "ran" | "reused" once the comparison has it
    seconds: float | None = None
    notes: list[str] = field(default_factory=list)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_recipes(spec: str | Sequence[str]) -> list[Recipe]:
    """``"int8,int8-qat,path/to/mine.toml"`` -> the recipes (names or TOML paths), each name once."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if str(s).strip()]
    if not items:
        raise UserError("--recipes needs at least one recipe (see 'mnv3-compress recipes')")
    recipes = [load_recipe(s) for s in items]
    names = [r.name for r in recipes]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"recipe {twice[0]} is asked for twice in --recipes (each recipe's run is OUT/runs/NAME/)")
    return recipes


def _prune_base(rec: Recipe, recipes: Sequence[Recipe]) -> str | None:
    """The requested pruning recipe without an int8 step whose [prune] section ``rec`` shares, if any."""
    if rec.command != "prune" or not rec.prune.quantize_after:
        return None
    mine = dataclasses.replace(rec.prune, quantize_after=False)
    for other in recipes:
        if other.command == "prune" and not other.prune.quantize_after and other.prune == mine:
            return other.name
    return None


def plan_subruns(recipes: Sequence[Recipe], out: Path, common: dict[str, Any], trains: set[str]) -> list[SubRun]:
    """The sub-runs in the order they run (a pruning run before the int8 step that reuses its network).
    ``common``: the request keys every sub-run shares; ``trains``: the names of recipes that train (they take
    the training limit)."""
    subs = []
    for rec in recipes:
        base = _prune_base(rec, recipes)
        kind = "int8-of" if base else rec.command
        request = {**common, "kind": kind, "recipe": rec.to_dict(),
                   "limit_train": common.get("limit_train") if rec.name in trains else None}
        if kind == "prune" and not rec.prune.quantize_after:
            request["targets"] = ["ort-x86"]  # nothing of it deploys elsewhere
        elif kind == "prune":
            # NetAdapt searches on one target's int8 latency and deploys there (prune --target T); the pruned
            # network reaches every target when the plain pruning recipe is asked too (an int8-of sub-run)
            request["targets"] = list(common.get("targets") or ["ort-x86"])[:1]
        subs.append(SubRun(rec.name, rec, kind, out / RUNS_DIR / rec.name, request, base=base))
    return sorted(subs, key=lambda s: s.kind == "int8-of")  # stable: the bases keep their order


class Plan:
    """``OUT/plan.json``: per sub-run its request, whether it finished, the sha256 of the report it wrote and
    how long it took (the estimate of the next run of that sub-run)."""

    def __init__(self, out: Path) -> None:
        self.path = out / PLAN_FILE
        try:
            doc = json.loads(self.path.read_text())
            self.runs: dict[str, dict[str, Any]] = dict(doc["runs"]) if doc.get("format") == PLAN_FORMAT else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self.runs = {}  # no plan, or one this version cannot read: nothing counts as finished
        self.request: dict[str, Any] = {}

    def finished(self, sub: SubRun) -> bool:
        entry = self.runs.get(sub.name) or {}
        report = sub.dir / "report.json"
        return (entry.get("status") == "finished" and entry.get("request") == _plain(sub.request)
                and report.is_file() and entry.get("report_sha256") == file_sha256(report))

    def previous_seconds(self, name: str) -> float | None:
        """How long this sub-run took the last time it ran to its end (any request), if it ever did."""
        value = (self.runs.get(name) or {}).get("seconds")
        return float(value) if isinstance(value, (int, float)) else None

    def start(self, sub: SubRun) -> None:
        entry = self.runs.get(sub.name) or {}
        self.runs[sub.name] = {"status": "running", "request": _plain(sub.request), "started_at": _now(),
                               "seconds": entry.get("seconds")}
        self.save()

    def finish(self, sub: SubRun, seconds: float) -> None:
        self.runs[sub.name] = {"status": "finished", "request": _plain(sub.request), "finished_at": _now(),
                               "seconds": round(seconds, 1), "report_sha256": file_sha256(sub.dir / "report.json")}
        self.save()

    def finished_at(self, name: str) -> str | None:
        return (self.runs.get(name) or {}).get("finished_at")

    def save(self) -> None:
        write_json(self.path, {"format": PLAN_FORMAT, "request": _plain(self.request), "runs": self.runs})


def _plain(obj: Any) -> Any:
    """The JSON form (tuples as lists), so a request read back from plan.json compares equal."""
    return json.loads(json.dumps(obj))


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z")
