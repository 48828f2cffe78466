"""The documentation matches the code: every CLI option is in the README, help texts name what exists, and every
``benchmarks/NAME.py --option`` the project's text cites is an option of that script."""
from __future__ import annotations

import re
from pathlib import Path

import click

from cli import main
from recipes.loader import list_recipes

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _commands() -> dict[str, click.Command]:
    return dict(main.commands)


def _section(command: str) -> str:
    """The README's section of one command: from its ``### `mnv3-compress CMD` `` heading to the next heading."""
    m = re.search(rf"^### `mnv3-compress {command}`\n(.*?)(?=^##)", README, re.S | re.M)
    return m.group(1) if m else ""


def test_readme_documents_every_option_of_every_command():
    missing = []
    for name, cmd in _commands().items():
        text = _section(name)
        if not text:
            missing.append(f"no README section for {name}")
        for p in cmd.params:
            if isinstance(p, click.Option):
                missing += [f"{name} {opt}" for opt in p.opts if opt.startswith("--") and opt != "--help"
                            and f"`{opt}" not in text]
    assert missing == []


def _help(command: str) -> str:
    from click.testing import CliRunner

    res = CliRunner().invoke(main, [command, "--help"], terminal_width=200)
    assert res.exit_code == 0
    return " ".join(res.output.split())


def test_quantize_help_names_every_qat_recipe_and_prune_help_every_pruning_recipe():
    q, p = _help("quantize"), _help("prune")
    assert all(r.name in q for r in list_recipes() if r.qat.enabled)
    assert all(r.name in p for r in list_recipes() if r.command == "prune")


def test_train_help_states_its_real_defaults():
    from compress.training.train import TrainConfig

    text = _help("train")
    assert "recipe" not in text.lower()  # train takes no recipe: its defaults are TrainConfig's
    assert f"{TrainConfig().lr:g}" in text


def test_cited_benchmark_options_exist():
    cited = []
    texts = [README] + [p.read_text() for d in ("compress", "recipes", "eval", "calibration", "benchmarks", "tools")
                        for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".toml", ".md")]
    for text in texts:
        for script, opts in re.findall(r"benchmarks/(\w+)\.py((?:\s+--[\w-]+(?:\s+[^\s-][^\s]*)?)+)", text):
            for opt in re.findall(r"--[\w-]+", opts):
                cited.append((script, opt))
    assert cited, "the pattern finds the README's benchmark commands"
    unknown = sorted({(s, o) for s, o in cited if o not in (ROOT / "benchmarks" / f"{s}.py").read_text()})
    assert unknown == []
