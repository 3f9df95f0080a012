"""Two runs sharing one tokenization cache: publishing is one step that readers see, a hit is
verified before it counts, and no run deletes what another may be writing. Each test runs
against the local filesystem, gcp-storage-emulator and moto's S3, all on this machine."""

import json
import os
import signal
import threading
import uuid

import pytest
from helpers import cli_main, error_line, forked, run_cli

import cockatoo_lib.storage.publish as publish_module
from cockatoo_lib.plan.catalogue import resolve_plan
from cockatoo_lib.storage.publish import clean_abandoned, read_published
from cockatoo_lib.tokenize import load_tokenized, tokenize

# Trains, runs pipelines or starts servers: `make test` runs these, `make test-fast` not.
pytestmark = pytest.mark.slow

STORES = ["local", "gcs", "s3"]


@pytest.fixture(params=STORES)
def cache(request, tmp_path):
    """(fsspec filesystem, cache root URI) on each kind of store, fresh per test."""
    if request.param == "local":
        import fsspec

        return fsspec.filesystem("file"), str(tmp_path / "cache")
    fs = request.getfixturevalue({"gcs": "gcs", "s3": "s3"}[request.param])
    scheme = {"gcs": "gs", "s3": "s3"}[request.param]
    return fs, f"{scheme}://cockatoo-data/cache-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def plan(tiny_models):
    return resolve_plan("deberta", {"base_model": str(tiny_models["deberta"])})


def _entry_root(fs, root, key):
    return f"{fs._strip_protocol(root)}/tokenized/{key}"


def _names(fs, path):
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def _loads(folder, rows):
    datasets, _ = load_tokenized(folder)
    assert {s: len(d) for s, d in datasets.items()} == rows


def test_two_runs_at_once_both_succeed_and_leave_one_entry(cache, small_data, plan, tmp_path):
    fs, root = cache
    args = ["tokenize", "-d", small_data, "-m", "deberta", "--set", f"base_model={plan.base_model}",
            "--cache-root", root]
    runs = [forked(cli_main, [*args, "-o", tmp_path / name]) for name in ("a", "b")]
    for run in runs:
        run.join(timeout=300)
        assert run.exitcode == 0  # its log is in the captured stderr
    rows = json.loads((tmp_path / "a" / "tokenized.json").read_text())["rows"]
    _loads(tmp_path / "a", rows)
    _loads(tmp_path / "b", rows)
    info = tokenize(small_data, plan, tmp_path / "c", cache_root=root)
    assert info["cache_hit"]
    _loads(tmp_path / "c", rows)
    entry = _entry_root(fs, root, info["cache_key"])
    assert [n for n in _names(fs, entry) if n.startswith("entry-")] == ["entry-000000.json"]


def test_a_reader_during_a_publish_neither_takes_nor_harms_it(cache, small_data, plan, tmp_path,
                                                              monkeypatch):
    fs, root = cache
    reached, release = threading.Event(), threading.Event()
    original = publish_module._before_marker

    def hold_first(location):  # the first writer stops between its data and its marker
        if not reached.is_set():
            reached.set()
            assert release.wait(120)
        original(location)

    monkeypatch.setattr(publish_module, "_before_marker", hold_first)
    results = {}
    writer = threading.Thread(target=lambda: results.update(a=tokenize(small_data, plan, tmp_path / "a",
                                                                       cache_root=root)))
    writer.start()
    assert reached.wait(120)
    # Mid-publish: the writer's data is there, its marker is not. The reader must not take the
    # data as an entry, nor remove it; it builds and publishes its own.
    b = tokenize(small_data, plan, tmp_path / "b", cache_root=root)
    entry = _entry_root(fs, root, b["cache_key"])
    assert not b["cache_hit"] and len([n for n in _names(fs, entry) if n.startswith("data-")]) == 2
    release.set()
    writer.join(120)
    rows = b["rows"]
    _loads(tmp_path / "a", rows)
    _loads(tmp_path / "b", rows)
    assert results["a"]["cache_uri"]  # the late writer finished and exits normally
    c = tokenize(small_data, plan, tmp_path / "c", cache_root=root)
    assert c["cache_hit"]
    _loads(tmp_path / "c", rows)


@pytest.mark.parametrize("poison", ["marker without data", "truncated file"])
def test_a_poisoned_entry_is_rebuilt_and_republished(poison, cache, small_data, plan, tmp_path, caplog):
    fs, root = cache
    first = tokenize(small_data, plan, tmp_path / "a", cache_root=root)
    entry = _entry_root(fs, root, first["cache_key"])
    if poison == "marker without data":
        data = fs._strip_protocol(first["cache_uri"])
        fs.rm(data, recursive=True)
    else:
        files = fs.find(fs._strip_protocol(first["cache_uri"]))
        arrow = sorted(p for p in files if p.endswith(".arrow"))[0]
        fs.pipe_file(arrow, fs.cat_file(arrow)[:100])
    second = tokenize(small_data, plan, tmp_path / "b", cache_root=root)
    assert not second["cache_hit"]
    assert "cache entry not usable, rebuilding" in caplog.text
    expected = "is missing" if poison == "marker without data" else "bytes where the marker lists"
    assert expected in caplog.text
    markers = [n for n in _names(fs, entry) if n.startswith("entry-")]
    assert markers == ["entry-000000.json", "entry-000001.json"]
    third = tokenize(small_data, plan, tmp_path / "c", cache_root=root)
    assert third["cache_hit"] and third["cache_uri"] == second["cache_uri"]
    for name in ("b", "c"):
        _loads(tmp_path / name, first["rows"])


def _publish_and_die(data, plan, out, root):
    publish_module._before_marker = lambda location: os.kill(os.getpid(), signal.SIGKILL)
    tokenize(data, plan, out, cache_root=root)


def test_a_publisher_killed_before_its_marker_leaves_nothing_a_reader_takes(cache, small_data, plan,
                                                                            tmp_path):
    fs, root = cache
    killed = forked(_publish_and_die, small_data, plan, tmp_path / "a", root)
    killed.join(timeout=300)
    assert killed.exitcode == -9
    assert not (tmp_path / "a").exists()
    info = tokenize(small_data, plan, tmp_path / "b", cache_root=root)
    assert not info["cache_hit"]
    _loads(tmp_path / "b", info["rows"])
    entry = _entry_root(fs, root, info["cache_key"])
    uploads = [n for n in _names(fs, entry) if n.startswith("data-")]
    assert len(uploads) == 2  # the dead writer's upload is young: it could still be anyone's
    # Once clearly abandoned, the upload no marker names is removed; the published one stays.
    removed = clean_abandoned(fs, entry, older_than=-1)
    assert len(removed) == 1 and info["cache_uri"] not in removed
    assert read_published(fs, entry).entry.uri == info["cache_uri"]
    assert tokenize(small_data, plan, tmp_path / "c", cache_root=root)["cache_hit"]
    _loads(tmp_path / "c", info["rows"])


def test_a_hit_whose_files_do_not_load_is_an_error_not_a_success(small_data, plan, tmp_path, capsys,
                                                                 monkeypatch):
    root = str(tmp_path / "cache")
    first = tokenize(small_data, plan, tmp_path / "a", cache_root=root)
    data = first["cache_uri"].removeprefix("file://")
    state = next(p for p in (tmp_path / "cache").rglob("state.json") if str(p).startswith(data))
    state.write_text("x" * len(state.read_text()))  # same size, so the marker's list still matches
    code, _, err = run_cli(["tokenize", "-d", small_data, "-o", tmp_path / "b", "-m", "deberta",
                            "--set", f"base_model={plan.base_model}", "--cache-root", root],
                           capsys, monkeypatch)
    assert code == 2 and "does not load" in error_line(err)
    assert not (tmp_path / "b").exists()


def test_the_run_that_loses_the_race_to_publish_gets_the_winners_entry(tmp_path):
    import fsspec

    fs, root = fsspec.filesystem("file"), str(tmp_path / "cache")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.txt").write_text(f"written by {name}")
    first = publish_module.publish(fs, root, tmp_path / "a", {"run": "a"}, 0)
    second = publish_module.publish(fs, root, tmp_path / "b", {"run": "b"}, 0)  # same generation
    assert second == first
    assert fs.cat(f"{second.uri}/x.txt") == b"written by a"
    assert len([n for n in fs.ls(root, detail=False) if "/data-" in n]) == 1  # the loser's upload is gone
