"""Writing outputs so that a failed step leaves nothing half-written behind."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cockatoo_lib.errors import CockatooError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; move it to `path` only if the block succeeds.

    An existing non-empty `path` is refused rather than replaced: it may hold a user's work.
    An existing empty folder (KFP creates artifact folders ahead) is replaced. A process killed
    mid-write (SIGKILL, out of memory) cannot clean up after itself: its temporary folder is
    named for its host and process, and the next run for the same output removes it.
    """
    final = check_output(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(final)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(final)}{os.getpid()}-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the output from other users and containers
    try:
        yield tmp
        if final.exists():
            final.rmdir()
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _tmp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-{socket.gethostname()}-"


def _remove_abandoned(final: Path) -> None:
    """Remove this host's temporary folders for `final` whose process has ended."""
    prefix = _tmp_prefix(final)
    for stale in final.parent.glob(f"{glob.escape(prefix)}*"):
        pid = stale.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s, left by process %s, which has ended", stale, pid)
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def check_output(path: str | os.PathLike) -> Path:
    """An output path that can be created: steps call this before any work, so a bad one fails
    at once with one line. An existing non-empty `path` is refused rather than replaced: it may
    hold a user's work. An existing empty folder (KFP creates artifact folders ahead) is fine."""
    final = Path(path)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise CockatooError(f"output {final} already exists and is not empty; remove it or choose another")
    _check_creatable(final, final)
    return final


def _check_creatable(final: Path, folder: Path) -> None:
    """`folder` (final or the folder it goes in) exists as a writable folder or can be created."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise CockatooError(f"output {final} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CockatooError(f"output {final} cannot be created: no permission to write in {existing}")


def check_file_output(path: str | os.PathLike) -> Path:
    """A file output that may replace an earlier one of its own (a compiled pipeline): it must not
    be a folder, and its folder must be creatable and writable. One line, before any work."""
    final = Path(path)
    if final.is_dir():
        raise CockatooError(f"output {final} is a folder; give a file name, e.g. {final / 'pipeline.yaml'}")
    _check_creatable(final, final.parent)
    return final


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace one file in a single step: readers see the old file or the new, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def read_json(path: str | os.PathLike, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CockatooError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CockatooError(f"{what} {path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None


def sha256_files(paths: list[Path], root: Path | None = None) -> str:
    """Hash file names (relative to root) and contents, in the given order."""
    digest = hashlib.sha256()
    for p in paths:
        digest.update(str(p.relative_to(root) if root else p.name).encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
