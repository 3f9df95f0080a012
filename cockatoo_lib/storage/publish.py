"""Publishing a folder to storage that several runs share (a cache root, and later the model
registry's promotions and checkpoints), so that no reader ever takes a half-written entry and
no run deletes what another may still be writing.

The contract, for a shared `root` (a local folder, gs:// or s3:// prefix):

- A writer uploads its folder under a location of its own, `root/data-<time>-<random>/`, which
  no other run uses, then publishes one small marker, last: `root/entry-<generation>.json`. The
  marker names the location and lists every file with its size. It is written create-only
  (GCS `ifGenerationMatch=0`, S3 `If-None-Match: *`, a hard link locally), so of two writers
  the first complete one wins; the other removes its own, unnamed upload and uses the winner's.
- A reader takes the newest marker and verifies it before use: every file it lists exists with
  its size. A marker that fails (a bucket lifecycle rule took files, a manual copy stopped half
  way) is never deleted; the reader rebuilds and publishes the next generation beside it.
- Nothing a marker names is ever deleted. An upload that no marker names is removed only when
  it is clearly abandoned: older than ABANDONED_AFTER (its writer died between data and
  marker), and by the run that finds it.

Correctness rests on neither timing nor locks: a marker appears in one step and only after its
data is complete, and data is never removed from under a marker.
"""

from __future__ import annotations

import calendar
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = re.compile(r"^entry-(\d{6})\.json$")
DATA = re.compile(r"^data-(\d{8}T\d{6}Z)-[0-9a-f]{8}$")
# An upload no marker names, older than this, was left by a writer that died before publishing.
ABANDONED_AFTER = 24 * 3600.0


@dataclass(frozen=True)
class Entry:
    """A published, verified entry: `uri` is its data folder, complete and immutable."""

    uri: str
    generation: int
    meta: dict = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)  # relative path -> size, as the marker lists


@dataclass(frozen=True)
class Lookup:
    entry: Entry | None
    problem: str | None  # why the newest marker cannot be used, if there is one
    next_generation: int


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _markers(fs, root: str) -> dict[int, str]:
    try:
        paths = fs.ls(root, detail=False)
    except FileNotFoundError:
        return {}
    return {int(m.group(1)): p for p in paths if (m := MARKER.match(_name(p)))}


def read_published(fs, root: str) -> Lookup:
    """The newest entry under `root`, verified against its marker's file list."""
    markers = _markers(fs, root)
    if not markers:
        return Lookup(None, None, 0)
    generation = max(markers)
    entry, problem = read_generation(fs, root, generation, markers[generation])
    return Lookup(entry, problem, generation + 1)


def read_generation(fs, root: str, generation: int,
                    marker: str | None = None) -> tuple[Entry | None, str | None]:
    """One generation's entry, verified; or None and why it cannot be used."""
    marker = marker or f"{root.rstrip('/')}/entry-{generation:06d}.json"
    try:
        body = json.loads(fs.cat_file(marker))
        location = f"{root.rstrip('/')}/{body['location']}"
        files: dict[str, int] = body["files"]
    except FileNotFoundError:
        return None, f"marker {marker} does not exist"
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        return None, f"marker {marker} is unreadable ({type(exc).__name__})"
    problem = _verify(fs, location, files)
    if problem:
        return None, f"{fs.unstrip_protocol(marker)}: {problem}"
    return Entry(fs.unstrip_protocol(location), generation, body.get("meta", {}), files), None


def fetch(fs, uri: str, dest: Path) -> Path:
    """Copy the files of the folder at `uri` (a published entry's, say) into the local `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    fs.get(fs._strip_protocol(uri).rstrip("/") + "/", str(dest) + "/", recursive=True)
    return dest


def published_at(entry: Entry) -> float:
    """When an entry's upload started (its data folder's name says), in seconds since the epoch."""
    return _started(DATA.match(_name(entry.uri)))


def _started(data_name: re.Match) -> float:
    return calendar.timegm(time.strptime(data_name.group(1), "%Y%m%dT%H%M%SZ"))


def generations(fs, root: str) -> list[int]:
    """The generations published under `root`, newest first."""
    return sorted(_markers(fs, root), reverse=True)


def marker_location(fs, root: str, generation: int) -> str | None:
    """The data folder (`data-<time>-<random>`, never reused) a generation's marker names, if any."""
    try:
        return json.loads(fs.cat_file(f"{root.rstrip('/')}/entry-{generation:06d}.json"))["location"]
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return None


def remove_generation(fs, root: str, generation: int, location: str | None = None) -> None:
    """Unpublish one entry: its marker first, so that no reader ever finds a marker without data.
    With `location`, only if the marker still names that data: once removed, a generation's
    number is free for another run to publish under."""
    named = marker_location(fs, root, generation)
    if named is None or (location is not None and named != location):
        return
    fs.rm(f"{root.rstrip('/')}/entry-{generation:06d}.json")
    fs.rm(f"{root.rstrip('/')}/{named}", recursive=True)


def _verify(fs, location: str, files: dict[str, int]) -> str | None:
    try:
        found = fs.find(location, detail=True)
    except FileNotFoundError:
        found = {}
    prefix = fs._strip_protocol(location).rstrip("/") + "/"
    sizes = {p[len(prefix):]: int(info["size"]) for p, info in found.items() if p.startswith(prefix)}
    if not files:
        return "it lists no files"
    for rel, size in sorted(files.items()):
        if rel not in sizes:
            return f"{rel} is missing"
        if sizes[rel] != size:
            return f"{rel} holds {sizes[rel]} bytes where the marker lists {size}"
    return None


def _before_marker(location: str) -> None:
    """Called between the upload and the marker; tests hold a publish open here."""


def _upload(fs, root: str, folder: Path) -> tuple[str, dict[str, int]]:
    """Upload `folder` to a location of its own under `root`; (location, its files' sizes)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    location = f"{root}/data-{stamp}-{uuid.uuid4().hex[:8]}"
    files = {p.relative_to(folder).as_posix(): p.stat().st_size
             for p in sorted(folder.rglob("*")) if p.is_file()}
    fs.makedirs(location, exist_ok=True)
    fs.put(str(folder) + "/", location + "/", recursive=True)
    _before_marker(location)
    return location, files


def _marker_body(location: str, files: dict[str, int], meta: dict) -> bytes:
    return json.dumps({"format": 1, "location": _name(location), "files": files, "meta": meta,
                       "published_at": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())}, indent=1).encode()


def publish(fs, root: str, folder: Path, meta: dict, generation: int) -> Entry:
    """Upload `folder` to a location of its own under `root`, then publish it as `generation`.
    Returns the entry that won: this one, or a concurrent writer's that was published first."""
    root = root.rstrip("/")
    location, files = _upload(fs, root, folder)
    marker = f"{root}/entry-{generation:06d}.json"
    try:
        create_only(fs, marker, _marker_body(location, files, meta))
    except FileExistsError:
        # Another run published this generation first: our upload is named by nothing.
        fs.rm(location, recursive=True)
        winner = read_published(fs, root)
        log.info("publish: %s was published by another run first; using it", marker)
        if winner.entry is not None:
            return winner.entry
        raise OSError(f"{fs.unstrip_protocol(marker)} was published by another run but does not verify: "
                      f"{winner.problem}") from None
    return Entry(fs.unstrip_protocol(location), generation, meta, files)


def publish_new(fs, root: str, folder: Path, meta: dict) -> Entry:
    """Publish `folder` as a generation of its own, the next free one: for entries that are not
    interchangeable (each run's checkpoints), where another writer's, or a damaged marker,
    must not take this one's place."""
    root = root.rstrip("/")
    location, files = _upload(fs, root, folder)
    body = _marker_body(location, files, meta)
    generation = max(_markers(fs, root), default=-1) + 1
    while True:
        try:
            create_only(fs, f"{root}/entry-{generation:06d}.json", body)
            return Entry(fs.unstrip_protocol(location), generation, meta, files)
        except FileExistsError:  # another writer took this number meanwhile: the next
            generation += 1


def fetch_verified(fs, entry: Entry, dest: Path) -> Path:
    """Copy a published entry into the local `dest` and check the copy against its marker's file
    list: an entry unpublished while it was being copied (another run cleaning up) raises
    OSError naming what went missing, and leaves no partial copy."""
    try:
        fetch(fs, entry.uri, dest)
        problem = next((f"{rel} is missing or incomplete" for rel, size in sorted(entry.files.items())
                        if not (dest / rel).is_file() or (dest / rel).stat().st_size != size), None)
    except FileNotFoundError as exc:
        problem = f"{exc.filename or exc} disappeared while it was copied"
    if problem:
        shutil.rmtree(dest, ignore_errors=True)
        raise OSError(f"{entry.uri}: {problem} (unpublished meanwhile?)")
    return dest


def create_only(fs, path: str, body: bytes) -> None:
    """Write `path` only if it does not exist, in one step that readers see whole."""
    if "file" in fs.protocol or "local" in fs.protocol:
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        Path(tmp).write_bytes(body)
        try:
            os.link(tmp, path)  # fails if `path` exists; the content is complete either way
        finally:
            os.unlink(tmp)
    else:
        fs.pipe_file(path, body, mode="create")


def clean_abandoned(fs, root: str, older_than: float | None = None) -> list[str]:
    """Remove uploads that no marker names and that are older than `older_than` seconds."""
    older_than = ABANDONED_AFTER if older_than is None else older_than
    try:
        paths = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    named = set()
    for marker in (p for p in paths if MARKER.match(_name(p))):
        try:
            named.add(json.loads(fs.cat_file(marker))["location"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, FileNotFoundError):
            continue
    removed = []
    now = time.time()
    for path in paths:
        m = DATA.match(_name(path))
        if not m or _name(path) in named:
            continue
        if now - _started(m) > older_than:
            log.warning("publish: removing abandoned upload %s (no marker names it; started %s)",
                        fs.unstrip_protocol(path), m.group(1))
            fs.rm(path, recursive=True)
            removed.append(fs.unstrip_protocol(path))
    return removed
