"""Sources in buckets (against local emulators), compressed files, Hub data sets, and files that
are not what their suffix says. No network: every server here listens on loopback."""

import zipfile

import fsspec
import pandas as pd
import pytest
from helpers import BIN, error_line, free_port, run_cli, serve, without_coverage, write_config

from cockatoo_lib.data.prepare import load_data_config, prepare

ROWS = pd.DataFrame({"text": [f"row {i}" for i in range(20)], "label": [i % 2 for i in range(20)]})


def _prepare(config, out):
    return prepare(load_data_config(str(config)), out)


# Every compression suffix fsspec can open here; data dumps come as .gz, .bz2, .xz and .zst.
COMPRESSIONS = sorted(ext for ext, name in fsspec.utils.compressions.items()
                      if name in fsspec.compression.compr)


def test_the_common_compressions_are_available():
    assert {"gz", "bz2", "xz", "zst"} <= set(COMPRESSIONS)


def _write(frame: pd.DataFrame, fmt: str, handle) -> None:
    if fmt == "csv":
        handle.write(frame.to_csv(index=False).encode())
    elif fmt == "jsonl":
        handle.write(frame.to_json(orient="records", lines=True).encode())
    elif fmt == "json":
        handle.write(frame.to_json(orient="records").encode())
    else:
        frame.to_parquet(handle)


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json", "parquet"])
def test_each_format_under_each_compression(fmt, compression, tmp_path):
    name = f"rows.{fmt}.{compression}"
    if compression == "zip":  # fsspec reads a zip's single member; it does not write zips
        with zipfile.ZipFile(tmp_path / name, "w") as archive, archive.open(f"rows.{fmt}", "w") as fh:
            _write(ROWS, fmt, fh)
    else:
        with fsspec.open(str(tmp_path / name), "wb", compression="infer") as fh:
            _write(ROWS, fmt, fh)
    config = write_config(tmp_path, [{"name": "a", "path": name, "labels": {"scam": "label"}}])
    manifest = _prepare(config, tmp_path / "out")
    assert manifest["sources"]["a"]["rows_read"] == 20 and manifest["sources"]["a"]["rows_kept"] == 20


@pytest.mark.parametrize("store", ["gcs", "s3"])
def test_bucket_sources_and_a_config_in_a_bucket(store, request, tmp_path):
    fs, scheme = request.getfixturevalue(store), {"gcs": "gs", "s3": "s3"}[store]
    with fs.open("cockatoo-data/rows.parquet", "wb") as fh:
        ROWS.to_parquet(fh)
    with fs.open("cockatoo-data/config.yaml", "w") as fh:  # relative paths start at the config
        fh.write("labels: [scam]\nsources: [{name: b, path: rows.parquet, labels: {scam: label}}]\n")
    config = load_data_config(f"{scheme}://cockatoo-data/config.yaml")
    manifest = prepare(config, tmp_path / "out")
    assert manifest["sources"]["b"] == {
        "path": "rows.parquet", "license": None, "rows_read": 20, "items": 20, "empty_rows_dropped": 0,
        "annotates": ["scam"], "negative_for": [],
        "duplicates": 0, "conflicts": 0, "duplicates_dropped": 0, "rows_kept": 20}


@pytest.mark.parametrize("store, uri, message", [
    ("gcs", "gs://cockatoo-data/missing.csv", "not found: gs://cockatoo-data/missing.csv"),
    ("gcs", "gs://no-such-bucket/x.csv", "not found: gs://no-such-bucket/x.csv"),
    ("s3", "s3://cockatoo-data/missing.csv", "not found: s3://cockatoo-data/missing.csv"),
    ("s3", "s3://no-such-bucket/x.csv", "not found: s3://no-such-bucket/x.csv.*bucket does not exist"),
])
def test_missing_object_or_bucket_is_one_line(store, uri, message, request, tmp_path, capsys, monkeypatch):
    request.getfixturevalue(store)
    config = write_config(tmp_path, [{"name": "b", "path": uri, "labels": {"scam": "label"}}])
    code, _, err = run_cli(["prepare", "-c", config, "-o", tmp_path / "out"], capsys, monkeypatch)
    import re

    assert code == 2 and re.search(message, error_line(err))
    assert not (tmp_path / "out").exists()


def test_hub_source_from_a_local_folder_in_hub_layout(tmp_path):
    (tmp_path / "hubset" / "data").mkdir(parents=True)
    ROWS.iloc[:15].to_parquet(tmp_path / "hubset" / "data" / "train-00000-of-00001.parquet")
    ROWS.iloc[15:].to_parquet(tmp_path / "hubset" / "data" / "test-00000-of-00001.parquet")
    config = write_config(tmp_path, [{"name": "h", "hub": str(tmp_path / "hubset"), "split": "train",
                                      "labels": {"scam": "label"}}])
    manifest = _prepare(config, tmp_path / "out")
    assert manifest["sources"]["h"]["rows_read"] == 15
    assert manifest["sources"]["h"]["path"] == f"hub:{tmp_path / 'hubset'}"


def test_unreachable_hub_data_set_says_how_to_work_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = write_config(tmp_path, [{"name": "h", "hub": "cockatoo-test/does-not-exist",
                                      "labels": {"scam": "label"}}])
    code, _, err = run_cli(["prepare", "-c", config, "-o", tmp_path / "out"], capsys, monkeypatch)
    line = error_line(err)
    assert code == 2 and "cannot load hub data set cockatoo-test/does-not-exist" in line
    assert "point 'path' at a local copy" in line and "HF_HUB_OFFLINE" in line


BROKEN = {
    "corrupt parquet": ("d.parquet", b"PAR1 this is not parquet", r"cannot read .*d\.parquet as parquet"),
    "ragged csv": ("d.csv", b"text,label\na,1\nb,0,extra\n",
                   r"cannot read .*d\.csv as csv: .*Expected 2 fields in line 3, saw 3"),
    "json neither array nor lines": ("d.json", b'{"text": "a", "label": 1}\n{"text": "b"}',
                                     r"cannot read .*d\.json as json"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_files_are_one_line_errors(case, tmp_path, capsys, monkeypatch):
    name, content, pattern = BROKEN[case]
    (tmp_path / name).write_bytes(content)
    config = write_config(tmp_path, [{"name": "d", "path": name, "labels": {"scam": "label"}}])
    code, _, err = run_cli(["prepare", "-c", config, "-o", tmp_path / "out"], capsys, monkeypatch)
    import re

    assert code == 2 and re.search(pattern, error_line(err)), err
    assert not (tmp_path / "out").exists()


def test_source_needs_exactly_one_location(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path, [{"name": "d", "path": "a.csv", "hub": "x/y", "labels": {"scam": "l"}}])
    code, _, err = run_cli(["prepare", "-c", config, "-o", tmp_path / "out"], capsys, monkeypatch)
    assert code == 2 and "give exactly one of 'path' and 'hub'" in error_line(err)


def test_object_without_permission_is_one_line(s3, tmp_path, capsys, monkeypatch):
    """moto enforcing authentication after two setup calls: our reader's key is refused."""
    import boto3
    import s3fs

    port = free_port()
    process = serve([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], port,
                     env={**without_coverage(), "INITIAL_NO_AUTH_ACTION_COUNT": "2"})
    try:
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="locked")
        client.put_object(Bucket="locked", Key="d.csv", Body=b"text,label\na,1\n")
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        s3fs.S3FileSystem.clear_instance_cache()  # instances remember their endpoint
        source = {"name": "b", "path": "s3://locked/d.csv", "labels": {"scam": "label"}}
        config = write_config(tmp_path, [source])
        code, _, err = run_cli(["prepare", "-c", config, "-o", tmp_path / "out"], capsys, monkeypatch)
        assert code == 2 and "source b: no permission to read s3://locked/d.csv" in error_line(err)
        assert not (tmp_path / "out").exists()
    finally:
        process.kill()
        s3fs.S3FileSystem.clear_instance_cache()
