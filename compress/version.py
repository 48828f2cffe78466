"""The code version a checkpoint or report records: the package version and, in a git checkout, the commit."""
from __future__ import annotations

import importlib.metadata
import subprocess
from functools import lru_cache
from pathlib import Path

__all__ = ["code_version"]


@lru_cache(maxsize=1)
def code_version() -> str:
    """``mnv3-compress 0.1.0`` plus `` (git abc1234)`` (``+dirty`` with uncommitted changes) in a checkout."""
    try:
        version = importlib.metadata.version("mnv3-compress")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5)
        if commit.returncode != 0:
            return f"mnv3-compress {version}"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return f"mnv3-compress {version} (git {commit.stdout.strip()}{'+dirty' if dirty else ''})"
    except (OSError, subprocess.SubprocessError):
        return f"mnv3-compress {version}"
