"""The one recipe loader: built-in recipes load, round-trip through TOML, and every mistake is named."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from recipes.loader import (  # noqa: E402
    CALIBRATION_METHODS,
    HSWISH_FORMS,
    Recipe,
    RecipeError,
    dump_toml,
    list_recipes,
    load_recipe,
    recipe_from_dict,
)

MINIMAL = 'version = 1\nname = "mine"\ndescription = "a user recipe"\n'


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def test_builtin_recipes_load_and_are_listed():
    names = [r.name for r in list_recipes()]
    assert names == sorted(names)
    assert {"int8", "int8-tuned"} <= set(names)
    int8 = load_recipe("int8")
    assert int8.quantize.format == "qdq" and int8.quantize.weight_type == "int8"
    assert int8.quantize.per_channel and int8.quantize.activation_type == "uint8"
    assert int8.quantize.min_int8_conv_fraction >= 0.9
    assert not int8.tuning.enabled
    tuned = load_recipe("int8-tuned")
    assert tuned.tuning.enabled and tuned.tuning.engine == "neural-compressor"
    assert tuned.tuning.tolerable_loss <= 0.005 and tuned.tuning.criterion == "relative"
    for r in list_recipes():
        assert r.description.strip() and "\n" not in r.description


@pytest.mark.parametrize("name", ["int8", "int8-tuned", "netadapt", "netadapt-int8"])
def test_to_toml_round_trips(name, tmp_path):
    r = load_recipe(name)
    text = r.to_toml()
    again = recipe_from_dict(tomllib.loads(text))
    assert again == r
    # and through a file, as quantize writes it beside its outputs
    assert load_recipe(write(tmp_path, text)) == r


def test_defaults_fill_a_minimal_recipe(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL))
    assert r.name == "mine" and r.source == str(tmp_path / "r.toml")
    assert r.quantize == Recipe("x", "y").quantize
    assert 'hswish = "' in r.to_toml()  # the resolved recipe spells every default out


@pytest.mark.parametrize("text, must_name", [
    (MINIMAL + "colour = 1\n", ["colour", "version", "description", "[quantize]"]),
    (MINIMAL + "[quantize]\nweight_typ = \"int8\"\n", ["weight_typ", "weight_type", "activation_type"]),
    (MINIMAL + "[quantize]\nactivation_type = \"fp16\"\n", ["activation_type", "'fp16'", "'uint8'", "'int8'"]),
    (MINIMAL + "[quantize]\nhswish = \"swish\"\n", ["hswish", *(repr(f) for f in HSWISH_FORMS)]),
    (MINIMAL + "[calibration]\nmethod = \"kl\"\n", ["method", *(repr(m) for m in CALIBRATION_METHODS)]),
    (MINIMAL + "[calibration]\npercentile = 101.0\n", ["percentile", "100"]),
    (MINIMAL + "[calibration]\nsize = 0\n", ["size"]),
    (MINIMAL + "[quantize]\nper_channel = \"yes\"\n", ["per_channel", "true or false"]),
    (MINIMAL + "[calibration]\nsize = 12.5\n", ["size", "integer"]),
    (MINIMAL + "[quantize]\nnodes_to_exclude = \"Conv_0\"\n", ["nodes_to_exclude", "list"]),
    (MINIMAL + "[tuning]\ncalibration_methods = [\"minmax\", \"mse\"]\n", ["calibration_methods", "'mse'"]),
    (MINIMAL + "[tuning]\ncriterion = \"loose\"\n", ["criterion", "'relative'", "'absolute'"]),
    (MINIMAL + "[quantize]\nmin_int8_conv_fraction = 1.5\n", ["min_int8_conv_fraction"]),
    (MINIMAL.replace("version = 1", "version = 2"), ["version", "2", "1"]),
    ('version = 1\nname = "x"\n', ["description"]),
    (MINIMAL + "quantize = 3\n", ["quantize", "table"]),
    ("version = 1\nname = [\n", ["not valid TOML"]),
])
def test_mistakes_are_named(tmp_path, text, must_name):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, text))
    msg = str(e.value)
    assert "\n" not in msg
    for word in must_name:
        assert word in msg, (word, msg)


def test_unknown_name_lists_builtins_and_missing_path(tmp_path):
    with pytest.raises(RecipeError, match="int8-tuned"):
        load_recipe("int9")
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "absent.toml")


def test_overrides_are_validated():
    r = load_recipe("int8")
    assert r.with_overrides("calibration", size=64).calibration.size == 64
    assert r.calibration.size != 64  # frozen: the original is unchanged
    with pytest.raises(RecipeError, match="method"):
        r.with_overrides("calibration", method="median")
    with pytest.raises(RecipeError, match="section"):
        r.with_overrides("export", opset=17)


def test_tuning_fallback_budget_must_respect_the_conv_floor():
    with pytest.raises(RecipeError, match="max_fallback_fraction"):
        recipe_from_dict({"version": 1, "name": "x", "description": "d",
                          "quantize": {"min_int8_conv_fraction": 0.95},
                          "tuning": {"enabled": True, "max_fallback_fraction": 0.2}})


def test_toml_emitter_escapes_strings():
    doc = {"version": 1, "name": 'a "quoted" \\ name', "description": "tab\there",
           "quantize": {"nodes_to_exclude": ["/features/features.1/*", 'x"y'], "per_channel": False}}
    assert tomllib.loads(dump_toml(doc)) == doc


def test_each_recipe_names_the_command_that_applies_it():
    """A [prune] section makes a pruning recipe; the other command refuses it in one line naming the right one."""
    commands = {r.name: r.command for r in list_recipes()}
    assert commands["netadapt"] == commands["netadapt-int8"] == "prune"
    assert {commands[n] for n in ("int8", "int8-tuned", "int8-mixed", "int8-qat")} == {"quantize"}
    with pytest.raises(RecipeError, match="'mnv3-compress prune --recipe netadapt'"):
        load_recipe("netadapt").require_command("quantize")
    with pytest.raises(RecipeError, match="'mnv3-compress quantize --recipe int8'"):
        load_recipe("int8").require_command("prune")
    assert "[prune]" not in load_recipe("int8").to_toml() and "[prune]" in load_recipe("netadapt").to_toml()


def test_cli_lists_recipes():
    from click.testing import CliRunner

    from cli import main

    res = CliRunner().invoke(main, ["recipes"])
    assert res.exit_code == 0
    assert "int8 " in res.output and "int8-tuned" in res.output and "int8-qat" in res.output
    found = list_recipes()
    lines = res.output.splitlines()
    assert [line.split()[:2] for line in lines] == [[r.name, r.command] for r in found]
    # one column for the descriptions, however long the names
    assert len({line.index(r.description) for line, r in zip(lines, found)}) == 1
