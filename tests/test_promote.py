"""The model registry (a real `mlflow server` on loopback, and the embedded SQLite store), the
champion/challenger gate, promotion by hand, and predict from a registered version."""

import json
import sys

import numpy as np
import pandas as pd
import pytest
from helpers import error_line, free_port, run_cli, serve

from cockatoo_lib.errors import CockatooError
from cockatoo_lib.gate import DECISION_JSON, DECISION_MD, GateRules, bootstrap_gain, compare, promote
from cockatoo_lib.model_registry import CHAMPION, PREVIOUS, MLflowRegistry, local_registry_uri
from cockatoo_lib.train import MODEL_MANIFEST


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    process = serve([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                     f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
                     "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], port)
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(30)


def _gate(registry, name, run, model, out, **rules):
    return promote(registry, name, run[model], run["data"], run["eval"], out, run_id=f"run-{out.name}",
                   rules=GateRules(**rules))


def test_the_gate_promotes_only_a_better_challenger_and_predict_reads_the_champion(
        trained_run, mlflow_server, tmp_path, capsys, monkeypatch):
    registry = MLflowRegistry(mlflow_server)
    name = "gate-test"
    first = _gate(registry, name, trained_run, "blind", tmp_path / "first")
    assert first["promoted"] and first["champion"] is None and "no champion yet" in first["reasons"][0]
    assert registry.by_alias(name, CHAMPION).version == "1"

    better = _gate(registry, name, trained_run, "model", tmp_path / "better")
    assert better["promoted"] and better["champion"] == "1"
    test = better["sets"]["test"]
    assert test["champion_macro_f1"] == 0 and test["challenger_macro_f1"] > 0.2
    low, high = test["gain_95_interval"]
    assert 0 < low <= test["macro_f1_gain"] <= high
    assert registry.by_alias(name, CHAMPION).version == "2"
    assert registry.by_alias(name, PREVIOUS).version == "1"

    worse = _gate(registry, name, trained_run, "blind", tmp_path / "worse")
    assert not worse["promoted"] and worse["champion"] == "2"
    assert any("below min_improvement" in r for r in worse["reasons"])
    assert any("drops by" in r for r in worse["reasons"])
    assert registry.by_alias(name, CHAMPION).version == "2"
    # The decision and its reasons: JSON, Markdown, and the version's tags.
    saved = json.loads((tmp_path / "worse" / DECISION_JSON).read_text())
    assert saved == json.loads(json.dumps(worse))
    assert "not promoted" in (tmp_path / "worse" / DECISION_MD).read_text()
    version = registry.version(name, "3")
    assert version.tags["gate"] == "rejected" and "drops by" in version.tags["gate_reasons"]
    assert version.tags["kfp_run_id"] == "run-worse" and version.tags["model_type"] == "deberta"
    data_manifest = json.loads((trained_run["data"] / "manifest.json").read_text())
    assert version.tags["data_fingerprint"] == data_manifest["fingerprint"]
    # The run holds the test metrics and the per-epoch training metrics.
    mlflow_run = registry.client.get_run(registry.client.get_model_version(name, "2").run_id)
    assert mlflow_run.data.metrics["test_macro_f1"] == pytest.approx(
        json.loads((trained_run["eval"] / "metrics.json").read_text())["macro_f1"], abs=1e-6)
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


def test_embedded_registry_for_local_runs_keeps_its_files_under_the_root(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the working folder (MLflow's default ./mlruns)
    registry = MLflowRegistry(local_registry_uri(tmp_path / "root"))
    decision = _gate(registry, "local", trained_run, "model", tmp_path / "out")
    assert decision["promoted"] and decision["registry"].startswith("sqlite:///")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "root"]
    downloaded = registry.download("models:/local@champion", tmp_path / "dl")
    assert (downloaded / MODEL_MANIFEST).read_bytes() == (trained_run["model"] / MODEL_MANIFEST).read_bytes()


def test_a_champion_split_by_another_rule_is_not_compared(trained_run, tmp_path):
    registry = MLflowRegistry(local_registry_uri(tmp_path))
    _gate(registry, "m", trained_run, "blind", tmp_path / "a")
    registry.tag_version("m", "1", {"split_rule": json.dumps({"split_seed": 7})})
    decision = _gate(registry, "m", trained_run, "model", tmp_path / "b")
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
    assert scored["reasons"] == ["test: macro-F1 gain -0.1667 is below min_improvement 0"]
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
    from cockatoo_lib.metrics import macro_f1

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
    _gate(plain, "m", trained_run, "blind", tmp_path / "b")  # version 2
    plain.set_alias("m", CHAMPION, "1")
    decision = _gate(Concurrent(uri), "m", trained_run, "model", tmp_path / "c")  # version 3, better
    assert not decision["promoted"]
    assert decision["reasons"] == ["the champion changed while the gate ran (now version 2, scored "
                                   "against 1); rerun the gate to compare with it"]
    assert plain.by_alias("m", CHAMPION).version == "2"


def test_a_gate_that_fails_tags_the_version_and_writes_nothing(trained_run, tmp_path):
    registry = MLflowRegistry(local_registry_uri(tmp_path))
    _gate(registry, "m", trained_run, "model", tmp_path / "a")
    for path in (tmp_path / "registry" / "artifacts").rglob(MODEL_MANIFEST):
        path.unlink()  # the champion's files are damaged
    with pytest.raises(CockatooError, match="has no cockatoo.json|cockatoo.json"):
        _gate(registry, "m", trained_run, "model", tmp_path / "b")
    assert not (tmp_path / "b").exists()
    version = registry.version("m", "2")
    assert version.tags["gate"] == "failed" and "cockatoo.json" in version.tags["gate_reasons"]
    assert registry.by_alias("m", CHAMPION).version == "1"
