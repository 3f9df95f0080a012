"""The cockatoo-score pipeline: its compiled fan-out, and local runs through kfp.local."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from fake_kfp import FakeKFP
from helpers import error_line, run_cli
from kfp import dsl

from cockatoo_lib.errors import CockatooError
from cockatoo_lib.release.predict import Classifier
from cockatoo_lib.release.scoring import dated, plan_scoring
from components import score
from components.images import Images
from pipelines.cockatoo_train import RESOURCES, Cluster
from pipelines.runner import SCORE_PIPELINE, check_params, compile_pipeline


def _compiled(tmp_path, cluster: Cluster = Cluster()):
    path = compile_pipeline(tmp_path / "score.yaml", cluster, SCORE_PIPELINE)
    pipeline, platform = yaml.safe_load_all(path.read_text())
    return pipeline, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_the_shards_fan_out_over_pods_that_all_score_the_one_pinned_version(tmp_path):
    cluster = Cluster(images=Images.of("registry.example/ml", "7"), score_parallelism=3)
    pipeline, k8s = _compiled(tmp_path, cluster)
    tasks = pipeline["root"]["dag"]["tasks"]
    loop = tasks["for-loop-1"]
    # One iteration per shard the plan dealt, at most 3 pods at once.
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--plan-scoring-shards"
    assert loop["iteratorPolicy"]["parallelismLimit"] == 3
    assert loop["dependentTasks"] == ["plan-scoring"]
    # Every shard scores the model the plan pinned (its output), not the run parameter: an alias
    # moved mid-run changes nothing.
    shard = pipeline["components"]["comp-for-loop-1"]["dag"]["tasks"]["score-shard"]
    inputs = shard["inputs"]["parameters"]
    assert inputs["model"]["componentInputParameter"] == "pipelinechannel--plan-scoring-model"
    assert inputs["output_uri"]["componentInputParameter"] == "pipelinechannel--plan-scoring-output_uri"
    assert inputs["shard"]["componentInputParameter"] == "pipelinechannel--plan-scoring-shards-loop-item"
    assert shard["retryPolicy"]["maxRetryCount"] == cluster.retries
    # finish waits for every shard.
    assert set(tasks["finish-scoring"]["dependentTasks"]) == {"for-loop-1", "plan-scoring"}
    assert all(not t.get("cachingOptions", {}).get("enableCache") for t in [*tasks.values(), shard])
    executors = pipeline["deploymentSpec"]["executors"]
    container = executors["exec-score-shard"]["container"]
    cpu, memory = RESOURCES["score-shard"]
    assert container["image"] == "registry.example/ml/cockatoo-cpu:7"
    assert container["resources"]["cpuRequest"] == float(cpu)
    assert container["resources"]["memoryRequest"] == float(memory.rstrip("G"))
    assert "accelerator" not in container["resources"]
    assert k8s["exec-score-shard"]["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
    # The registry's credentials where the registry is read.
    for step in ("exec-plan-scoring", "exec-score-shard"):
        assert any(s["secretName"] == cluster.mlflow_secret for s in k8s[step]["secretAsEnv"])


def test_shards_on_gpus_take_the_cuda_image_and_an_accelerator_each(tmp_path):
    pipeline, _ = _compiled(tmp_path, Cluster(score_gpus=1, accelerator_type="nvidia.com/gpu"))
    container = pipeline["deploymentSpec"]["executors"]["exec-score-shard"]["container"]
    assert container["image"].endswith("/cockatoo-cuda:0.1.0")
    assert container["resources"]["accelerator"]["resourceCount"] == "1"
    # plan and finish stay on the CPU image.
    assert pipeline["deploymentSpec"]["executors"]["exec-plan-scoring"]["container"]["image"].endswith(
        "/cockatoo-cpu:0.1.0")


def test_the_plan_deals_files_round_robin_and_dates_the_uris(tmp_path):
    for day in ("2026-12-03", "2026-12-04"):
        (tmp_path / day).mkdir()
        for i in range(5):
            pd.DataFrame({"text": ["a"]}).to_parquet(tmp_path / day / f"{i}.parquet")
    plan = plan_scoring("/models/m", f"{tmp_path}/{{yesterday}}/", f"{tmp_path}/out/{{today}}", shards=2,
                        run_time="2026-12-04T03:00:00Z")
    assert plan["input"] == f"{tmp_path}/2026-12-03/" and plan["output"] == f"{tmp_path}/out/2026-12-04"
    assert [[f.rsplit("/", 1)[1] for f in s["files"]] for s in plan["shards"]] == [
        ["0.parquet", "2.parquet", "4.parquet"], ["1.parquet", "3.parquet"]]
    assert [s["index"] for s in plan["shards"]] == [0, 1]
    # Never more shards than files.
    assert len(plan_scoring("/models/m", f"{tmp_path}/2026-12-03", str(tmp_path / "o"), 8)["shards"]) == 5
    assert dated("s3://b/{today}", "2027-01-01T00:30:00+00:00") == "s3://b/2027-01-01"
    with pytest.raises(CockatooError, match=r"only \{today\} and \{yesterday\}"):
        dated("s3://b/{date}")
    unresolved = "{{$.pipeline_job_schedule_time_utc}}"
    with pytest.raises(CockatooError, match=rf"the run's time {re.escape(repr(unresolved))} is no ISO time"):
        dated("s3://b/{today}", unresolved)


def _backlog(tmp_path, rows=150):
    texts = [f"post {i}: " + ("win a free prize now" if i % 3 == 0 else "see you at lunch")
             for i in range(rows)]
    frame = pd.DataFrame({"text": texts, "ref": [f"r{i}" for i in range(rows)]})
    folder = tmp_path / "backlog"
    folder.mkdir()
    for i, part in enumerate(np.array_split(np.arange(rows), 3)):
        frame.iloc[part].to_parquet(folder / f"part{i}.parquet")
    return folder, frame


@pytest.fixture
def champion(trained_run, tmp_path):
    """trained_run's model registered as version 1 of "m", with the champion alias."""
    from cockatoo_lib.release.model_registry import CHAMPION, MLflowRegistry, Registration, local_registry_uri

    uri = local_registry_uri(tmp_path / "registry")
    registry = MLflowRegistry(uri)
    version = registry.register("m", Registration(str(trained_run["model"]), {}, {}, {}))
    registry.set_alias("m", CHAMPION, version.version)
    return uri, version


def test_a_local_run_scores_every_shard_with_the_champion_pinned_at_the_start(trained_run, champion, tmp_path,
                                                                              capsys, monkeypatch):
    registry_uri, version = champion
    # The steps' processes unmeasured (each would start coverage): the rerun below measures the
    # same component code in this process.
    monkeypatch.delenv("COVERAGE_PROCESS_CONFIG", raising=False)
    folder, frame = _backlog(tmp_path)
    out = tmp_path / "scored"
    argv = ["score", "--input", folder, "--output", out, "--model", "models:/m@champion", "--registry-uri",
            registry_uri, "--shards", "2", "--output-root", tmp_path / "root"]
    code, stdout, err = run_cli(argv, capsys, monkeypatch)
    assert code == 0, err
    assert f"{out}: 150 rows in 2 shards, scored by models:/m/{version.version}" in stdout
    # Parquet footers give each shard's progress its total, so a rate and an ETA: "100/100 [00:01<00:00".
    # (tqdm may draw a finished bar twice.)
    finished = set(re.findall(r"predict: 100%\S* ([\d.]+)/([\d.]+) \[", stdout))
    assert finished == {("100", "100"), ("50.0", "50.0")}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == f"models:/m/{version.version}"
    assert [s["rows"] for s in manifest["shards"]] == [100, 50]  # files 0 and 2, then file 1
    for shard in ("shard-00000", "shard-00001"):
        assert json.loads((out / shard / "manifest.json").read_text())["model"] == manifest["model"]
    scored = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("shard-*/part-*.parquet"))])
    assert sorted(scored["ref"]) == sorted(frame["ref"])
    classifier = Classifier.load(trained_run["model"])
    want = pd.DataFrame(classifier.predict_proba(frame["text"].tolist()), index=frame["ref"])
    got = scored.set_index("ref").loc[frame["ref"], [f"p_{x}" for x in classifier.labels]]
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), atol=1e-5)
    hits = want.to_numpy() >= classifier.thresholds
    assert manifest["positives"] == dict(zip(classifier.labels, hits.sum(axis=0).tolist()))

    # A run that died before finish: shard 1 lost a part, finish never ran. The rerun (the same
    # components in this process, measured there: the kfp.local wiring is the first run's) keeps
    # shard 0 as it is (finished with the same version and files) and writes only what is missing.
    (out / "manifest.json").unlink()
    shutil.rmtree(out / "shard-00001")
    kept = (out / "shard-00000" / "part-00000.parquet").stat().st_mtime_ns
    model, output_uri, shards, plan = score.plan_scoring.python_func(
        model="models:/m@champion", input_uri=str(folder), output_uri=str(out), shards=2,
        registry_uri=registry_uri, run_time="")
    assert model == manifest["model"] and plan["shards"] == shards
    rows = [score.score_shard.python_func(model=model, shard=shard, output_uri=output_uri,
                                          registry_uri=registry_uri, text_column="text", image_column="",
                                          batch_size=64) for shard in shards]
    assert rows == [100, 50]
    scored = dsl.Artifact(uri=str(tmp_path / "scored.json"))
    metrics = dsl.Metrics(uri=str(tmp_path / "metrics"))
    score.finish_scoring.python_func(plan=plan, scored=scored, metrics=metrics)
    assert json.loads(Path(scored.path).read_text())["rows"] == 150 and metrics.metadata["rows"] == 150
    assert (out / "shard-00000" / "part-00000.parquet").stat().st_mtime_ns == kept
    # Finished: another run is refused at its plan, before anything scores.
    with pytest.raises(CockatooError, match=r"is finished already \(it has manifest.json\)"):
        plan_scoring("models:/m@champion", str(folder), str(out), 2, registry_uri)


def test_a_shard_with_a_bad_file_fails_naming_it_and_nothing_is_published(trained_run, tmp_path, capsys,
                                                                           monkeypatch):
    # Its steps' processes unmeasured, as above.
    monkeypatch.delenv("COVERAGE_PROCESS_CONFIG", raising=False)
    folder, _ = _backlog(tmp_path)
    pd.DataFrame({"body": ["no text column"]}).to_parquet(folder / "a-bad.parquet")  # shard 0's first
    out = tmp_path / "scored"
    argv = ["score", "--input", folder, "--output", out, "--model", trained_run["model"], "--shards", "2",
            "--output-root", tmp_path / "root"]
    code, _, err = run_cli(argv, capsys, monkeypatch)
    assert code == 2
    # The one line says which step failed and why, from the step's own error.
    line = error_line(err)
    assert line.startswith("error: the local run failed at shard 0: ") and "a-bad.parquet" in line, line
    assert not (out / "manifest.json").exists()


def test_a_daily_schedule_scores_yesterday_and_catches_up_the_days_it_missed(capsys, monkeypatch):
    with FakeKFP() as fake:
        code, out, err = run_cli(["schedule", "--pipeline", "cockatoo-score", "--host", fake.url, "--cron",
                                  "0 0 2 * * *", "-p", "input_uri=gs://b/posts/{yesterday}/",
                                  "-p", "output_uri=gs://b/scores/{yesterday}/", "-p", "shards=64"],
                                 capsys, monkeypatch)
        assert code == 0, err
        (recurring,) = fake.recurring_runs
    assert recurring.display_name == "cockatoo-daily-score"
    # Unlike the weekly retrain: each missed day's run scores its own day.
    assert int(recurring.max_concurrency) == 1 and recurring.no_catchup is False
    assert recurring.pipeline_spec["pipeline_spec"]["pipelineInfo"]["name"] == "cockatoo-score"
    assert recurring.runtime_config.parameters == {"input_uri": "gs://b/posts/{yesterday}/",
                                                   "output_uri": "gs://b/scores/{yesterday}/", "shards": 64}


def test_the_score_pipeline_needs_its_input_and_output(capsys, monkeypatch, tmp_path):
    code, _, err = run_cli(["compile", "--pipeline", "cockatoo-scores", "-o", tmp_path / "x.yaml"], capsys,
                           monkeypatch)
    assert code == 2 and "unknown pipeline 'cockatoo-scores'; one of: cockatoo-train, cockatoo-score" in err
    with pytest.raises(CockatooError, match="cockatoo-score needs the parameters input_uri, output_uri"):
        check_params({}, SCORE_PIPELINE)
    with pytest.raises(CockatooError, match="shards"):
        check_params({"input_uri": "a", "output_uri": "b", "shards": 0}, SCORE_PIPELINE)
