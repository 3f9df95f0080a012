"""Predict: the Classifier gives what the trained model gives, in input order; files in and out
in every format, local and in a bucket; bad input is one line and writes nothing."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import check_reduced_forms, error_line, run_cli

from cockatoo_lib.errors import CockatooError
from cockatoo_lib.evaluation.metrics import sigmoid
from cockatoo_lib.release.predict import Classifier, length_batches
from cockatoo_lib.tokenize import load_tokenized
from cockatoo_lib.training.collate import PaddingCollator
from cockatoo_lib.training.models import load_trained_model, predict_logits

# Trains, runs pipelines or starts servers: `make test` runs these, `make test-fast` not.
pytestmark = pytest.mark.slow


def test_classifier_scores_as_the_trained_model_in_input_order(trained_run):
    datasets, _ = load_tokenized(trained_run["tok"])
    test = datasets["test"]
    model = load_trained_model(trained_run["model"], "sequence-classification")
    batch = PaddingCollator(0)([test[i] for i in range(len(test))])
    expected = sigmoid(predict_logits(model, [batch]).numpy())

    classifier = Classifier.load(trained_run["model"])
    # Batches of 8 over rows sorted by length: the results must come back in input order.
    probs = classifier.predict_proba(test["text"], batch_size=8)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    # Batches bounded by padded tokens too (the server's): the same scores.
    np.testing.assert_allclose(classifier.predict_proba(test["text"], batch_size=64, max_batch_tokens=100),
                               expected, atol=1e-5)
    rows = classifier.predict(test["text"][:20])
    thresholds = classifier.manifest["thresholds"]
    for row, p in zip(rows, probs[:20]):
        assert row["probabilities"] == pytest.approx(dict(zip(classifier.labels, p)), abs=1e-5)
        assert row["labels"] == [x for x, v in zip(classifier.labels, p) if v >= thresholds[x]]
    assert classifier.predict([]) == []


def test_long_texts_are_cut_at_the_inference_max_length(trained_run):
    classifier = Classifier.load(trained_run["model"])
    seen = []
    forward = classifier.model.forward
    classifier.model.forward = lambda **batch: seen.append(batch["input_ids"].shape[1]) or forward(**batch)
    classifier.predict_proba(["word " * 5000, "short"])
    assert max(seen) == classifier.max_length == classifier.manifest["inference_max_length"]


@pytest.mark.parametrize("source, output", [("in.jsonl", "out.parquet"), ("in.parquet", "out.csv"),
                                            ("in.csv.gz", "out.jsonl")])
def test_predict_reads_and_writes_every_format(trained_run, tmp_path, capsys, monkeypatch, source, output):
    frame = pd.DataFrame({"body": ["win a free prize now", "007", "", "see you at lunch"],
                          "ref": ["a", "b", "c", "d"]})
    path = tmp_path / source
    {"jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     "parquet": lambda: frame.to_parquet(path),
     "gz": lambda: frame.to_csv(path, index=False)}[source.rsplit(".", 1)[1]]()
    code, out, _ = run_cli(["predict", "--model", trained_run["model"], "--input", path,
                            "--text-column", "body", "--output", tmp_path / output], capsys, monkeypatch)
    assert code == 0 and "4 rows" in out
    result = {"parquet": pd.read_parquet, "csv": lambda p: pd.read_csv(p, dtype={"body": str},
                                                                       keep_default_na=False),
              "jsonl": lambda p: pd.read_json(p, lines=True, dtype=False)}[output.rsplit(".", 1)[1]](
        tmp_path / output)
    assert list(result["ref"]) == ["a", "b", "c", "d"] and result["body"].iloc[1] == "007"
    expected = Classifier.load(trained_run["model"]).predict_proba(frame["body"].tolist())
    labels = trained_run["labels"]
    np.testing.assert_allclose(result[[f"p_{x}" for x in labels]].to_numpy(), expected, atol=1e-5)


def test_predict_from_a_bucket_to_a_bucket(trained_run, s3, tmp_path, capsys, monkeypatch):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put(str(trained_run["model"]) + "/", "s3://cockatoo/models/m/", recursive=True)
    pd.DataFrame({"text": ["hello there", "free money"]}).to_json(
        tmp_path / "in.jsonl", orient="records", lines=True)
    fs.put(str(tmp_path / "in.jsonl"), "s3://cockatoo/in.jsonl")
    code, _, err = run_cli(["predict", "--model", "s3://cockatoo/models/m", "--input", "s3://cockatoo/in.jsonl",
                            "--output", "s3://cockatoo/out/predictions.parquet"], capsys, monkeypatch)
    assert code == 0, err
    with fs.open("s3://cockatoo/out/predictions.parquet", "rb") as handle:
        result = pd.read_parquet(handle)
    assert list(result["text"]) == ["hello there", "free money"] and "labels" in result
    expected = Classifier.load(trained_run["model"]).predict_proba(["hello there", "free money"])
    columns = [f"p_{x}" for x in trained_run["labels"]]
    np.testing.assert_allclose(result[columns].to_numpy(), expected, atol=1e-5)


def _bad(tmp_path, write, args, trained_run=None):
    path = tmp_path / "in.csv"
    write(path)
    model = trained_run["model"] if trained_run else tmp_path
    return ["predict", "--model", model, "--input", path, "--output", tmp_path / "out" / "p.csv", *args]


@pytest.mark.parametrize("write, args, message", [
    (lambda p: pd.DataFrame({"body": ["x"]}).to_csv(p, index=False), [],
     "predict input {input}: text column 'text' not found; columns: body"),
    (lambda p: p.write_text(""), [], "predict input: {input} has no rows"),
    (lambda p: p.write_text("text\n"), [], "predict input: {input} has no rows"),
    (lambda p: pd.DataFrame({"text": ["x"]}).to_csv(p, index=False), ["--image-column", "img"],
     "predict input {input}: image column 'img' not found; columns: text"),
])
def test_bad_input_is_one_line_and_writes_nothing(trained_run, tmp_path, capsys, monkeypatch, write, args,
                                                  message):
    code, _, err = run_cli(_bad(tmp_path, write, args, trained_run), capsys, monkeypatch)
    assert code == 2 and error_line(err) == "error: " + message.format(input=tmp_path / "in.csv")
    assert not (tmp_path / "out").exists()


def test_a_folder_without_cockatoo_json_is_not_a_model(tmp_path, capsys, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    args = _bad(tmp_path, lambda p: pd.DataFrame({"text": ["x"]}).to_csv(p, index=False), [])
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 2
    assert error_line(err) == f"error: {tmp_path} is not a cockatoo model folder: it has no cockatoo.json"
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_never_replaced(trained_run, tmp_path, capsys, monkeypatch, s3):
    pd.DataFrame({"text": ["x"]}).to_csv(tmp_path / "in.csv", index=False)
    (tmp_path / "mine.csv").write_text("a user's file\n")
    s3.pipe("cockatoo-data/mine.csv", b"a user's object\n")
    for output in (tmp_path / "mine.csv", (tmp_path / "mine.csv").as_uri(), "s3://cockatoo-data/mine.csv"):
        code, _, err = run_cli(["predict", "--model", trained_run["model"], "--input", tmp_path / "in.csv",
                                "--output", output], capsys, monkeypatch)
        assert code == 2 and "already exists" in error_line(err), output
    assert (tmp_path / "mine.csv").read_text() == "a user's file\n"
    assert s3.cat("cockatoo-data/mine.csv") == b"a user's object\n"


def test_an_output_that_appears_while_predicting_is_left_alone(trained_run, tmp_path, monkeypatch):
    """Another run writes the same output between the check and the write: ours is not written."""
    import cockatoo_lib.release.predict as predicting

    pd.DataFrame({"text": ["x"]}).to_csv(tmp_path / "in.csv", index=False)
    monkeypatch.setattr(predicting, "_check_new_output", lambda output: None)
    (tmp_path / "out.csv").write_text("the other run's\n")
    with pytest.raises(CockatooError, match="appeared while predicting"):
        predicting.predict_file(str(trained_run["model"]), str(tmp_path / "in.csv"), tmp_path / "out.csv")
    assert (tmp_path / "out.csv").read_text() == "the other run's\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "out.csv"]


def test_a_text_model_refuses_images(trained_run):
    with pytest.raises(Exception, match="reads text only"):
        Classifier.load(trained_run["model"]).predict_proba(["x"], images=[None])


def test_a_text_model_scores_in_each_reduced_form(trained_run):
    check_reduced_forms(trained_run["model"], load_tokenized(trained_run["tok"])[0]["test"]["text"])


def test_modernbert_scores_in_each_reduced_form(tiny_models, tmp_path):
    """ModernBERT unpads its batches on the CPU; its head untrained: only the forms are checked."""
    from bench.predict_speed import demo_model_folder
    from cockatoo_lib.plan.catalogue import resolve_plan

    plan = resolve_plan("modernbert", {"base_model": str(tiny_models["modernbert"])})
    folder = demo_model_folder(tmp_path / "model", ["a", "b"], plan)
    check_reduced_forms(folder, ["hello there", "buy cheap pills now now now", "x", "a text with more words"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_classifier_on_cuda_agrees_with_cpu(trained_run):
    texts = ["win a free prize", "see you at lunch"] * 8
    cpu = Classifier.load(trained_run["model"], device="cpu").predict_proba(texts)
    cuda = Classifier.load(trained_run["model"], device="cuda").predict_proba(texts)
    np.testing.assert_allclose(cuda, cpu, atol=2e-2)  # bf16 autocast on CUDA


@pytest.mark.parametrize(("lengths", "batch_size", "max_tokens", "batches"), [
    ([1, 2, 3, 4, 5], 2, None, [(0, 2), (2, 4), (4, 5)]),
    ([10, 10, 10, 40, 200], 64, 60, [(0, 3), (3, 4), (4, 5)]),  # 4 x 40 > 60; 200 alone
    ([5] * 10, 4, 1000, [(0, 4), (4, 8), (8, 10)]),
    ([], 8, 100, []),
])
def test_batches_end_at_the_row_count_or_the_padded_token_count(lengths, batch_size, max_tokens, batches):
    assert length_batches(lengths, batch_size, max_tokens) == batches


# ------------------------------------------------------------------ a backlog into a folder of shards


def _backlog(tmp_path, rows=230):
    """Three input files of one backlog (CSV, gzipped JSONL, Parquet) in a folder."""
    texts = [f"post {i}: " + ("win a free prize now" if i % 3 == 0 else "see you at lunch")
             for i in range(rows)]
    frame = pd.DataFrame({"text": texts, "ref": [f"r{i}" for i in range(rows)]})
    folder = tmp_path / "backlog"
    folder.mkdir()
    cut = [0, 100, 170, rows]
    frame[cut[0]:cut[1]].to_csv(folder / "a.csv", index=False)
    frame[cut[1]:cut[2]].to_json(folder / "b.jsonl.gz", orient="records", lines=True)
    frame[cut[2]:cut[3]].to_parquet(folder / "c.parquet")
    return folder, frame


def _shards(folder):
    return pd.concat([pd.read_parquet(p) for p in sorted(folder.glob("part-*.parquet"))], ignore_index=True)


def test_a_backlog_is_scored_into_shards_that_a_rerun_finishes_and_never_rescores(trained_run, tmp_path,
                                                                                capsys, monkeypatch):
    import json

    from cockatoo_lib.release import predict

    folder, frame = _backlog(tmp_path)
    expected = pd.concat([pd.read_csv(folder / "a.csv"), pd.read_json(folder / "b.jsonl.gz", lines=True),
                          pd.read_parquet(folder / "c.parquet")], ignore_index=True)
    classifier = Classifier.load(trained_run["model"])
    want = classifier.predict_proba(expected["text"].tolist())

    # The first run dies after its second shard (a preempted pod).
    calls, real = [], Classifier.predict_proba

    def dies_on_the_third(self, texts, *args, **kwargs):
        calls.append(len(texts))
        if len(calls) == 3:
            raise RuntimeError("preempted")
        return real(self, texts, *args, **kwargs)

    monkeypatch.setattr(Classifier, "predict_proba", dies_on_the_third)
    out = tmp_path / "scored"
    argv = ["predict", "--model", trained_run["model"], "--input", folder, "--output", f"{out}/",
            "--shard-rows", "60"]
    with pytest.raises(RuntimeError, match="preempted"):
        run_cli(argv, capsys, monkeypatch)
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    monkeypatch.setattr(Classifier, "predict_proba", real)
    scored = []
    real_scored = predict._scored
    monkeypatch.setattr(predict, "_scored", lambda c, f, *a, **k: scored.append(len(f)) or
                        real_scored(c, f, *a, **k))
    code, stdout, err = run_cli(argv, capsys, monkeypatch)
    assert code == 0, err
    # Shards follow the files (a chunk never spans two): a.csv 60+40, b 60+10, c 60.
    assert scored == [60, 10, 60]  # only what the first run had not written
    result = _shards(out)
    assert result["ref"].tolist() == expected["ref"].tolist()
    np.testing.assert_allclose(result[[f"p_{x}" for x in classifier.labels]].to_numpy(), want, atol=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    hits = want >= classifier.thresholds
    assert manifest["rows"] == len(frame) and manifest["shards"] == 5
    assert manifest["positives"] == dict(zip(classifier.labels, hits.sum(axis=0).tolist()))
    assert manifest["rows_scored_by_this_run"] == 130
    assert f"{out}/: {len(frame)} rows" in stdout
    # Finished: a third run changes nothing.
    code, _, err = run_cli(argv, capsys, monkeypatch)
    assert code == 2 and "is finished already (it has manifest.json)" in error_line(err)


def test_a_shard_that_no_longer_matches_its_input_stops_the_rerun(trained_run, tmp_path, capsys, monkeypatch):
    folder, _ = _backlog(tmp_path)
    out = tmp_path / "scored"
    argv = ["predict", "--model", trained_run["model"], "--input", f"{folder}/*.csv", "--output", f"{out}/",
            "--shard-rows", "60"]
    assert run_cli(argv, capsys, monkeypatch)[0] == 0
    (out / "manifest.json").unlink()
    pd.read_csv(folder / "a.csv")[:70].to_csv(folder / "a.csv", index=False)  # the input changed
    code, _, err = run_cli(argv, capsys, monkeypatch)
    assert code == 2
    assert "part-00001.parquet holds 40 rows where this chunk of the input has 10" in error_line(err)
    code, _, err = run_cli([*argv[:4], f"{folder}/*.txt", *argv[5:]], capsys, monkeypatch)
    assert code == 2 and "matches no CSV, JSONL or Parquet file" in error_line(err)


def test_an_empty_file_among_many_is_skipped_and_an_unreadable_one_is_one_line(trained_run, tmp_path, capsys,
                                                                                monkeypatch):
    folder = tmp_path / "posts"
    folder.mkdir()
    pd.DataFrame({"text": ["win a prize", "see you"]}).to_csv(folder / "a.csv", index=False)
    (folder / "b.csv").write_text("")  # an hour without posts
    (folder / "b2.csv").write_text("text\n")  # another, with its header
    (folder / "c.parquet").write_bytes(b"PAR1 not parquet at all")
    out = tmp_path / "scored"
    argv = ["predict", "--model", trained_run["model"], "--input", folder, "--output", f"{out}/"]
    code, _, err = run_cli(argv, capsys, monkeypatch)
    line = error_line(err)
    assert code == 2, line
    assert line.startswith(f"error: predict input: cannot read {folder / 'c.parquet'} as parquet: "), line
    assert not (out / "manifest.json").exists()
    (folder / "c.parquet").unlink()
    code, _, err = run_cli(argv, capsys, monkeypatch)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == 2 and manifest["shards"] == 1  # no empty part for the empty files


def test_two_predicts_into_one_folder_one_wins_and_the_other_says_so(trained_run, tmp_path, capsys,
                                                                     monkeypatch):
    from cockatoo_lib.release import batch_predict, predict

    folder, _ = _backlog(tmp_path)
    out = tmp_path / "scored"
    argv = ["predict", "--model", trained_run["model"], "--input", folder, "--output", f"{out}/"]
    real_scored, started = predict._scored, []

    def other_run_finishes_first(*args, **kwargs):
        if not started:  # while this run scores its first shard, another run does the whole output
            started.append(True)
            batch_predict.predict_folder(str(trained_run["model"]), str(folder), f"{out}/")
        return real_scored(*args, **kwargs)

    monkeypatch.setattr(predict, "_scored", other_run_finishes_first)
    code, _, err = run_cli(argv, capsys, monkeypatch)
    assert code == 2
    assert error_line(err) == (f"error: predict output {out}/part-00000.parquet appeared while this run "
                               "scored it (another run on the same output?); run again to check it")
    manifest = json.loads((out / "manifest.json").read_text())  # the winner's, whole
    assert manifest["rows"] == sum(len(pd.read_parquet(p)) for p in out.glob("part-*.parquet"))


def test_a_long_input_is_tokenized_a_block_at_a_time_and_scores_the_same(trained_run, monkeypatch):
    from cockatoo_lib.release import predict

    classifier = Classifier.load(trained_run["model"])
    texts = [f"post {i}: " + "win a free prize " * (i % 9) for i in range(40)]
    whole = classifier.predict_proba(texts)
    sizes, call = [], type(classifier.tokenizer).__call__

    def counting(self, batch, *args, **kwargs):
        sizes.append(len(batch))
        return call(self, batch, *args, **kwargs)

    monkeypatch.setattr(predict, "TOKENIZE_ROWS", 16)
    monkeypatch.setattr(type(classifier.tokenizer), "__call__", counting)
    blocked = classifier.predict_proba(texts)
    assert sizes == [16, 16, 8]  # a backlog's chunk never has all its encodings in memory at once
    np.testing.assert_allclose(blocked, whole, atol=1e-6)
