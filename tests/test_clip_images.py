"""CLIP with images, end to end: image columns in every form a source may hold them, cached
pixels, the classifier's per-row averaging, training and evaluation, and bad images.
Images are small generated ones; URLs are served on loopback, buckets by the emulators."""

import http.server
import io
import json
import threading
from functools import partial

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from helpers import check_reduced_forms, error_line, make_image, run_cli, write_config
from PIL import Image

from cockatoo_lib.data.clip_images import PIXEL_COLUMN, collate_pixels, load_image_processor
from cockatoo_lib.data.prepare import load_data_config, prepare
from cockatoo_lib.plan.catalogue import resolve_plan
from cockatoo_lib.tokenize import load_tokenized, tokenize


def _split_images(out) -> pd.DataFrame:
    return pd.concat(pq.read_table(out / f"{s}.parquet").to_pandas()
                     for s in ("train", "validation", "test"))


@pytest.fixture
def http_folder(tmp_path):
    """A folder served over HTTP on loopback: (folder, base URL)."""
    folder = tmp_path / "web"
    folder.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


# ------------------------------------------------------------------ data


def test_image_column_holds_paths_uris_bytes_and_hub_images(tmp_path):
    import datasets

    jpeg, png, gray = (make_image(tmp_path / "a.jpg", 1), make_image(tmp_path / "b.png", 2, fmt="PNG"),
                       make_image(None, 3, mode="L"))
    pd.DataFrame({"text": ["relative", "absolute", "file uri", "no image", ""],
                  "image": ["a.jpg", str(tmp_path / "b.png"), f"file://{tmp_path}/a.jpg", None, "b.png"],
                  "label": [1, 0, 1, 0, 1]}).to_csv(tmp_path / "paths.csv", index=False)
    pd.DataFrame({"text": ["raw bytes", "bytes, no image"], "image": [gray, None],
                  "label": [1, 0]}).to_parquet(tmp_path / "bytes.parquet")
    (tmp_path / "hub" / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(
        {"text": ["hub image"], "image": [{"bytes": png, "path": None}], "label": [0]},
        features=datasets.Features({"text": datasets.Value("string"), "image": datasets.Image(),
                                    "label": datasets.Value("int64")}),
    ).to_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    config = write_config(tmp_path, [
        {"name": "paths", "path": "paths.csv", "image_column": "image", "labels": {"scam": "label"}},
        {"name": "bytes", "path": "bytes.parquet", "image_column": "image", "labels": {"scam": "label"}},
        {"name": "hub", "hub": str(tmp_path / "hub"), "image_column": "image", "labels": {"scam": "label"}},
        {"name": "plain", "path": "paths.csv", "labels": {"toxicity": "label"}},
    ], dedup="keep_all", labels=["scam", "toxicity"])
    manifest = prepare(load_data_config(str(config)), tmp_path / "out")
    rows = _split_images(tmp_path / "out").set_index(["source", "text"])["image"]
    assert rows[("paths", "relative")] == jpeg and rows[("paths", "file uri")] == jpeg
    assert rows[("paths", "absolute")] == png and rows[("paths", "")] == png  # image-only row kept
    assert rows[("bytes", "raw bytes")] == gray and rows[("hub", "hub image")] == png
    assert rows[("paths", "no image")] is None and rows[("bytes", "bytes, no image")] is None
    assert rows.loc["plain"].isna().all()  # a source without an image column: text-only rows
    assert manifest["sources"]["paths"]["images"] == 4
    assert manifest["sources"]["plain"]["empty_rows_dropped"] == 1
    assert sum(s["images"] for s in manifest["splits"].values()) == 6
    assert manifest["images"] == {"column": "image", "bad_images": "error", "dropped": 0}


def test_image_urls_are_fetched_and_a_missing_one_names_row_and_url(http_folder, tmp_path, capsys,
                                                                    monkeypatch):
    folder, url = http_folder
    served = make_image(folder / "cat.jpg", 5)
    frame = pd.DataFrame({"text": ["served", "gone", "none"],
                          "image": [f"{url}/cat.jpg", f"{url}/gone.jpg", None], "label": [1, 0, 1]})
    frame.to_csv(tmp_path / "web.csv", index=False)
    source = {"name": "web", "path": "web.csv", "image_column": "image", "labels": {"scam": "label"}}
    config = write_config(tmp_path, [source])
    code, _, err = run_cli(["prepare", "-c", config, "-o", tmp_path / "out"], capsys, monkeypatch)
    assert code == 2 and not (tmp_path / "out").exists()
    assert (f"source web ({tmp_path}/web.csv), column 'image', data row 2: image {url}/gone.jpg "
            "not found (HTTP 404); fix it, or set bad_images: drop") in error_line(err)

    config = write_config(tmp_path, [source], bad_images="drop")
    code, _, err = run_cli(["prepare", "-c", config, "-o", tmp_path / "out"], capsys, monkeypatch)
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["sources"]["web"]["images_missing"] == 1 and manifest["images"]["dropped"] == 1
    assert manifest["sources"]["web"]["rows_kept"] == 2
    assert served in _split_images(tmp_path / "out")["image"].tolist()


def test_an_image_host_that_does_not_answer_stops_prepare_even_when_dropping(tmp_path, capsys,
                                                                            monkeypatch):
    from helpers import free_port

    url = f"http://127.0.0.1:{free_port()}/cat.jpg"  # nothing listens there
    pd.DataFrame({"text": ["a"], "image": [url], "label": [1]}).to_csv(tmp_path / "d.csv", index=False)
    config = write_config(tmp_path, [{"name": "d", "path": "d.csv", "image_column": "image",
                                      "labels": {"scam": "label"}}], bad_images="drop")
    code, _, err = run_cli(["prepare", "-c", config, "-o", tmp_path / "out"], capsys, monkeypatch)
    assert code == 2 and not (tmp_path / "out").exists()
    assert f"column 'image', data row 1: cannot read image {url}: " in error_line(err)


class FlakyHandler(http.server.SimpleHTTPRequestHandler):
    """Fails the first request for each image once (how depends on the name), then serves it."""

    seen: dict = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        first = self.path not in self.seen
        self.seen[self.path] = self.seen.get(self.path, 0) + 1
        if first and "busy" in self.path:
            self.send_response(503)
            self.send_header("Retry-After", "1")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif first and "limited" in self.path:
            self.send_response(429)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif first and "reset" in self.path:
            self.connection.shutdown(2)  # close the connection without an answer
        else:
            super().do_GET()


def test_transient_failures_of_an_image_host_are_retried(tmp_path):
    folder = tmp_path / "web"
    folder.mkdir()
    names = ["busy.jpg", "limited.jpg", "reset.jpg"]
    images = [make_image(folder / name, i) for i, name in enumerate(names)]
    FlakyHandler.seen = {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(FlakyHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        pd.DataFrame({"text": names, "image": [f"{url}/{n}" for n in names], "label": [1, 0, 1]}).to_csv(
            tmp_path / "d.csv", index=False)
        config = write_config(tmp_path, [{"name": "d", "path": "d.csv", "image_column": "image",
                                          "labels": {"scam": "label"}}])
        prepare(load_data_config(str(config)), tmp_path / "out")
    finally:
        server.shutdown()
    rows = _split_images(tmp_path / "out").set_index("text")["image"]
    assert [rows[n] for n in names] == images
    assert FlakyHandler.seen == {f"/{n}": 2 for n in names}  # one failure, one success each


PREPARE = """
import sys
from cockatoo_lib.data.prepare import load_data_config, prepare
prepare(load_data_config(sys.argv[1]), sys.argv[2])
"""


def test_a_host_that_accepts_and_never_answers_fails_within_the_timeout(tmp_path):
    import socket
    import subprocess
    import sys

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # connections are accepted by the kernel and never answered
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/cat.jpg"
    try:
        pd.DataFrame({"text": ["a"], "image": [url], "label": [1]}).to_csv(tmp_path / "d.csv", index=False)
        config = write_config(tmp_path, [{"name": "d", "path": "d.csv", "image_column": "image",
                                          "labels": {"scam": "label"}}],
                              image_fetch={"timeout_seconds": 0.5, "attempts": 2})
        done = subprocess.run([sys.executable, "-m", "pipelines.cli", "prepare", "-c", str(config), "-o",
                               str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    finally:
        listener.close()
    assert done.returncode == 2 and not (tmp_path / "out").exists()
    line = error_line(done.stderr)
    assert f"cannot read image {url}: no answer after 2 attempts with a 0.5 s timeout" in line
    assert "image_fetch.timeout_seconds" in line


@pytest.mark.parametrize("store", ["gcs", "s3"])
def test_images_in_buckets_by_uri_and_relative_to_the_source(store, request, tmp_path):
    fs, scheme = request.getfixturevalue(store), {"gcs": "gs", "s3": "s3"}[store]
    a, b = make_image(None, 7), make_image(None, 8, fmt="PNG")
    fs.pipe_file("cockatoo-data/memes/img/a.jpg", a)
    fs.pipe_file("cockatoo-data/other/b.png", b)
    with fs.open("cockatoo-data/memes/posts.csv", "w") as fh:
        pd.DataFrame({"text": ["relative", "full uri"],
                      "image": ["img/a.jpg", f"{scheme}://cockatoo-data/other/b.png"],
                      "label": [1, 0]}).to_csv(fh, index=False)
    config = write_config(tmp_path, [{"name": "m", "path": f"{scheme}://cockatoo-data/memes/posts.csv",
                                      "image_column": "image", "labels": {"scam": "label"}}])
    prepare(load_data_config(str(config)), tmp_path / "out")
    rows = _split_images(tmp_path / "out").set_index("text")["image"]
    assert rows["relative"] == a and rows["full uri"] == b


def _truncated_jpeg(path):
    path.write_bytes(make_image(None, 9, size=(200, 200))[:600])


BAD = {
    "missing file": (lambda p: None, "image {path} not found"),
    "not an image": (lambda p: p.write_bytes(b"<html>404</html>"),
                     "image {path} cannot be decoded: not an image file"),
    "truncated jpeg": (_truncated_jpeg, "image {path} cannot be decoded: Truncated File Read"),
    # A few kB that would decode to 30 million pixels: refused from the header.
    "too many pixels": (lambda p: _huge_png(p), "image {path} cannot be decoded: 6000 x 5000 pixels, over "
                                                "the limit of 25,000,000"),
}


def _huge_png(path):
    from PIL import Image

    Image.new("1", (6000, 5000)).save(path, "PNG")


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_image_is_an_error_naming_row_and_path_unless_dropped(case, tmp_path, capsys, monkeypatch):
    write, message = BAD[case]
    make_image(tmp_path / "good.jpg", 1)
    write(tmp_path / "bad.jpg")
    pd.DataFrame({"text": ["good", "bad", "text only"], "image": ["good.jpg", "bad.jpg", None],
                  "label": [1, 0, 1]}).to_csv(tmp_path / "d.csv", index=False)
    source = {"name": "d", "path": "d.csv", "image_column": "image", "labels": {"scam": "label"}}
    code, _, err = run_cli(["prepare", "-c", write_config(tmp_path, [source]), "-o", tmp_path / "out"],
                           capsys, monkeypatch)
    assert code == 2 and not (tmp_path / "out").exists()
    line = error_line(err)
    assert "source d" in line and "data row 2" in line
    assert message.format(path=tmp_path / "bad.jpg") in line

    config = write_config(tmp_path, [source], bad_images="drop")
    manifest = prepare(load_data_config(str(config)), tmp_path / "out")
    kind = "images_missing" if case == "missing file" else "images_corrupt"
    assert manifest["sources"]["d"][kind] == 1 and manifest["images"]["dropped"] == 1
    assert sorted(_split_images(tmp_path / "out")["text"]) == ["good", "text only"]


def test_image_column_of_the_wrong_kind_or_name(tmp_path, capsys, monkeypatch):
    pd.DataFrame({"text": ["a", "b"], "image": [1.5, 2.5], "label": [1, 0]}).to_csv(tmp_path / "d.csv",
                                                                                   index=False)
    source = {"name": "d", "path": "d.csv", "image_column": "image", "labels": {"scam": "label"}}
    code, _, err = run_cli(["prepare", "-c", write_config(tmp_path, [source]), "-o", tmp_path / "out"],
                           capsys, monkeypatch)
    assert code == 2
    assert "data row 1: holds a float; expected a path, URI, URL or image bytes" in error_line(err)
    source["image_column"] = "picture"
    code, _, err = run_cli(["prepare", "-c", write_config(tmp_path, [source]), "-o", tmp_path / "out"],
                           capsys, monkeypatch)
    assert code == 2 and "image column 'picture' not found; columns: text, image, label" in error_line(err)


def test_image_store_gives_back_what_it_was_given_across_batches():
    from cockatoo_lib.data.clip_images import ImageStore

    blobs = [f"image {i}".encode() * (1 + i % 5) for i in range(2 * ImageStore.BATCH + 37)]
    with ImageStore() as store:
        ids = np.array([store.add(b) for b in blobs])
        wanted = np.array([len(blobs) - 1, -1, 0, ImageStore.BATCH, ImageStore.BATCH - 1, -1, 300])
        assert store.take(wanted).to_pylist() == [None if i < 0 else blobs[i] for i in wanted]
        assert store.take(ids).to_pylist() == blobs


def test_same_caption_with_different_images_is_not_a_duplicate(tmp_path):
    make_image(tmp_path / "a.jpg", 1)
    make_image(tmp_path / "b.jpg", 2)
    pd.DataFrame({"text": ["lol"] * 4, "image": ["a.jpg", "b.jpg", "a.jpg", None],
                  "label": [1, 0, 1, 0]}).to_csv(tmp_path / "d.csv", index=False)
    config = write_config(tmp_path, [{"name": "d", "path": "d.csv", "image_column": "image",
                                      "labels": {"scam": "label"}}])
    manifest = prepare(load_data_config(str(config)), tmp_path / "out")
    assert manifest["sources"]["d"]["duplicates_dropped"] == 1 and manifest["sources"]["d"]["rows_kept"] == 3


# ------------------------------------------------------------------ tokenize


def test_tokenize_caches_uint8_pixels_that_collate_to_the_processor_output(image_data, tiny_models,
                                                                          tmp_path):
    plan = resolve_plan("clip-vit", {"base_model": str(tiny_models["clip-vit"])})
    info = tokenize(image_data / "data", plan, tmp_path / "tok", cache_root=str(tmp_path / "cache"))
    assert info["images"]["rows"] == {s: v["images"] for s, v in json.loads(
        (image_data / "data" / "manifest.json").read_text())["splits"].items()}
    assert info["images"]["shape"] == [3, 224, 224] and info["images"]["dtype"] == "uint8"
    assert info["images"]["mib_per_1000_images"] == pytest.approx(3 * 224 * 224 * 1000 / 2**20, rel=0.01)
    assert sum(info["truncated"].values()) > 0  # the long captions, cut at 77 tokens
    datasets, saved = load_tokenized(tmp_path / "tok")
    assert saved["truncated"] == info["truncated"] and max(datasets["train"]["length"]) == 77

    train = datasets["train"]
    rows = list(range(12))
    batch = collate_pixels([train[i][PIXEL_COLUMN] for i in rows], info["images"])
    originals = pq.read_table(image_data / "data" / "train.parquet", columns=["image"]).column(0).to_pylist()
    assert batch["has_image"].tolist() == [originals[i] is not None for i in rows]
    processor = load_image_processor(str(tiny_models["clip-vit"]))
    with_image = [i for i in rows if originals[i] is not None]
    expected = processor([Image.open(io.BytesIO(originals[i])) for i in with_image],
                         return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch[PIXEL_COLUMN][batch["has_image"]], expected, atol=1e-5, rtol=0)

    again = tokenize(image_data / "data", plan, tmp_path / "tok2", cache_root=str(tmp_path / "cache"))
    assert again["cache_hit"] and again["images"] == info["images"]


def test_pixels_follow_exif_orientation(tiny_models):
    from cockatoo_lib.data.clip_images import to_pixels

    image = Image.fromarray(np.tile(np.arange(300, dtype=np.uint8)[None, :, None], (100, 1, 3)) // 2)
    exif = image.getexif()
    exif[0x0112] = 6  # stored sideways; viewers rotate it 90 degrees clockwise
    stored = io.BytesIO()
    image.save(stored, format="PNG", exif=exif)
    processor = load_image_processor(str(tiny_models["clip-vit"]))
    (pixels,) = to_pixels([stored.getvalue()], processor)
    upright = processor(image.rotate(-90, expand=True), do_rescale=False, do_normalize=False,
                        return_tensors="np")["pixel_values"][0]
    assert np.frombuffer(pixels, dtype=np.uint8).reshape(3, 224, 224).tolist() == upright.astype(
        np.uint8).tolist()


def test_text_model_on_image_data_uses_the_text(image_data, tiny_models, tmp_path, caplog):
    plan = resolve_plan("deberta", {"base_model": str(tiny_models["deberta"])})
    info = tokenize(image_data / "data", plan, tmp_path / "tok", cache_root=str(tmp_path / "cache"))
    assert "images" not in info
    assert PIXEL_COLUMN not in load_tokenized(tmp_path / "tok")[0]["train"].column_names
    assert "deberta reads text only; the data's images are not used" in caplog.text


# ------------------------------------------------------------------ model


def test_classifier_averages_image_and_text_embeddings_per_row(tiny_models):
    from cockatoo_lib.training.models import load_base_model

    plan = resolve_plan("clip-vit", {"base_model": str(tiny_models["clip-vit"])})
    model = load_base_model(plan, ["scam", "toxicity"]).eval()
    torch.manual_seed(0)
    input_ids = torch.randint(5, 100, (4, 9))
    pixels = torch.randn(4, 3, 224, 224)
    has_image = torch.tensor([True, False, True, False])
    with torch.no_grad():
        mixed = model(input_ids=input_ids, pixel_values=pixels, has_image=has_image).logits
        text = model.clip.get_text_features(input_ids=input_ids).pooler_output
        image = model.clip.get_image_features(pixel_values=pixels).pooler_output
        text_only = model(input_ids=input_ids).logits
    expected = model.head(torch.where(has_image[:, None], (text + image) / 2, text))
    torch.testing.assert_close(mixed, expected)
    torch.testing.assert_close(mixed[~has_image], text_only[~has_image])  # no image: text alone
    assert not torch.allclose(mixed[has_image], text_only[has_image])


# ------------------------------------------------------------------ train and evaluate


def test_clip_with_images_trains_saves_loads_and_evaluates(trained_clip, image_data, tmp_path):
    from transformers import AutoImageProcessor

    from cockatoo_lib.evaluation.evaluate import evaluate
    from cockatoo_lib.evaluation.metrics import macro_f1, sigmoid
    from cockatoo_lib.training.collate import PaddingCollator
    from cockatoo_lib.training.models import load_trained_model, predict_logits

    manifest, model_dir, tok = trained_clip["manifest"], trained_clip["model"], trained_clip["tok"]
    assert manifest["train_images"] > 0
    saved = AutoImageProcessor.from_pretrained(str(model_dir), backend="pil")
    assert saved.crop_size == {"height": 224, "width": 224}

    datasets, info = load_tokenized(tok)
    val = datasets["validation"]
    model = load_trained_model(model_dir, "clip")
    collate = PaddingCollator(0, pixels=info["images"])
    logits = predict_logits(model, [collate([val[i] for i in range(s, min(s + 8, len(val)))])
                                    for s in range(0, len(val), 8)])
    thresholds = list(manifest["thresholds"].values())
    assert macro_f1(sigmoid(logits.numpy()), np.asarray(val["labels"]), np.asarray(val["label_mask"]),
                    thresholds) == pytest.approx(manifest["validation_macro_f1_tuned"])

    results = evaluate(model_dir, tok, tmp_path / "eval", data_dir=image_data / "data")
    assert results["model_type"] == "clip-vit" and results["rows"] == len(datasets["test"])
    assert (tmp_path / "eval" / "report.html").exists()


@pytest.mark.slow
def test_clip_scores_texts_with_images_in_each_reduced_form(trained_clip, tmp_path):
    pictures = [make_image(tmp_path / f"{i}.jpg", seed=i) for i in range(4)]
    check_reduced_forms(trained_clip["model"], ["look", "a cat", "buy now", "hello"], [*pictures[:3], None])


def test_image_workers_follow_the_pods_cpu_limit_not_the_nodes_cores(tmp_path, monkeypatch):
    import os

    import torch

    from cockatoo_lib import cpus
    from cockatoo_lib.data import clip_images

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))  # a 64-core node
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # a pod limited to 1.5 CPUs (cgroup v2)
    monkeypatch.setattr(cpus, "CGROUP", tmp_path)
    assert cpus.available_cpus() == 2 and clip_images.workers() == 8
    threads = torch.get_num_threads()
    try:
        assert cpus.size_torch_threads() == 2 and torch.get_num_threads() == 2  # the server's
    finally:
        torch.set_num_threads(threads)
    (tmp_path / "cpu.max").write_text("max 100000\n")  # no limit
    assert cpus.available_cpus() == 64 and clip_images.workers() == 16
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000")  # cgroup v1: 3 CPUs
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cpus.available_cpus() == 3


def test_a_large_jpeg_is_decoded_reduced_and_its_pixels_stay_those_of_a_full_decode(tiny_models):
    from cockatoo_lib.data.clip_images import check_image, to_pixels

    photo = make_image(None, 5, size=(2000, 1500), fmt="JPEG")
    processor = load_image_processor(str(tiny_models["clip-vit"]))
    seen = []

    class Recording:  # the processor, noting the size of each image it is given
        def __getattr__(self, name):
            return getattr(processor, name)

        def __call__(self, image, **kwargs):
            seen.append(image.size)
            return processor(image, **kwargs)

    (pixels,) = to_pixels([photo], Recording())
    assert seen == [(1000, 750)]  # 1/2: the largest DCT scale that keeps 448 pixels on each side
    full = processor(Image.open(io.BytesIO(photo)), do_rescale=False, do_normalize=False,
                     return_tensors="np")["pixel_values"][0]
    reduced = np.frombuffer(pixels, dtype=np.uint8).reshape(3, 224, 224).astype(float)
    assert np.abs(reduced - full).mean() < 2.0  # of 255
    assert check_image(photo) is None
    assert "truncated" in check_image(photo[: len(photo) // 2])
