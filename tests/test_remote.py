"""Remote reads that never get an answer fail within a bound, with one line naming the URL and
the setting that changes the bound."""

from __future__ import annotations

import time

import pytest
from helpers import SilentHost, error_line, run_cli, write_config

from cockatoo_lib.errors import CockatooError
from cockatoo_lib.storage import remote

SETTING = remote.TIMEOUT_SETTING


@pytest.fixture
def quick_timeout(monkeypatch):
    monkeypatch.setenv(SETTING, "1")


def _prepare_fails(uri, tmp_path, capsys, monkeypatch, bound_seconds):
    """Prepare one source at `uri`; it must fail within `bound_seconds`. Returns the error line."""
    config = write_config(tmp_path, [{"name": "src", "path": uri, "labels": {"scam": "label"}}])
    started = time.monotonic()
    code, _, err = run_cli(["prepare", "-c", config, "-o", tmp_path / "out"], capsys, monkeypatch)
    elapsed = time.monotonic() - started
    assert code == 2 and not (tmp_path / "out").exists()
    assert elapsed < bound_seconds, f"took {elapsed:.1f} s"
    return error_line(err)


def test_an_http_source_that_never_answers(quick_timeout, tmp_path, capsys, monkeypatch):
    with SilentHost() as host:
        url = f"{host}/posts.csv"
        line = _prepare_fails(url, tmp_path, capsys, monkeypatch, bound_seconds=20)
    assert f"source src: cannot open {url}: no answer within 1 s per request" in line
    assert SETTING in line


def test_an_s3_source_that_never_answers(tmp_path, capsys, monkeypatch):
    import s3fs

    monkeypatch.setenv(SETTING, "0.3")
    with SilentHost() as host:
        monkeypatch.setenv("AWS_ENDPOINT_URL", host)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
        s3fs.S3FileSystem.clear_instance_cache()  # instances remember their endpoint
        try:
            # s3fs: 5 attempts, each waiting 0.3 s to connect and 0.3 s between bytes, and backing
            # off between them: ~7 s here, where botocore's defaults would wait minutes. The bound
            # leaves room for a busy machine.
            line = _prepare_fails("s3://posts/d.csv", tmp_path, capsys, monkeypatch, bound_seconds=20)
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
    assert "source src: cannot open s3://posts/d.csv: no answer within 0.3 s per request" in line
    assert SETTING in line


def test_a_gcs_source_that_never_answers(quick_timeout, tmp_path, capsys, monkeypatch):
    import gcsfs
    import gcsfs.retry

    async def no_backoff(_seconds):  # gcsfs waits up to ~31 s between its 6 attempts
        return None

    with SilentHost() as host:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", host)
        monkeypatch.setattr(gcsfs.retry.asyncio, "sleep", no_backoff, raising=True)
        gcsfs.GCSFileSystem.clear_instance_cache()
        try:
            line = _prepare_fails("gs://posts/d.csv", tmp_path, capsys, monkeypatch, bound_seconds=30)
        finally:
            gcsfs.GCSFileSystem.clear_instance_cache()
    assert "source src: cannot open gs://posts/d.csv: no answer within 1 s per request" in line


@pytest.mark.parametrize("value", ["0", "-3", "soon", "7200"])
def test_the_timeout_setting_is_checked(value, monkeypatch):
    monkeypatch.setenv(SETTING, value)
    with pytest.raises(CockatooError, match=f"{SETTING} must be a number of seconds"):
        remote.timeout_seconds()


def test_each_store_gets_the_bound(monkeypatch):
    monkeypatch.setenv(SETTING, "7")
    assert remote.storage_options("gs://b/x")["requests_timeout"] == 7
    s3 = remote.storage_options("s3://b/x")["config_kwargs"]
    assert (s3["connect_timeout"], s3["read_timeout"]) == (7, 7)
    http = remote.storage_options("https://h/x")["client_kwargs"]["timeout"]
    assert (http.sock_connect, http.sock_read) == (7, 7)
    assert remote.storage_options("/local/x") == {}
