"""The model registry (a real `mlflow server` on loopback, and the embedded SQLite store), the
champion/challenger gate, promotion by hand, and predict from a registered version."""

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import error_line, free_port, run_cli, serve, without_coverage

from cockatoo_lib.errors import CockatooError
from cockatoo_lib.evaluation.evaluate import weights_digest
from cockatoo_lib.evaluation.metrics import bootstrap_gain
from cockatoo_lib.release.gate import DECISION_JSON, DECISION_MD, WEIGHTS_TAG, GateRules, compare, promote
from cockatoo_lib.release.model_registry import CHAMPION, PREVIOUS, MLflowRegistry, local_registry_uri
from cockatoo_lib.training.model_folder import MODEL_MANIFEST

# Trains, runs pipelines or starts servers: `make test` runs these, `make test-fast` not.
pytestmark = pytest.mark.slow


def test_a_server_that_does_not_start_fails_the_wait_at_once_with_its_own_log():
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"exited with 3 on port \d+; its log:\nno database here"):
        serve([sys.executable, "-c", "import sys; print('no database here'); sys.exit(3)"], free_port())
    assert time.monotonic() - start < 60  # not the whole bound: the process had exited


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    process = serve([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                     f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
                     "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], port,
                    ready_path="/health", env=without_coverage())
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(30)


def _gate(registry, name, run, model, out, baseline=None, like=None, **rules):
    """The gate on one of the trained run's models ("model", "blind", or a folder that decides
    `like` one of them), with its evaluation; `baseline` puts that figure in place of the linear
    baseline's test macro-F1, so that a test decides which side of it a model falls."""
    folder = run[model] if isinstance(model, str) else model
    evaluation = run["blind-eval" if (like or model) == "blind" else "eval"]
    if baseline is not None or folder != run.get(model):
        forced = Path(tempfile.mkdtemp(prefix="forced-evaluation-")) / "evaluation"
        shutil.copytree(evaluation, forced)
        metrics = json.loads((forced / "metrics.json").read_text())
        if baseline is not None:
            metrics["baseline"]["macro_f1"] = baseline
        if folder != run.get(model):  # a copy that decides as its original: the same evaluation, its digest
            metrics["weights_sha256"] = weights_digest(folder)
        (forced / "metrics.json").write_text(json.dumps(metrics))
        evaluation = forced
    return promote(registry, name, folder, run["data"], evaluation, out, run_id=f"run-{out.name}",
                   rules=GateRules(**rules))


def _nudged_copy(model: Path, folder: Path) -> Path:
    """Another version that decides exactly as `model` does: the same weights and manifest, and
    one more file (the weights digest covers every file but the card and the manifest). A shifted
    weight would flip any probability sitting on its threshold, and with it the gain."""
    shutil.copytree(model, folder)
    (folder / "COPY.txt").write_text("A copy made by the tests.\n")
    return folder


def test_the_gate_promotes_only_a_model_that_beats_the_baseline_and_the_champion(
        trained_run, mlflow_server, tmp_path, capsys, monkeypatch):
    registry = MLflowRegistry(mlflow_server)
    name = "gate-test"
    model_f1 = json.loads((trained_run["eval"] / "metrics.json").read_text())["macro_f1"]
    assert model_f1 > 0.2
    # A first version no better than the linear baseline is registered, not made champion.
    first = _gate(registry, name, trained_run, "blind", tmp_path / "first", baseline=0.0)
    assert not first["promoted"] and first["blocked_by"] == ["baseline"] and first["registered"]
    assert "test: macro-F1 0.0000 against the linear baseline's 0.0000 (+0.0000) is not above " \
           "min_gain_over_baseline 0" in first["reasons"][0]
    assert registry.by_alias(name, CHAMPION) is None
    assert registry.version(name, "1").tags["gate"] == "rejected"
    # The override promotes it, and says so.
    forced = _gate(registry, name, trained_run, "blind", tmp_path / "forced", baseline=0.0,
                   allow_below_baseline=True)
    assert forced["promoted"] and forced["baseline"]["overridden"] and not forced["registered"]
    assert forced["challenger"] == "1"  # the same weights: version 1 again, not a new version
    assert "promoted anyway: allow_below_baseline" in forced["reasons"][1]
    assert "overridden: allow_below_baseline" in (tmp_path / "forced" / DECISION_MD).read_text()
    # The decision shows what the evaluation measured beyond F1: the margin's interval, spillover.
    blind = json.loads((trained_run["blind-eval"] / "metrics.json").read_text())
    assert forced["baseline"]["spillover"] == blind["spillover"]
    assert forced["baseline"]["test_margin_95_interval"] == blind["margin_95_interval"]
    assert "## Spillover on the test split" in (tmp_path / "forced" / DECISION_MD).read_text()
    assert registry.by_alias(name, CHAMPION).version == "1"
    # A model that beats the champion but not the baseline stays a challenger.
    below = _gate(registry, name, trained_run, "model", tmp_path / "below", baseline=model_f1 + 0.01)
    assert not below["promoted"] and below["blocked_by"] == ["baseline"] and below["challenger"] == "2"
    assert below["sets"]["test"]["macro_f1_gain"] > 0  # it did beat the champion
    assert registry.by_alias(name, CHAMPION).version == "1"
    # Above both: champion, and the old one previous.
    better = _gate(registry, name, trained_run, "model", tmp_path / "better", baseline=0.1)
    assert better["promoted"] and better["champion"] == "1" and better["challenger"] == "2"
    test = better["sets"]["test"]
    assert test["champion_macro_f1"] == 0 and test["challenger_macro_f1"] > 0.2
    low, high = test["gain_95_interval"]
    assert 0 < low <= test["macro_f1_gain"] <= high
    assert _aliases(registry, name) == ("2", "1")
    # A cloned run whose train step came from KFP's cache: the champion itself again. Nothing moves.
    again = _gate(registry, name, trained_run, "model", tmp_path / "again", baseline=0.1)
    assert not again["promoted"] and again["blocked_by"] == ["already champion"]
    assert _aliases(registry, name) == ("2", "1")
    # Other weights that decide the same: a gain of 0 does not replace the champion.
    tie = _gate(registry, name, trained_run, _nudged_copy(trained_run["model"], tmp_path / "nudged"),
                tmp_path / "tie", baseline=0.1)
    assert tie["challenger"] == "3" and tie["sets"]["test"]["macro_f1_gain"] == 0
    assert not tie["promoted"] and tie["blocked_by"] == ["champion"]
    assert "test: macro-F1 gain over the champion +0.0000 is not above min_improvement 0" in tie["reasons"]
    assert _aliases(registry, name) == ("2", "1")

    worse = _gate(registry, name, trained_run, "blind", tmp_path / "worse", baseline=0.0,
                  allow_below_baseline=True)
    assert not worse["promoted"] and worse["champion"] == "2"
    assert any("not above min_improvement" in r for r in worse["reasons"])
    assert any("drops by" in r for r in worse["reasons"])
    assert registry.by_alias(name, CHAMPION).version == "2"
    # The decision and its reasons: JSON, Markdown, and the version's tags.
    saved = json.loads((tmp_path / "worse" / DECISION_JSON).read_text())
    assert saved == json.loads(json.dumps(worse))
    assert "not promoted" in (tmp_path / "worse" / DECISION_MD).read_text()
    version = registry.version(name, "1")
    assert version.tags["gate"] == "rejected" and "drops by" in version.tags["gate_reasons"]
    assert version.tags["kfp_run_id"] == "run-first" and version.tags["model_type"] == "deberta"
    data_manifest = json.loads((trained_run["data"] / "manifest.json").read_text())
    assert version.tags["data_fingerprint"] == data_manifest["fingerprint"]
    # The run holds the test metrics and the per-epoch training metrics.
    mlflow_run = registry.client.get_run(registry.client.get_model_version(name, "2").run_id)
    assert mlflow_run.data.metrics["test_macro_f1"] == pytest.approx(model_f1, abs=1e-6)
    history = registry.client.get_metric_history(mlflow_run.info.run_id, "validation_f1")
    assert [m.step for m in history] == [1, 2]

    # Rollback by hand, then predict with whatever is champion now (the blind copy).
    code, out, _ = run_cli(["promote", "--model-name", name, "--version", "1", "--registry-uri",
                            mlflow_server], capsys, monkeypatch)
    assert code == 0 and "champion is version 1 (was 2, now previous)" in out
    assert registry.by_alias(name, PREVIOUS).version == "2"
    pd.DataFrame({"id": [7, 8], "text": ["click here to win a prize", "see you at lunch"]}).to_csv(
        tmp_path / "in.csv", index=False)
    code, out, _ = run_cli(["predict", "--model", f"models:/{name}@champion", "--registry-uri", mlflow_server,
                            "--input", tmp_path / "in.csv", "--output", tmp_path / "out.csv"],
                           capsys, monkeypatch)
    assert code == 0
    result = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert list(result["id"]) == [7, 8]
    assert list(result.columns) == ["id", "text", *[f"p_{x}" for x in trained_run["labels"]], "labels"]
    assert list(result["labels"]) == ["", ""]  # the blind copy's thresholds flag nothing


def _aliases(registry, name) -> tuple[str, str]:
    return registry.by_alias(name, CHAMPION).version, registry.by_alias(name, PREVIOUS).version


def test_predict_with_no_champion_is_one_line_that_says_what_to_do(trained_run, tmp_path, capsys,
                                                                    monkeypatch):
    uri = local_registry_uri(tmp_path)
    _gate(MLflowRegistry(uri), "m", trained_run, "blind", tmp_path / "a", baseline=0.0)
    pd.DataFrame({"text": ["hello"]}).to_csv(tmp_path / "in.csv", index=False)
    code, _, err = run_cli(["predict", "--model", "models:/m@champion", "--registry-uri", uri, "--input",
                            tmp_path / "in.csv", "--output", tmp_path / "out.csv"], capsys, monkeypatch)
    assert code == 2 and not (tmp_path / "out.csv").exists()
    line = error_line(err)
    assert "no version of m has the alias 'champion' (no version has passed the gate yet" in line
    assert line.endswith("cockatoo promote --model-name m --version N")
    code, _, err = run_cli(["predict", "--model", "models:/other@champion", "--registry-uri", uri, "--input",
                            tmp_path / "in.csv", "--output", tmp_path / "out.csv"], capsys, monkeypatch)
    assert code == 2 and "no model named 'other' is registered" in error_line(err)


def test_an_evaluation_of_another_model_is_refused_before_anything_is_registered(trained_run, tmp_path):
    from safetensors.torch import load_file, save_file

    registry = MLflowRegistry(local_registry_uri(tmp_path))
    with pytest.raises(CockatooError, match=r"is not of the model .*blind.* \(weights digest differs\)"):
        promote(registry, "m", trained_run["blind"], trained_run["data"], trained_run["eval"],
                tmp_path / "out")
    # The same thresholds, data and files, one weight moved: its figures are not the original's.
    moved = shutil.copytree(trained_run["model"], tmp_path / "moved")
    weights = next(moved.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(k for k in sorted(tensors) if "classifier" in k)
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CockatooError, match=r"\(weights digest differs\); evaluate this model"):
        promote(registry, "m", moved, trained_run["data"], trained_run["eval"], tmp_path / "out")
    # An evaluation written before evaluations recorded the digest.
    old = shutil.copytree(trained_run["eval"], tmp_path / "old-eval")
    metrics = json.loads((old / "metrics.json").read_text())
    assert metrics.pop("weights_sha256") == weights_digest(trained_run["model"])
    (old / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(CockatooError, match=r"\(weights digest \(none recorded\) differs\)"):
        promote(registry, "m", trained_run["model"], trained_run["data"], old, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert registry.find_version("m", WEIGHTS_TAG, weights_digest(trained_run["model"])) is None
    assert registry.find_version("m", WEIGHTS_TAG, weights_digest(moved)) is None


def test_embedded_registry_for_local_runs_keeps_its_files_under_the_root(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the working folder (MLflow's default ./mlruns)
    registry = MLflowRegistry(local_registry_uri(tmp_path / "root"))
    decision = _gate(registry, "local", trained_run, "model", tmp_path / "out", baseline=0.0)
    assert decision["promoted"] and decision["registry"].startswith("sqlite:///")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "root"]
    downloaded = registry.download("models:/local@champion", tmp_path / "dl")
    assert (downloaded / MODEL_MANIFEST).read_bytes() == (trained_run["model"] / MODEL_MANIFEST).read_bytes()


def test_a_champion_split_by_another_rule_is_not_compared(trained_run, tmp_path):
    registry = MLflowRegistry(local_registry_uri(tmp_path))
    _gate(registry, "m", trained_run, "blind", tmp_path / "a", baseline=0.0, allow_below_baseline=True)
    registry.tag_version("m", "1", {"split_rule": json.dumps({"split_seed": 7})})
    decision = _gate(registry, "m", trained_run, "model", tmp_path / "b", baseline=0.0)
    assert not decision["promoted"]
    assert decision["reasons"][0].startswith("the champion was trained on data split by another rule")


class Scored:
    """A model stand-in for `compare`: fixed probabilities, the classifier's attributes."""

    image_processor = None

    def __init__(self, labels, probs, thresholds):
        self.labels, self.probs, self.thresholds = labels, np.asarray(probs, float), np.asarray(thresholds)

    def predict_proba(self, texts, images=None):
        return self.probs


def test_compare_works_the_rules_over_the_shared_labels():
    # Rows: label a positive in rows 0-1, b positive in rows 2-3; c only the champion knows.
    y = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], np.int8)
    rows = {"text": ["w", "x", "y", "z"], "images": None, "y": y, "m": np.ones_like(y)}
    # Challenger: a perfect (F1 1), b finds one of two (F1 2/3). Champion: perfect on both.
    challenger = Scored(["a", "b"], [[.9, .1], [.9, .1], [.1, .9], [.1, .2]], [.5, .5])
    champion = Scored(["b", "c", "a"], [[.1, 0, .9], [.1, 0, .9], [.9, 0, .1], [.9, 0, .1]], [.5, .5, .5])
    scored = compare(challenger, champion, rows, GateRules(max_label_drop=0.4), "test")
    assert scored["labels"] == ["b", "a"]
    assert scored["per_label"]["b"] == {"challenger_f1": pytest.approx(2 / 3, abs=1e-6), "champion_f1": 1.0,
                                        "support": 2}
    assert scored["macro_f1_gain"] == pytest.approx((1 + 2 / 3) / 2 - 1, abs=1e-6)
    assert scored["reasons"] == ["test: macro-F1 gain over the champion -0.1667 is not above "
                                 "min_improvement 0"]
    strict = compare(challenger, champion, rows, GateRules(min_improvement=-0.2, max_label_drop=0.4), "t")
    assert strict["passed"]
    drop = compare(challenger, champion, rows, GateRules(min_improvement=-0.2, max_label_drop=0.2), "t")
    assert drop["reasons"] == ["t: F1 of b drops by 0.3333 (more than max_label_drop 0.2)"]


def test_bootstrap_interval_of_the_gain():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (400, 3)).astype(bool)
    m = np.ones_like(y)
    assert bootstrap_gain(y, y, y, m) == [0.0, 0.0]
    noisy = y ^ (rng.random(y.shape) < 0.3)  # 30% of decisions flipped
    low, high = bootstrap_gain(y, noisy, y, m)
    from cockatoo_lib.evaluation.metrics import macro_f1

    gain = 1 - macro_f1(noisy.astype(float), y, m, [0.5] * 3)
    assert 0 < low < gain < high < 0.5
    assert bootstrap_gain(y, noisy, y, m) == [low, high]  # seeded


def test_promote_by_hand_refuses_an_unknown_version(trained_run, tmp_path, capsys, monkeypatch):
    uri = local_registry_uri(tmp_path)
    _gate(MLflowRegistry(uri), "m", trained_run, "model", tmp_path / "a")
    code, _, err = run_cli(["promote", "--model-name", "m", "--version", "9", "--registry-uri", uri],
                           capsys, monkeypatch)
    assert code == 2 and error_line(err).endswith("m has no version 9")


def test_unreachable_registry_is_one_line(trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    code, _, err = run_cli(["gate", "--model", trained_run["model"], "--data", trained_run["data"],
                            "--evaluation", trained_run["eval"], "--output", tmp_path / "out",
                            "--registry-uri", f"http://127.0.0.1:{free_port()}"], capsys, monkeypatch)
    assert code == 2 and "model registry http://127.0.0.1:" in error_line(err)
    assert not (tmp_path / "out").exists()


def test_a_champion_moved_by_another_gate_meanwhile_is_not_overwritten(trained_run, tmp_path):
    class Concurrent(MLflowRegistry):
        """Another gate promotes version 2 between this gate's first and second look."""

        looks = 0

        def by_alias(self, name, alias):
            self.looks += 1
            if self.looks == 2:
                self.set_alias(name, CHAMPION, "2")
            return super().by_alias(name, alias)

    uri = local_registry_uri(tmp_path)
    plain = MLflowRegistry(uri)
    _gate(plain, "m", trained_run, "blind", tmp_path / "a")  # version 1
    _gate(plain, "m", trained_run, _nudged_copy(trained_run["blind"], tmp_path / "blind-2"), tmp_path / "b",
          like="blind")  # version 2
    plain.set_alias("m", CHAMPION, "1")
    decision = _gate(Concurrent(uri), "m", trained_run, "model", tmp_path / "c", baseline=0.0)  # 3, better
    assert not decision["promoted"]
    assert decision["reasons"] == ["the champion changed while the gate ran (now version 2, scored "
                                   "against 1); rerun the gate to compare with it"]
    assert plain.by_alias("m", CHAMPION).version == "2"


def test_a_gate_that_fails_tags_the_version_and_writes_nothing(trained_run, tmp_path):
    registry = MLflowRegistry(local_registry_uri(tmp_path))
    _gate(registry, "m", trained_run, "model", tmp_path / "a", baseline=0.0)
    for path in (tmp_path / "registry" / "artifacts").rglob(MODEL_MANIFEST):
        path.unlink()  # the champion's files are damaged
    with pytest.raises(CockatooError, match="has no cockatoo.json|cockatoo.json"):
        other = _nudged_copy(trained_run["model"], tmp_path / "other")
        _gate(registry, "m", trained_run, other, tmp_path / "b", baseline=0.0, like="model")
    assert not (tmp_path / "b").exists()
    version = registry.version("m", "2")
    assert version.tags["gate"] == "failed" and "cockatoo.json" in version.tags["gate_reasons"]
    assert registry.by_alias("m", CHAMPION).version == "1"


def test_the_demo_predicts_with_the_champion_or_says_it_has_none(trained_run, tmp_path, capsys):
    """`cockatoo run --predict` (make demo): the champion's predictions, or, with no champion,
    the run's own model's, with a line that says it is not the champion."""
    from pipelines.cli import _predict_after_run

    uri = local_registry_uri(tmp_path)
    decision = _gate(MLflowRegistry(uri), "m", trained_run, "model", tmp_path / "a", baseline=0.99)
    pd.DataFrame({"text": ["win a prize", "hello"]}).to_csv(tmp_path / "in.csv", index=False)
    result = {"decision": decision, "registry_uri": uri, "model": str(trained_run["model"])}
    _predict_after_run(result, str(tmp_path / "in.csv"), tmp_path / "first.csv")
    out = capsys.readouterr().out
    assert "no champion: the gate has promoted no version of m" in out and "NOT the champion" in out
    assert len(pd.read_csv(tmp_path / "first.csv")) == 2
    _gate(MLflowRegistry(uri), "m", trained_run, "blind", tmp_path / "b", baseline=0.0,
          allow_below_baseline=True)
    _predict_after_run(result, str(tmp_path / "in.csv"), tmp_path / "second.csv")
    assert "predictions of the champion, m version 2" in capsys.readouterr().out
    assert list(pd.read_csv(tmp_path / "second.csv", keep_default_na=False)["labels"]) == ["", ""]  # blind's
    # The demo's new texts say what a reader would expect of each: shown beside each prediction.
    pd.DataFrame({"text": ["win a prize", "hello"], "expected": ["scam", None]}).to_csv(tmp_path / "ex.csv",
                                                                                      index=False)
    _predict_after_run(result, str(tmp_path / "ex.csv"), tmp_path / "third.csv")
    lines = [x for x in capsys.readouterr().out.splitlines() if "->" in x]
    assert "-> (none)   expected: scam   <- differs" in lines[0]
    assert lines[1].endswith("-> (none)   expected: (none)")


def test_the_alias_moves_last_and_a_rerun_of_the_champion_changes_no_tag(trained_run, tmp_path):
    """A server that sees the new champion finds its gate and serving tags already there; a
    cached rerun of the champion's weights leaves them as they were."""
    class Recording(MLflowRegistry):
        writes: list = []

        def tag_version(self, name, version, tags):
            self.writes.append(("tags", version, tags.get("gate")))
            return super().tag_version(name, version, tags)

        def set_alias(self, name, alias, version):
            self.writes.append(("alias", version, alias))
            return super().set_alias(name, alias, version)

    registry = Recording(local_registry_uri(tmp_path))
    assert _gate(registry, "m", trained_run, "model", tmp_path / "a", baseline=0.0)["promoted"]
    assert registry.writes[-2:] == [("tags", "1", "promoted"), ("alias", "1", CHAMPION)]
    assert {"serving_bf16", "serving_int8"} <= set(registry.version("m", "1").tags)
    registry.writes.clear()
    again = _gate(registry, "m", trained_run, "model", tmp_path / "b", baseline=0.0)
    assert again["blocked_by"] == ["already champion"] and registry.writes == []
    assert registry.version("m", "1").tags["gate"] == "promoted"
