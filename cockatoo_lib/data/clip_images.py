"""Images for CLIP: reading a source's image column, turning images into cached pixels, and
collating those pixels into model inputs.

A source's image column may hold, per row, nothing (a text-only row), raw image bytes (a
Parquet binary column), a Hugging Face `Image` value ({"bytes", "path"}), or a reference: a
local path (relative to the source file's folder), a gs:// or s3:// URI, or an http(s) URL.
Prepare fetches every image and decodes it once, so the prepared splits hold the images'
bytes: a split's fingerprint then covers the images themselves (a changed image behind an
unchanged URL is new data), and later steps need no access to the original locations.

Cached pixels are the image processor's output before rescaling and normalization: uint8,
channels first, after resize and center crop. That is a quarter of float32's size and loses
nothing, since the processor resizes in uint8 too; the collator applies the processor's
rescale factor, mean and std per batch (about a millisecond for 16 images).
"""

from __future__ import annotations

import hashlib
import io
import logging
import posixpath
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from cockatoo_lib.cpus import available_cpus
from cockatoo_lib.errors import CockatooError
from cockatoo_lib.plan.limits import MAX_IMAGE_PIXELS
from cockatoo_lib.storage import remote

log = logging.getLogger(__name__)

PIXEL_COLUMN = "pixel_values"
# Image processors are loaded with the PIL backend everywhere: its output does not depend on
# whether torchvision happens to be installed, so a cache entry means the same pixels on
# every machine.
IMAGE_BACKEND = "pil"
# A JPEG is decoded at 1/2, 1/4 or 1/8 of its size straight from its DCT (Pillow's draft) where
# that still leaves at least twice the pixels the model's resize keeps: a 12-megapixel photo for
# a 224 x 224 model decodes at 1/4, in a sixteenth of the memory and a fraction of the time. Part
# of the tokenize cache's identity, since the pixels differ slightly from a full decode's.
IMAGE_DECODE = "draft2x"


def workers() -> int:
    """Threads that fetch and decode images: I/O-bound fetches overlap, so four per CPU the
    process may use (a pod's limit, not the node's cores)."""
    return min(16, 4 * available_cpus())


# --------------------------------------------------------------------------- prepare


class ImageStore:
    """Fetched images spilled to an Arrow file in a temporary folder, so prepare holds an id
    per row rather than the bytes: its memory stays flat however many images a data set has.
    Ids are assigned in order; `take` reads them back, memory-mapped."""

    BATCH = 256

    def __init__(self):
        self._folder = tempfile.TemporaryDirectory(prefix="cockatoo-images-")
        self._path = Path(self._folder.name) / "images.arrow"
        self._writer, self._pending, self._count, self._batches = None, [], 0, None

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(self, *exc) -> None:
        if self._writer is not None and self._batches is None:
            self._writer.close()
        self._batches = None
        self._folder.cleanup()

    def add(self, data: bytes) -> int:
        self._pending.append(data)
        if len(self._pending) >= self.BATCH:
            self._flush()
        self._count += 1
        return self._count - 1

    def _flush(self) -> None:
        if self._writer is None:
            self._writer = pa.ipc.new_file(str(self._path), pa.schema([("image", pa.large_binary())]))
        if self._pending:
            self._writer.write_batch(pa.record_batch([pa.array(self._pending, pa.large_binary())],
                                                     names=["image"]))
            self._pending = []

    def take(self, ids: np.ndarray) -> pa.Array:
        """The images of `ids` as a binary array; null where an id is negative (no image)."""
        if self._batches is None:
            self._flush()
            self._writer.close()
            reader = pa.ipc.open_file(pa.memory_map(str(self._path)))
            self._batches = [reader.get_batch(k).column(0) for k in range(reader.num_record_batches)]
        # Every batch but the last holds BATCH images, so an id names its batch and place.
        # (Arrow's own take on a chunked column would first concatenate all of it in memory.)
        return pa.array([None if i < 0 else self._batches[i // self.BATCH][i % self.BATCH].as_py()
                         for i in ids.tolist()], pa.binary())


@dataclass
class ImageColumn:
    """One source's images: an id in the ImageStore per row (-1: no image), a content hash per
    row ("" for none), and the rows to drop (missing or corrupt, policy `drop`)."""

    ids: np.ndarray
    digests: np.ndarray  # object: str
    bad: np.ndarray
    stats: dict = field(default_factory=dict)


class _Missing(Exception):
    pass


def _reference(value, folder: str) -> bytes | str | None:
    """Bytes, a URI/path to fetch, or None for a row without an image."""
    if isinstance(value, dict):  # a Hugging Face Image value
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value) if len(value) else None
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
        if "://" in value:
            return value
        local = Path(value).expanduser()
        if local.is_absolute():
            return str(local)
        return posixpath.join(folder, value) if "://" in folder else str(Path(folder) / value)
    raise TypeError(type(value).__name__)


class Fetch(BaseModel):
    """How image URLs are fetched (a data config's `image_fetch`): each request may wait
    `timeout_seconds` to connect and between bytes; a transient failure (408, 429, 5xx, a reset
    or timed-out connection) is tried again, up to `attempts` requests in all, with exponential
    backoff (0.5 s, 1 s, 2 s, ... at most 30 s) or as long as the host's Retry-After asks (at
    most 60 s)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    attempts: int = Field(default=4, ge=1, le=20)


TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_sessions = threading.local()


def _http_session(fetch: Fetch):
    """One requests session per thread and setting: urllib3's Retry does the retrying."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    cache = getattr(_sessions, "by_fetch", None) or {}
    _sessions.by_fetch = cache
    if fetch not in cache:
        retries = fetch.attempts - 1
        retry = Retry(total=retries, connect=retries, read=retries, status=retries, other=0,
                      backoff_factor=0.5, backoff_max=30, status_forcelist=TRANSIENT_STATUS,
                      allowed_methods=frozenset({"GET"}), respect_retry_after_header=True,
                      retry_after_max=60, raise_on_status=False)
        session = requests.Session()
        session.mount("http://", HTTPAdapter(max_retries=retry))
        session.mount("https://", HTTPAdapter(max_retries=retry))
        cache[fetch] = session
    return cache[fetch]


def fetch_http(url: str, fetch: Fetch) -> bytes:
    import requests

    hint = (f"after {fetch.attempts} attempts with a {fetch.timeout_seconds:g} s timeout; a slow or busy "
            "host needs a larger image_fetch.timeout_seconds or image_fetch.attempts in the data config")
    try:
        response = _http_session(fetch).get(url, timeout=fetch.timeout_seconds)
    except requests.exceptions.RequestException as exc:
        reason = type(exc).__name__
        if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            reason = "no answer" if "timed out" in str(exc).lower() else "connection failed"
        raise OSError(f"{reason} {hint}") from None
    if response.status_code in (404, 410):
        raise _Missing(f"not found (HTTP {response.status_code})")
    if response.status_code in TRANSIENT_STATUS:
        raise OSError(f"HTTP {response.status_code} {response.reason} {hint}")
    if response.status_code >= 400:
        raise OSError(f"HTTP {response.status_code} {response.reason}")
    return response.content


def _fetch(uri: str, fetch: Fetch) -> bytes:
    if uri.startswith(("http://", "https://")):
        return fetch_http(uri, fetch)
    try:  # gcsfs and s3fs retry transient errors themselves
        fs, path = remote.url_to_fs(uri, timeout=fetch.timeout_seconds)
        return fs.cat_file(path)
    except FileNotFoundError:
        raise _Missing("not found") from None
    except IsADirectoryError:
        raise _Missing("is a folder") from None


def check_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> str | None:
    """Why these bytes are not a usable image, or None when they are."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                return f"{width} x {height} pixels, over the limit of {max_pixels:,}"
            image.draft(image.mode, (1, 1))  # a JPEG at 1/8: every byte is still decoded
            image.load()  # a decode: verify() misses truncated files
    except UnidentifiedImageError:
        return "not an image file"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def _load_one(ref: bytes | str, fetch: Fetch) -> tuple[bytes | None, str | None, bool]:
    """(bytes, problem, missing). Errors other than a missing file (no permission, a host
    that does not answer) are not the row's fault, so they propagate."""
    data = ref
    if isinstance(ref, str):
        try:
            data = _fetch(ref, fetch)
        except _Missing as exc:
            return None, str(exc), True
    problem = check_image(data)
    return (None, problem, False) if problem else (data, None, False)


def load_image_column(values: pd.Series, folder: str, source: str, where: str,
                      column: str, policy: str, store: ImageStore, fetch: Fetch = Fetch(),
                      first_row: int = 0) -> ImageColumn:
    """Fetch and decode-check every image of one source (or of a batch of its rows starting at
    data row `first_row` + 1) into `store`. A missing or corrupt image is an error naming the
    row and the path, unless `policy` is `drop`."""
    refs = []
    for row, value in enumerate(values.tolist()):
        try:
            refs.append(_reference(value, folder))
        except TypeError as exc:
            raise CockatooError(f"source {source} ({where}), column {column!r}, "
                                f"data row {first_row + row + 1}: "
                                f"holds a {exc}; expected a path, URI, URL or image bytes") from None
    present = [i for i, r in enumerate(refs) if r is not None]
    ids = np.full(len(refs), -1, dtype=np.int64)
    digests = np.full(len(refs), "", dtype=object)
    bad = np.zeros(len(refs), dtype=bool)
    stats = {"images": 0, "images_missing": 0, "images_corrupt": 0}

    def load(i):
        try:
            data, problem, missing = _load_one(refs[i], fetch)
        except Exception as exc:  # noqa: BLE001 - permission, network: name the image, stop
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CockatooError(f"source {source} ({where}), column {column!r}, "
                                f"data row {first_row + i + 1}: "
                                f"cannot read image {refs[i]}: {detail}") from None
        return data, hashlib.sha256(data).hexdigest() if data else "", problem, missing

    with ThreadPoolExecutor(workers()) as pool:
        results = tqdm(pool.map(load, present), total=len(present), desc=f"images {source}",
                       unit="img", disable=len(present) < 1000)
        for i, (data, digest, problem, missing) in zip(present, results):
            if problem is None:
                ids[i], digests[i] = store.add(data), digest
                stats["images"] += 1
                continue
            shown = refs[i] if isinstance(refs[i], str) else "(image bytes in the column)"
            message = (f"source {source} ({where}), column {column!r}, data row {first_row + i + 1}: image "
                       f"{shown} {problem if missing else 'cannot be decoded: ' + problem}")
            if policy != "drop":
                raise CockatooError(message + "; fix it, or set bad_images: drop in the data config")
            if not bad.any():
                log.warning("%s; dropping such rows (bad_images: drop)", message)
            bad[i] = True
            stats["images_missing" if missing else "images_corrupt"] += 1
    return ImageColumn(ids, digests, bad, stats)


# --------------------------------------------------------------------------- tokenize


def load_image_processor(base_model: str):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(base_model, backend=IMAGE_BACKEND)
    except (OSError, ValueError) as exc:
        raise CockatooError(f"cannot load the image processor of {base_model}: "
                            f"{str(exc).strip().splitlines()[0]} (offline? set base_model to a local folder)"
                            ) from None


def pixel_spec(processor) -> dict:
    """What the collator needs to turn cached uint8 pixels into the processor's output."""
    crop = processor.crop_size if processor.do_center_crop else processor.size
    return {"shape": [3, crop["height"], crop["width"]], "dtype": "uint8",
            "rescale_factor": float(processor.rescale_factor) if processor.do_rescale else 1.0,
            "image_mean": list(processor.image_mean) if processor.do_normalize else [0.0] * 3,
            "image_std": list(processor.image_std) if processor.do_normalize else [1.0] * 3}


def to_pixels(images: list[bytes | None], processor) -> list[bytes | None]:
    """Encoded images -> uint8 channels-first pixels (as bytes), resized and cropped."""
    from PIL import Image, ImageOps

    present = [i for i, data in enumerate(images) if data is not None]
    out: list[bytes | None] = [None] * len(images)
    if not present:
        return out

    crop = processor.crop_size if processor.do_center_crop else processor.size
    draft = (2 * max(crop.get("height", 0), crop.get("shortest_edge", 0)),) * 2

    def one(i):
        with Image.open(io.BytesIO(images[i])) as image:
            image.draft(image.mode, draft)  # IMAGE_DECODE; other formats decode in full
            upright = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
            pixels = processor(upright, do_rescale=False, do_normalize=False,
                               return_tensors="np")["pixel_values"][0]
        return np.clip(np.rint(pixels), 0, 255).astype(np.uint8).tobytes()

    with ThreadPoolExecutor(workers()) as pool:
        for i, data in zip(present, pool.map(one, present)):
            out[i] = data
    return out


def collate_pixels(values: list[bytes | None], spec: dict) -> dict:
    """pixel_values (normalized) and has_image for a batch; nothing if no row has an image."""
    import torch  # not at the top: prepare uses this module and has no need of torch

    has_image = torch.tensor([v is not None for v in values])
    if not has_image.any():
        return {}
    raw = np.zeros((len(values), *spec["shape"]), dtype=np.uint8)
    for i, data in enumerate(values):
        if data is not None:
            raw[i] = np.frombuffer(data, dtype=np.uint8).reshape(spec["shape"])
    # (x * rescale - mean) / std as one multiply and one add, in place.
    std = torch.tensor(spec["image_std"]).view(-1, 1, 1)
    scale, shift = spec["rescale_factor"] / std, -torch.tensor(spec["image_mean"]).view(-1, 1, 1) / std
    pixels = torch.from_numpy(raw).float().mul_(scale).add_(shift)
    return {PIXEL_COLUMN: pixels, "has_image": has_image}
