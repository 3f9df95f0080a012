"""The char n-gram partner a model may ship combined with (plan setting char_ngram_partner)."""

import json
import shutil
import sys
import urllib.request

import numpy as np
import pytest
from helpers import free_port, serve, without_coverage

from cockatoo_lib.errors import CockatooError
from cockatoo_lib.evaluation.baseline import (
    COMBINATION_WEIGHTS,
    PARTNER_FILES,
    CharNgramModel,
    choose_combination,
    combine,
)
from cockatoo_lib.release.predict import Classifier
from cockatoo_lib.training.model_folder import MODEL_MANIFEST

TEXTS = ["free money, click now", "a calm note about the weather", "", "you are a pathetic idiot 🤡"]
SERVED = [t for t in TEXTS if t]  # the server refuses an empty text


def _rows():
    texts = [f"free money now {i}" if i % 2 else f"the weather is calm today {i}" for i in range(40)]
    y = np.array([[i % 2, 0] for i in range(40)])
    m = np.array([[1, 1 if i < 20 else 0] for i in range(40)])  # label 2 has one class: its prior
    return texts, y, m


def test_a_partner_saved_and_loaded_gives_the_same_probabilities_and_loads_no_pickle(tmp_path):
    texts, y, m = _rows()
    partner = CharNgramModel.fit(texts, y, m)
    partner.save(tmp_path, ["scam", "toxicity"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(PARTNER_FILES)
    json.loads((tmp_path / PARTNER_FILES[0]).read_text())  # JSON and safetensors: nothing executes
    loaded = CharNgramModel.load(tmp_path, ["scam", "toxicity"])
    np.testing.assert_array_equal(loaded.predict_proba(TEXTS), partner.predict_proba(TEXTS))
    probs = partner.predict_proba(TEXTS)
    assert probs[0, 0] > 0.5 > probs[1, 0] and np.all(probs[:, 1] == 0.0)  # label 2: no positive, prior 0
    with pytest.raises(CockatooError, match=r"partner.json: labels \['scam', 'toxicity'\], the model's are"):
        CharNgramModel.load(tmp_path, ["scam", "violence"])
    (tmp_path / PARTNER_FILES[1]).unlink()
    with pytest.raises(CockatooError, match="char n-gram partner, but partner.safetensors is missing"):
        CharNgramModel.load(tmp_path, ["scam", "toxicity"])


def test_the_combination_is_chosen_on_the_rows_given_and_includes_each_part_alone():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (200, 2))
    m = np.ones_like(y)
    good, noise = y * 0.6 + 0.2, rng.random(y.shape)
    assert set(COMBINATION_WEIGHTS) >= {0.0, 1.0}
    assert choose_combination(good, noise, y, m)["transformer_weight"] == 1.0
    # A useless transformer: the partner separates the rows alone, and so does any combination
    # giving noise a weight w with 0.6 (1 - w) > w; ties go to the transformer: w = 0.3.
    chosen = choose_combination(noise, good, y, m)
    assert chosen["transformer_weight"] == 0.3 and chosen["validation_macro_f1"]["partner"] == 1.0
    assert chosen["validation_macro_f1"]["combination"] == 1.0 > chosen["validation_macro_f1"]["transformer"]
    np.testing.assert_array_equal(combine(good, noise, 1.0), good)


@pytest.fixture(scope="module")
def combined(tiny_models, small_data, tmp_path_factory):
    """A tiny DeBERTa trained with its partner on, evaluated."""
    from cockatoo_lib.evaluation.evaluate import evaluate
    from cockatoo_lib.plan.catalogue import resolve_plan
    from cockatoo_lib.tokenize import tokenize
    from cockatoo_lib.training.trainer import train

    root = tmp_path_factory.mktemp("combined")
    plan = resolve_plan("deberta", {"num_epochs": 1, "batch_size": 16, "gradient_accumulation_steps": 1,
                                    "learning_rate": 1e-3, "dataloader_num_workers": 0,
                                    "base_model": str(tiny_models["deberta"]), "char_ngram_partner": True})
    tokenize(small_data, plan, root / "tok", cache_root=str(root / "cache"))
    info = train(root / "tok", plan, root / "model", data_dir=small_data)
    results = evaluate(root / "model", root / "tok", root / "eval", data_dir=small_data)
    return {"root": root, "model": root / "model", "info": info, "results": results, "data": small_data,
            "plan": plan}


def _edited_copy(model, folder, edit):
    shutil.copytree(model, folder)
    manifest = json.loads((folder / MODEL_MANIFEST).read_text())
    edit(manifest)
    (folder / MODEL_MANIFEST).write_text(json.dumps(manifest))
    return folder


@pytest.mark.slow
def test_a_combined_model_scores_its_combination_everywhere(combined, tmp_path):
    info, results = combined["info"], combined["results"]
    parts = info["combination"]
    weight = parts["transformer_weight"]
    assert weight in COMBINATION_WEIGHTS and all((combined["model"] / f).is_file() for f in PARTNER_FILES)
    assert parts["validation_macro_f1"]["combination"] == max(parts["validation_macro_f1_by_weight"].values())
    # Classifier (predict, serve and every reduced form go through it): the combination.
    shipped = Classifier(combined["model"], device="cpu")
    alone = Classifier(_edited_copy(combined["model"], tmp_path / "alone", lambda m: m.pop("combination")))
    partner = CharNgramModel.load(combined["model"], info["labels"])
    expected = combine(alone.predict_proba(TEXTS), partner.predict_proba(TEXTS), weight)
    np.testing.assert_allclose(shipped.predict_proba(TEXTS), expected, atol=1e-6)
    np.testing.assert_allclose(shipped.in_form("bf16").predict_proba(TEXTS)[:, 0], expected[:, 0], atol=0.05)
    # Weight 1 is the transformer alone.
    one = Classifier(_edited_copy(combined["model"], tmp_path / "one",
                                  lambda m: m["combination"].update(transformer_weight=1.0)))
    np.testing.assert_allclose(one.predict_proba(TEXTS), alone.predict_proba(TEXTS), atol=1e-6)
    # Evaluate scores what ships and reports each part alone: metrics, KFP scalars, card.
    from cockatoo_lib.evaluation.evaluate import kfp_metrics

    assert results["combination"]["transformer_weight"] == weight
    from cockatoo_lib.evaluation.evaluate import SCORES_FILE

    with np.load(combined["root"] / "eval" / SCORES_FILE, allow_pickle=False) as scores:
        np.testing.assert_allclose(scores["probabilities"], combine(
            scores["transformer_probabilities"], scores["partner_probabilities"], weight), atol=1e-6)
    scalars, _ = kfp_metrics(results)
    assert scalars["transformer_test_macro_f1"] == round(results["combination"]["transformer"]["macro_f1"], 6)
    assert "partner_test_macro_f1" in scalars
    card = (combined["model"] / "README.md").read_text()
    assert f"What ships is {weight:g} × the fine-tuned transformer + {1 - weight:g} × a char n-gram" in card
    # A folder that names a partner it lacks is one line naming the file.
    (tmp_path / "lacking").mkdir()
    lacking = _edited_copy(combined["model"], tmp_path / "lacking" / "m", lambda m: None)
    (lacking / "partner.json").unlink()
    with pytest.raises(CockatooError, match="names a char n-gram partner, but partner.json is missing"):
        Classifier(lacking)


@pytest.mark.slow
def test_the_choice_never_reads_the_test_split(combined, tmp_path):
    """Test labels turned upside down: the same weights, combination and thresholds."""
    import pyarrow.parquet as pq

    from cockatoo_lib.tokenize import tokenize
    from cockatoo_lib.training.trainer import train

    poisoned = shutil.copytree(combined["data"], tmp_path / "data")
    table = pq.read_table(poisoned / "test.parquet")
    flipped = [[1 - v for v in row] for row in table.column("labels").to_pylist()]
    table = table.set_column(table.column_names.index("labels"), "labels",
                             __import__("pyarrow").array(flipped, type=table.schema.field("labels").type))
    pq.write_table(table, poisoned / "test.parquet")
    plan = combined["plan"]
    tokenize(poisoned, plan, tmp_path / "tok", cache_root=str(tmp_path / "cache"))
    info = train(tmp_path / "tok", plan, tmp_path / "model", data_dir=poisoned)
    def choice(combination):  # what was chosen, not how long the fit took
        return {**combination, "partner": {k: v for k, v in combination["partner"].items() if k != "seconds"}}

    assert choice(info["combination"]) == choice(combined["info"]["combination"])
    assert info["thresholds"] == combined["info"]["thresholds"]


@pytest.mark.slow
def test_the_gate_refuses_a_combination_that_gives_the_transformer_no_weight(combined, tmp_path):
    from cockatoo_lib.evaluation.evaluate import evaluate
    from cockatoo_lib.release.gate import GateRules, promote
    from cockatoo_lib.release.model_registry import MLflowRegistry, local_registry_uri

    zero = _edited_copy(combined["model"], tmp_path / "zero",
                        lambda m: m["combination"].update(transformer_weight=0.0))
    evaluate(zero, combined["root"] / "tok", tmp_path / "eval", data_dir=combined["data"])
    registry = MLflowRegistry(local_registry_uri(tmp_path / "registry"))
    decision = promote(registry, "m", zero, combined["data"], tmp_path / "eval", tmp_path / "out",
                       rules=GateRules(allow_below_baseline=True))
    assert not decision["promoted"] and "partner alone" in decision["blocked_by"]
    assert any("ship the char n-gram partner (the linear baseline) alone" in r for r in decision["reasons"])


@pytest.mark.slow
def test_serving_a_combined_model_answers_what_the_classifier_gives_offline(combined):
    port = free_port()
    process = serve([sys.executable, "-m", "pipelines.cli", "serve", "--model", str(combined["model"]),
                     "--http-port", str(port)], port, ready_path="/v2/health/ready", env=without_coverage())
    try:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/model:predict",
                                         data=json.dumps({"instances": SERVED}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            body = json.loads(response.read())
    finally:
        process.terminate()
        process.wait(30)
    offline = Classifier(combined["model"], device="cpu")
    got = np.array([[p["probabilities"][x] for x in offline.labels] for p in body["predictions"]])
    np.testing.assert_allclose(got, offline.predict_proba(SERVED), atol=1e-5)
