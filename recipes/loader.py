"""The one loader that reads and validates recipe files.

A recipe is a TOML file (``recipes/NAME.toml`` or any path) with ``version = 1``, a ``name``, a one-line
``description`` and the sections below; each section is a frozen dataclass that validates itself, so a
typo fails with a message naming the key and the allowed keys or values (:mod:`recipes.sections`)::

    version = 1
    name = "int8"
    description = "..."

    [quantize]        # QuantizeConfig: formats, types, activation forms, exclusions
    [calibration]     # CalibrationConfig: method and size of the train-split subset
    [tuning]          # TuningConfig: accuracy-driven fallback (neural-compressor), off unless enabled
    [mixed_precision] # MixedPrecisionConfig: latency-aware per-layer int8 / fp32, off unless enabled
    [qat]             # QATConfig: quantization-aware training before export, off unless enabled

:meth:`Recipe.to_toml` writes the resolved recipe (every default filled in) beside each output, and
:func:`load_recipe` reads it back unchanged.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, get_args, get_origin, get_type_hints

import tomllib

from compress.errors import UserError
from recipes.sections import (
    CALIBRATION_METHODS,
    HARD_SIGMOID_FORMS,
    HSWISH_FORMS,
    SECTIONS,
    CalibrationConfig,
    MixedPrecisionConfig,
    PruneConfig,
    QATConfig,
    QuantizeConfig,
    TuningConfig,
)

__all__ = ["Recipe", "QuantizeConfig", "CalibrationConfig", "TuningConfig", "PruneConfig", "MixedPrecisionConfig",
           "QATConfig", "RecipeError", "load_recipe", "list_recipes", "recipe_from_dict", "RECIPES_DIR",
           "HSWISH_FORMS", "HARD_SIGMOID_FORMS", "CALIBRATION_METHODS"]

RECIPES_DIR = Path(__file__).resolve().parent
RECIPE_VERSION = 1
COMMANDS = ("quantize", "prune")


class RecipeError(UserError):
    """A recipe that does not validate; the message names the file, the key and what is allowed."""


@dataclass(frozen=True)
class Recipe:
    """A validated recipe; ``source`` is where it was read from (not part of the TOML)."""

    name: str
    description: str
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)  # optional section: only 'prune' reads it
    mixed_precision: MixedPrecisionConfig = field(default_factory=MixedPrecisionConfig)  # off unless enabled
    qat: QATConfig = field(default_factory=QATConfig)  # off unless enabled
    version: int = RECIPE_VERSION
    source: str | None = field(default=None, compare=False)
    # the command that applies it: "prune" for recipes with a [prune] section (netadapt, netadapt-int8),
    # "quantize" for the others
    command: str = "quantize"

    def __post_init__(self) -> None:
        if self.command not in COMMANDS:
            raise ValueError(f"command = {self.command!r} is not allowed; allowed values: {', '.join(COMMANDS)}")
        if self.version != RECIPE_VERSION:
            raise ValueError(f"version = {self.version!r} is not supported; allowed values: {RECIPE_VERSION}")
        if not self.name.strip():
            raise ValueError("name must not be empty")
        if "\n" in self.description or not self.description.strip():
            raise ValueError("description must be one non-empty line")
        if self.quantize.min_int8_conv_fraction > 1 - self.tuning.max_fallback_fraction + 1e-9 and self.tuning.enabled:
            raise ValueError(f"tuning.max_fallback_fraction = {self.tuning.max_fallback_fraction} would break "
                             f"quantize.min_int8_conv_fraction = {self.quantize.min_int8_conv_fraction}; "
                             f"allowed: max_fallback_fraction <= 1 - min_int8_conv_fraction")
        if self.qat.enabled and (self.tuning.enabled or self.mixed_precision.enabled):
            raise ValueError("qat.enabled cannot be combined with tuning.enabled or mixed_precision.enabled: the "
                             "QAT model's learned scales are exported as they are (no re-calibration, no fallback)")

    @property
    def strategy(self) -> str:
        """How ``quantize`` makes the int8 graph (a key of :data:`compress.quant.pipeline.STRATEGIES`): "qat",
        "tuning", "mixed_precision" (the enabled section; QAT excludes the other two) or plain "ptq"."""
        for name in ("qat", "tuning", "mixed_precision"):
            if getattr(self, name).enabled:
                return name
        return "ptq"

    def replace(self, **changes: Any) -> "Recipe":
        """A copy with whole sections or top-level fields replaced (sections stay validated)."""
        return dataclasses.replace(self, **changes)

    def with_overrides(self, section: str, **changes: Any) -> "Recipe":
        """A copy with keys of one section changed, e.g. ``with_overrides('calibration', size=256)``."""
        if section not in SECTIONS:
            raise RecipeError(f"unknown recipe section [{section}]; allowed: {', '.join(SECTIONS)}")
        try:
            return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})
        except (TypeError, ValueError) as e:
            raise RecipeError(f"recipe {self.name}: [{section}] {e}") from None

    def require_command(self, command: str) -> "Recipe":
        """This recipe, if ``command`` is the one that applies it; else a one-line error naming that command."""
        if command != self.command:
            what = "a pruning" if self.command == "prune" else "a quantization"
            raise RecipeError(f"recipe {self.name} is {what} recipe: run it with 'mnv3-compress {self.command} "
                              f"--recipe {self.name}' (see 'mnv3-compress recipes')")
        return self

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "name": self.name, "description": self.description}
        for s in SECTIONS:
            if s == "prune" and self.command != "prune":
                continue  # [prune] marks a pruning recipe: a quantization recipe's file has none
            out[s] = {f.name: _plain(getattr(getattr(self, s), f.name)) for f in fields(getattr(self, s))}
        return out

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


# -- reading ---------------------------------------------------------------------------------------

_TYPES_CACHE: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _TYPES_CACHE:
        _TYPES_CACHE[cls] = get_type_hints(cls)
    return _TYPES_CACHE[cls]


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check a TOML value against a field annotation (bool, int, float, str, tuple[str, ...])."""
    def tname(t: Any) -> str:
        return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(t, str(t))

    if get_origin(hint) is tuple:
        (item,) = [a for a in get_args(hint) if a is not Ellipsis]
        if not isinstance(value, list):
            raise ValueError(f"{key} must be a list of {tname(item)}s, got {value!r}")
        return tuple(_coerce(f"{key}[]", v, item) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
    return value


def _section(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where}: [{cls.__name__}] must be a table")
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed keys: {', '.join(names)}")
    hints = _hints(cls)
    try:
        kwargs = {k: _coerce(k, v, hints[k]) for k, v in data.items()}
        return cls(**kwargs)
    except ValueError as e:
        raise RecipeError(f"{where}: {e}") from None


def recipe_from_dict(data: Mapping[str, Any], source: str = "<recipe>") -> Recipe:
    """Validate a parsed TOML document into a :class:`Recipe` (RecipeError names key and allowed values)."""
    top = {"version", "name", "description", *SECTIONS}
    unknown = sorted(set(data) - top)
    if unknown:
        raise RecipeError(f"recipe {source}: unknown key(s) {', '.join(unknown)}; allowed keys: "
                          f"version, name, description, and the sections [{'], ['.join(SECTIONS)}]")
    for key in ("version", "name", "description"):
        if key not in data:
            raise RecipeError(f"recipe {source}: missing required key {key!r} (every recipe needs version = "
                              f"{RECIPE_VERSION}, a name and a one-line description)")
    if isinstance(data["version"], bool) or data["version"] != RECIPE_VERSION:
        raise RecipeError(f"recipe {source}: version = {data['version']!r} is not supported; allowed values: "
                          f"{RECIPE_VERSION}")
    for key in ("name", "description"):
        if not isinstance(data[key], str):
            raise RecipeError(f"recipe {source}: {key} must be a string, got {data[key]!r}")
    sections = {s: _section(cls, data.get(s, {}), f"recipe {source} [{s}]") for s, cls in SECTIONS.items()}
    try:
        return Recipe(name=data["name"], description=data["description"], version=RECIPE_VERSION,
                      source=source, command="prune" if "prune" in data else "quantize", **sections)
    except ValueError as e:
        raise RecipeError(f"recipe {source}: {e}") from None


def _is_path(name_or_path: str) -> bool:
    return name_or_path.endswith(".toml") or os.sep in name_or_path or "/" in name_or_path


def recipe_path(name_or_path: str | os.PathLike) -> Path:
    """Resolve a recipe name (``int8``) to ``recipes/int8.toml``; a path is returned as it is."""
    s = str(name_or_path)
    if _is_path(s) or Path(s).is_file():
        p = Path(s).expanduser()
        if not p.is_file():
            raise RecipeError(f"recipe file not found: {p}")
        return p
    p = RECIPES_DIR / f"{s}.toml"
    if not p.is_file():
        names = ", ".join(r.name for r in list_recipes()) or "(none)"
        raise RecipeError(f"unknown recipe {s!r}; built-in recipes: {names} (or pass a path to a .toml file)")
    return p


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe by built-in name or by path to a TOML file."""
    p = recipe_path(name_or_path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"recipe {p}: not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read recipe {p}: {e}") from None
    return recipe_from_dict(data, source=str(p))


def list_recipes() -> list[Recipe]:
    """The built-in recipes (``recipes/*.toml``), sorted by name."""
    return sorted((load_recipe(p) for p in RECIPES_DIR.glob("*.toml")), key=lambda r: r.name)


# -- writing ---------------------------------------------------------------------------------------

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            raise ValueError(f"cannot write {v!r} to TOML")
        return repr(v)
    if isinstance(v, str):
        out = ['"']
        for ch in v:
            if ch in '"\\':
                out.append("\\" + ch)
            elif ch == "\n":
                out.append("\\n")
            elif ch == "\t":
                out.append("\\t")
            elif ord(ch) < 0x20 or ord(ch) == 0x7F:
                out.append(f"\\u{ord(ch):04x}")
            else:
                out.append(ch)
        return "".join(out) + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(doc: Mapping[str, Any]) -> str:
    """A tiny TOML emitter for flat documents: scalars and lists at the top, then one level of tables."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, Mapping)]
    for k, v in doc.items():
        if isinstance(v, Mapping):
            lines += ["", f"[{k}]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"
