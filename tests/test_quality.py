"""Model quality: reproducible training, checkpoint selection that fits the loss, the head's
prior initialisation, the linear baseline, tokenizer diagnostics, per-source metrics, open label
names and the model card."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import error_line, run_cli, without_coverage, write_config
from transformers import EvalPrediction

from cockatoo_lib.data.prepare import load_data_config, prepare
from cockatoo_lib.evaluation.baseline import fit_predict
from cockatoo_lib.evaluation.evaluate import evaluate
from cockatoo_lib.evaluation.metrics import mean_average_precision, report, sigmoid
from cockatoo_lib.plan.catalogue import resolve_plan
from cockatoo_lib.tokenize import load_tokenized, tokenize
from cockatoo_lib.training.models import init_head_bias, load_base_model, output_layer
from cockatoo_lib.training.trainer import _compute_metrics, label_priors, train, training_arguments

# Trains, runs pipelines or starts servers: `make test` runs these, `make test-fast` not.
pytestmark = pytest.mark.slow

FAST = {"num_epochs": 1, "batch_size": 16, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
        "dataloader_num_workers": 0}

SEEDED = {"num_epochs": 2, "batch_size": 16, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
          "dataloader_num_workers": 0}
TRAIN_IN_A_PROCESS = """
import json, sys
from cockatoo_lib.plan.catalogue import resolve_plan
from cockatoo_lib.training.trainer import train
base, tok, out, seed, settings = sys.argv[1:]
train(tok, resolve_plan("deberta", {**json.loads(settings), "base_model": base, "seed": int(seed)}), out)
"""


def _train_in_processes(base, tok, runs: dict) -> dict:
    """Train once per (output folder, seed), each in its own process, all at once."""
    # Unmeasured: the training they run is measured in this process by other tests.
    env = {**without_coverage(), "OMP_NUM_THREADS": "1"}
    procs = {out: subprocess.Popen([sys.executable, "-c", TRAIN_IN_A_PROCESS, str(base), str(tok), str(out),
                                    str(seed), json.dumps(SEEDED)], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
             for out, seed in runs.items()}
    for proc in procs.values():
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err.decode()[-2000:]
    return {out: ((out / "model.safetensors").read_bytes(), json.loads((out / "cockatoo.json").read_text()))
            for out in runs}


def test_training_is_byte_identical_across_processes_for_one_seed(tiny_models, small_data, tmp_path):
    plan = resolve_plan("deberta", {"base_model": str(tiny_models["deberta"])})
    tokenize(small_data, plan, tmp_path / "tok", cache_root=str(tmp_path / "cache"))
    a, b = tmp_path / "a", tmp_path / "b"
    runs = _train_in_processes(tiny_models["deberta"], tmp_path / "tok", {a: 42, b: 42})
    (first, info_a), (second, info_b) = runs[a], runs[b]
    assert first == second
    for key in ("validation_by_epoch", "thresholds", "best_validation_metric", "seed"):
        assert info_a[key] == info_b[key], key
    # The seed is what decides: another one (trained here, in this process) trains other weights.
    train(tmp_path / "tok", resolve_plan("deberta", {**SEEDED, "base_model": str(tiny_models["deberta"]),
                                                     "seed": 7}), tmp_path / "c")
    assert (tmp_path / "c" / "model.safetensors").read_bytes() != first


def test_epoch_metric_tunes_thresholds_instead_of_cutting_at_one_half():
    # Every probability is below 0.5, but the ranking is perfect: a 0.5 cut sees nothing.
    y = np.array([[1, 0], [0, 1], [0, 0], [1, 1], [0, 0]])
    m = np.ones_like(y)
    probs = np.array([[0.30, 0.01], [0.02, 0.20], [0.05, 0.03], [0.25, 0.40], [0.10, 0.02]])
    logits = np.log(probs / (1 - probs))
    metrics = _compute_metrics(EvalPrediction(predictions=logits, label_ids=(y, m)))
    assert metrics["f1_at_0_5"] == 0.0
    assert metrics["f1"] == pytest.approx(1.0)
    assert metrics["map"] == pytest.approx(1.0)
    # A ranking with one positive below a negative: label 0's AP is (1 + 2/3) / 2.
    probs[4, 0] = 0.28
    assert mean_average_precision(probs, y, m) == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)


def test_deterministic_setting_switches_on_strict_mode(tmp_path):
    import torch

    from cockatoo_lib.training.trainer import seed_everything

    plan = resolve_plan("minilm", {"deterministic": True})
    assert training_arguments(plan, str(tmp_path), cuda=False).full_determinism is True
    saved = dict(os.environ)
    try:
        seed_everything(plan)
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"  # cuBLAS's deterministic workspace
    finally:  # strict mode is process-wide: leave none of it to the other tests
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, False
        os.environ.clear()
        os.environ.update(saved)
    seed_everything(resolve_plan("minilm"))
    assert not torch.are_deterministic_algorithms_enabled()


def test_selection_metric_and_early_stopping_reach_the_trainer(tmp_path):
    plan = resolve_plan("minilm", {"metric_for_best_model": "map", "early_stopping_patience": 1})
    args = training_arguments(plan, str(tmp_path), cuda=False)
    assert args.metric_for_best_model == "map" and args.greater_is_better
    assert resolve_plan("deberta").early_stopping_patience == 2


def test_training_stops_early_when_validation_stops_improving(tiny_models, small_data, tmp_path):
    # A learning rate this small leaves every epoch's predictions, and so its metric, unchanged.
    plan = resolve_plan("deberta", {**FAST, "num_epochs": 6, "learning_rate": 1e-12,
                                    "early_stopping_patience": 2, "base_model": str(tiny_models["deberta"])})
    tokenize(small_data, plan, tmp_path / "tok", cache_root=str(tmp_path / "cache"))
    info = train(tmp_path / "tok", plan, tmp_path / "model")
    assert len(info["validation_by_epoch"]) == 3  # the best, then two without improvement
    assert info["epochs"] == 3 and info["best_epoch"] == 1


@pytest.mark.parametrize("model_type", ["deberta", "modernbert", "clip-vit"])
def test_head_bias_starts_at_each_labels_log_odds(model_type, tiny_models):
    plan = resolve_plan(model_type, {"base_model": str(tiny_models[model_type])})
    model = load_base_model(plan, ["a", "b", "c"])
    init_head_bias(model, [0.5, 0.1, 0.0])
    bias = output_layer(model).bias.detach().numpy()
    assert bias == pytest.approx([0.0, np.log(0.1 / 0.9), np.log(1e-4 / (1 - 1e-4))], rel=1e-5)


@pytest.mark.parametrize("start", ["prior", "zero"])
def test_training_starts_the_head_where_the_plan_says(start, tiny_models, small_data, tmp_path):
    from safetensors.torch import load_file

    plan = resolve_plan("deberta", {**FAST, "learning_rate": 1e-12, "head_bias_init": start,
                                    "base_model": str(tiny_models["deberta"])})
    tokenize(small_data, plan, tmp_path / "tok", cache_root=str(tmp_path / "cache"))
    train(tmp_path / "tok", plan, tmp_path / "model")
    bias = load_file(tmp_path / "model" / "model.safetensors")["classifier.bias"].numpy()
    datasets, _ = load_tokenized(tmp_path / "tok")
    p = label_priors(datasets["train"]).clip(1e-4, 1 - 1e-4)
    expected = np.log(p / (1 - p)) if start == "prior" else np.zeros_like(p)
    assert bias == pytest.approx(expected, abs=1e-4)


def test_label_priors_count_only_annotated_rows():
    from datasets import Dataset

    rows = Dataset.from_dict({"labels": [[1, 0], [0, 0], [0, 1], [1, 0]],
                              "label_mask": [[1, 1], [1, 0], [1, 0], [0, 1]]})
    assert label_priors(rows).tolist() == pytest.approx([1 / 3, 0.0])


def test_baseline_learns_from_annotated_rows_only():
    rng = np.random.default_rng(0)
    words = ["cat", "sofa", "tea", "garden", "rain", "book"]

    def text(spam):
        body = " ".join(rng.choice(words, 6))
        return f"free money click now {body}" if spam else body

    spam = rng.random(400) < 0.1
    texts = [text(s) for s in spam]
    y = np.stack([spam, np.zeros(400, bool)], axis=1).astype(int)
    # Label 1 is annotated on no row with a positive: it keeps its prior, never fitted.
    m = np.ones_like(y)
    probs, info = fit_predict(texts, y, m, {"test": ["free money click now tea", "a cat on the sofa"]})
    assert info["labels_fitted"] == 1 and info["train_rows"] == 400
    assert probs["test"][0, 0] > 0.9 > 0.1 > probs["test"][1, 0]
    assert probs["test"][:, 1].tolist() == [0.0, 0.0]
    # Rows that do not annotate label 0 are not its negatives: masking the spam rows' labels
    # out leaves nothing positive to learn.
    masked = m.copy()
    masked[spam, 0] = 0
    _, info = fit_predict(texts, y, masked, {"test": ["x"]})
    assert info["labels_fitted"] == 0


def _word(i: int) -> str:
    """A distinct lower-case word per row (digits may be unknown to the tiny tokenizer)."""
    return chr(97 + i % 26) + chr(97 + i // 26 % 26)


def _two_source_config(tmp_path, foreign: str) -> Path:
    rows = 120
    (tmp_path / "a.csv").write_text("text,label\n" + "".join(
        f"\"{'free money click now ' * 3 if i % 4 == 0 else 'a cat sofa'} {_word(i)}\",{int(i % 4 == 0)}\n"
        for i in range(rows)))
    (tmp_path / "b.csv").write_text("text,flag\n" + "".join(f"\"{foreign} {_word(i)}\",{i % 2}\n"
                                                          for i in range(rows)))
    return write_config(tmp_path, [
        {"name": "alpha", "path": "a.csv", "labels": {"spam": "label"}, "license": "CC0"},
        {"name": "beta", "path": "b.csv", "labels": {"self_harm": "flag"}, "license": "CC BY-NC 4.0"}])


def test_open_label_names_and_tokenizer_diagnostics_per_source(tiny_models, tmp_path, capsys, monkeypatch):
    config = _two_source_config(tmp_path, "Ωμέγα ψυχή λόγος")  # Greek: unknown to the tiny vocab
    data = tmp_path / "data"
    manifest = prepare(load_data_config(str(config)), data)
    assert manifest["labels"] == ["spam", "self_harm"]  # a team's own names, in order of appearance
    assert manifest["sources"]["beta"]["license"] == "CC BY-NC 4.0"
    code, out, err = run_cli(["tokenize", "-d", data, "-o", tmp_path / "tok", "-m", "deberta",
                              "--set", f"base_model={tiny_models['deberta']}", "--set", "max_length=10",
                              "--set", "tokenizer_extension=off",  # it would add the Greek letters
                              "--cache-root", tmp_path / "cache"], capsys, monkeypatch)
    assert code == 0, err
    info = json.loads((tmp_path / "tok" / "tokenized.json").read_text())
    sources = info["diagnostics"]["sources"]
    assert sources["alpha"]["unknown_token_share"] < 0.01
    assert sources["beta"]["unknown_token_share"] > 0.5
    assert sources["alpha"]["truncated_share"] == pytest.approx(0.25, abs=0.05)  # the long spam rows
    assert sum(s["rows"] for s in sources.values()) == sum(info["rows"].values())
    assert set(info["diagnostics"]["splits"]) == {"train", "validation", "test"}
    warnings = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "source beta:" in warnings[0] and "unknown" in warnings[0]
    datasets, _ = load_tokenized(tmp_path / "tok")
    assert {"text", "source"} <= set(datasets["test"].column_names)
    assert not {"truncated", "unknown_tokens"} & set(datasets["test"].column_names)


@pytest.mark.parametrize("labels, message", [
    (["spam", "pii"], "label 'pii' is declared but no source maps it"),
    (["spam", "spam"], "label 'spam' is declared twice"),
    (["spam", "2fa"], "invalid label name '2fa'"),
])
def test_bad_label_declarations_are_one_line(labels, message, tmp_path, capsys, monkeypatch):
    (tmp_path / "d.csv").write_text("text,label\na,1\nb,0\n")
    config = write_config(tmp_path, [{"name": "d", "path": "d.csv", "labels": {"spam": "label"}}],
                          labels=labels)
    code, _, err = run_cli(["prepare", "-c", config, "-o", tmp_path / "out"], capsys, monkeypatch)
    assert code == 2 and message in error_line(err)
    assert not (tmp_path / "out").exists()


def test_evaluation_reports_each_source_and_the_baseline_and_writes_the_model_card(
        tiny_models, tmp_path):
    config = _two_source_config(tmp_path, "we talk about feelings today")
    prepare(load_data_config(str(config)), tmp_path / "data")
    plan = resolve_plan("deberta", {**FAST, "base_model": str(tiny_models["deberta"])})
    tokenize(tmp_path / "data", plan, tmp_path / "tok", cache_root=str(tmp_path / "cache"))
    train(tmp_path / "tok", plan, tmp_path / "model")
    results = evaluate(tmp_path / "model", tmp_path / "tok", tmp_path / "eval")
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["per_source"] == results["per_source"]

    datasets, _ = load_tokenized(tmp_path / "tok")
    test = datasets["test"]
    sources = np.asarray(test["source"])
    per_source = results["per_source"]
    assert set(per_source) == {"alpha", "beta"}
    assert per_source["alpha"]["labels"] == ["spam"] and per_source["beta"]["labels"] == ["self_harm"]
    assert per_source["alpha"]["rows"] + per_source["beta"]["rows"] == results["rows"] == len(test)
    # A source's figure is the report over its own rows and labels, nothing else.
    from cockatoo_lib.training.collate import PaddingCollator
    from cockatoo_lib.training.models import load_trained_model, predict_logits

    model = load_trained_model(tmp_path / "model", "sequence-classification")
    probs = sigmoid(predict_logits(model, [PaddingCollator(0)([test[i] for i in range(len(test))])]).numpy())
    y, m = np.asarray(test["labels"]), np.asarray(test["label_mask"])
    alpha = sources == "alpha"
    expected = report(probs[alpha][:, [0]], y[alpha][:, [0]], m[alpha][:, [0]], ["spam"],
                      [results["thresholds"]["spam"]])
    assert per_source["alpha"]["macro_f1"] == pytest.approx(expected["macro_f1"])

    # The baseline is fitted on this run's train split: the spam words are easy for it.
    baseline = results["baseline"]
    assert baseline["train_rows"] == len(datasets["train"])
    assert baseline["per_label_f1"]["spam"] == pytest.approx(1.0)
    # Stored rounded to six places.
    assert results["macro_f1_minus_baseline"] == pytest.approx(results["macro_f1"] - baseline["macro_f1"],
                                                               abs=5e-7)

    page = (tmp_path / "eval" / "report.html").read_text()
    assert f"macro-F1\n<b>{baseline['macro_f1']:.4f}</b>" in page
    assert "<tr><td>alpha</td><td>" in page and "<tr><td>beta</td><td>" in page

    card = (tmp_path / "model" / "README.md").read_text()
    assert card == (tmp_path / "eval" / "README.md").read_text()
    for expected_text in ("# Cockatoo moderation classifier: deberta", "| alpha | `", "CC BY-NC 4.0",
                          "non-commercial license", "Linear baseline (TF-IDF", "| spam | ",
                          "## Intended use and limitations", "Splits: train "):
        assert expected_text in card, expected_text
    assert f"macro-F1 **{results['macro_f1']:.3f}**" in card

    # Evaluation applies the thresholds stored in the model: at 0 every row is flagged.
    manifest = json.loads((tmp_path / "model" / "cockatoo.json").read_text())
    manifest["thresholds"] = {k: 0.0 for k in manifest["thresholds"]}
    (tmp_path / "model" / "cockatoo.json").write_text(json.dumps(manifest))
    flagged = evaluate(tmp_path / "model", tmp_path / "tok", tmp_path / "eval-0")
    spam = m[:, 0] == 1
    assert flagged["at_tuned_thresholds"]["per_label"]["spam"]["f1"] == pytest.approx(
        2 * y[spam, 0].sum() / (y[spam, 0].sum() + spam.sum()))


def test_spillover_and_the_margin_interval_reach_the_metrics_the_card_and_kfp(trained_run):
    """Every label of the sample has sources that do not annotate it: how often the model flags
    their rows is measured on test (metrics, card, KFP scalars) and validation (model manifest)."""
    from cockatoo_lib.evaluation.evaluate import SCORES_FILE, kfp_metrics

    metrics = json.loads((trained_run["eval"] / "metrics.json").read_text())
    with np.load(trained_run["eval"] / SCORES_FILE, allow_pickle=False) as scores:
        probs, m = scores["probabilities"], scores["label_mask"]
        assert probs.shape == scores["baseline_probabilities"].shape == scores["labels"].shape == m.shape
    thresholds = np.asarray([metrics["thresholds"][x] for x in metrics["labels"]])
    for j, label in enumerate(metrics["labels"]):
        unannotated = m[:, j] == 0
        row = metrics["spillover"][label]
        assert row["rows"] == unannotated.sum() > 0
        assert row["flagged"] == (probs[unannotated, j] >= thresholds[j]).sum()
    blind = json.loads((trained_run["blind-eval"] / "metrics.json").read_text())
    assert all(v["flagged"] == 0 for v in blind["spillover"].values())  # thresholds of 1.0 flag nothing
    low, high = metrics["margin_95_interval"]
    assert low <= metrics["macro_f1_minus_baseline"] <= high
    scalars, _ = kfp_metrics(metrics)
    assert {f"spillover_{x}" for x in metrics["labels"]} <= set(scalars)
    manifest = json.loads((trained_run["model"] / "cockatoo.json").read_text())
    assert set(manifest["validation_spillover"]) == set(metrics["labels"])
    card = (trained_run["model"] / "README.md").read_text()
    assert "### Spillover: flags on rows of sources that do not annotate the label" in card
    # By default those rows are masked in training and weigh as false positives in the thresholds.
    assert "not counted as negatives (unannotated_weight 0); a flag on one counted as 1 of a false" in card
    assert f"(paired bootstrap 95% interval of the margin: {low:+.3f} to {high:+.3f})" in card
    first = metrics["spillover"][metrics["labels"][0]]
    assert f"| {metrics['labels'][0]} | {first['rows']} | {first['flagged']} |" in card


def test_the_card_says_how_unannotated_rows_were_trained_and_tuned():
    from cockatoo_lib.evaluation.model_card import _unannotated_line

    sources = {"chat": {"negative_for": ["scam"]}, "mail": {"negative_for": []}}
    default = _unannotated_line(0.0, 1.0, sources)
    assert "were masked for it in training, not counted as negatives (unannotated_weight 0)" in default
    assert "a flag on one counted as 1 of a false positive when its threshold was tuned" in default
    assert "The data config declares negatives: chat for scam." in default
    other = _unannotated_line(0.5, 0.0, {})
    assert "were trained as weak negatives, with weight 0.5 (unannotated_weight)" in other
    assert "they did not count when its threshold was tuned (unannotated_flag_cost 0)" in other
    assert "declares" not in other


def test_the_card_shows_the_tokenizer_extension_and_the_unknown_share_before_and_after():
    from cockatoo_lib.evaluation.model_card import _extension_lines

    assert _extension_lines({"diagnostics": {"sources": {}}}) == []
    share = lambda x: {"unknown_token_share": x}  # noqa: E731
    tokenized = {"diagnostics": {"sources": {"posts": share(0.01)}},
                 "tokenizer_extension": {"added_tokens": ["🤡", "💀"],
                                         "diagnostics_before": {"sources": {"posts": share(0.19)}}}}
    text = "\n".join(_extension_lines(tokenized))
    assert "extended with the 2 characters it read as unknown most often in the train split (🤡💀;" in text
    assert "| posts | 19.0% | 1.0% |" in text
