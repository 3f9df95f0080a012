"""Remote storage with bounded waits. Every gs://, s3:// and http(s):// read and write goes
through here, so a host that accepts a connection and never answers fails the step within a
bound instead of stalling it. Image URLs have their own setting (a data config's
`image_fetch`); Hugging Face hub downloads keep the hub's own (HF_HUB_ETAG_TIMEOUT and
HF_HUB_DOWNLOAD_TIMEOUT, 10 s each by default)."""

from __future__ import annotations

import os

import fsspec

from cockatoo_lib.errors import CockatooError

TIMEOUT_SETTING = "COCKATOO_REMOTE_TIMEOUT_SECONDS"
DEFAULT_TIMEOUT_SECONDS = 60.0
# How long a silent host can hold a step: s3fs makes 5 attempts (botocore's own retrying is
# turned off beneath them), gcsfs 6 with up to ~31 s of backoff, http 1; each waits at most
# the timeout to connect and the timeout between bytes.


def timeout_seconds() -> float:
    """How long one request may wait to connect, or between bytes, in seconds."""
    raw = os.environ.get(TIMEOUT_SETTING, "")
    if not raw:
        return DEFAULT_TIMEOUT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 3600:
        raise CockatooError(f"{TIMEOUT_SETTING} must be a number of seconds above 0 and at most 3600; "
                            f"got {raw!r}")
    return value


def storage_options(uri: str, timeout: float | None = None) -> dict:
    """fsspec options that bound each request of `uri`'s file system."""
    seconds = timeout_seconds() if timeout is None else timeout
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    if protocol in ("gs", "gcs"):
        return {"requests_timeout": seconds}
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": seconds, "read_timeout": seconds,
                                  "retries": {"max_attempts": 1}}}
    if protocol in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(sock_connect=seconds,
                                                                   sock_read=seconds)}}
    return {}


def url_to_fs(uri: str, timeout: float | None = None):
    """fsspec's url_to_fs with bounded requests."""
    return fsspec.core.url_to_fs(uri, **storage_options(uri, timeout))


def open_read(uri: str):
    """Open `uri` for reading, decompressed by its suffix, with bounded requests."""
    return fsspec.open(uri, "rb", compression="infer", **storage_options(uri)).open()


def is_timeout(exc: BaseException) -> bool:
    """Whether `exc`, or what caused it, is a request that waited past its bound."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = type(exc).__name__
        if isinstance(exc, TimeoutError) or "Timeout" in name or "timed out" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def failure(exc: BaseException) -> str | None:
    """One line on why a remote call failed, or None when `exc` is not a storage failure (a
    bug, which should surface with its traceback)."""
    if is_timeout(exc):
        return timeout_hint()
    if isinstance(exc, OSError):
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def timeout_hint() -> str:
    return (f"no answer within {timeout_seconds():g} s per request; a slow host needs a larger "
            f"{TIMEOUT_SETTING}")
