"""Files: atomic output (write to a temp file in the target directory, then rename over the target, so an
interrupted run never leaves a half-written model, checkpoint or report) and the cache home.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from compress.errors import UserError

HOME_ENV = "MNV3_COMPRESS_HOME"


def home() -> Path:
    """The cache directory: ``$MNV3_COMPRESS_HOME``, default ``~/.cache/mnv3-compress``."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "mnv3-compress").expanduser()


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents); fail with a one-line UserError if it is not writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"cannot create output directory {p}: a file of that name exists")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {p}: {e.strerror or e}") from None
    if not os.access(p, os.W_OK):
        raise UserError(f"output directory {p} is not writable")
    return p


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``target``; on success it is renamed onto ``target``, on error removed."""
    target = Path(target)
    ensure_dir(target.parent if str(target.parent) else ".")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; outputs get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | os.PathLike, text: str) -> Path:
    return write_bytes(target, text.encode("utf-8"))


def write_json(target: str | os.PathLike, obj: Any) -> Path:
    return write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_with(target: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` and atomically move the result onto ``target``."""
    with atomic_path(target) as tmp:
        writer(tmp)
    return Path(target)
