import json
import os
import re
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from fake_kfp import FakeKFP
from google.protobuf import json_format
from helpers import error_line, run_cli
from kfp import dsl
from kfp.pipeline_spec import pipeline_spec_pb2

from cockatoo_lib.release.model_registry import MLflowRegistry, local_registry_uri
from cockatoo_lib.training.model_folder import read_model_manifest
from components import evaluate, prepare_data, promote, tokenize, train
from pipelines.cockatoo_train import PIPELINE_NAME
from pipelines.runner import compile_pipeline, pipeline_inputs, run_local

# Trains, runs pipelines or starts servers: `make test` runs these, `make test-fast` not.
pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).parent / "golden" / "cockatoo-train.yaml"
PARAMETERS = {"model_type", "data_config", "labels", "overrides", "base_model", "seed",
              "max_train_samples", "tokenized_cache_root", "gpus", "nodes", "checkpoint_root", "registry_uri",
              "model_name", "min_improvement", "max_label_drop", "allow_label_change",
              "min_gain_over_baseline", "allow_below_baseline"}
FAST = {"num_epochs": 1, "batch_size": 16, "gradient_accumulation_steps": 1, "learning_rate": 1e-3}


def _docs(path):
    pipeline, platform = yaml.safe_load_all(Path(path).read_text())
    return (json_format.ParseDict(pipeline, pipeline_spec_pb2.PipelineSpec()),
            json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec()))


def test_compiled_pipeline_matches_the_golden_file(tmp_path):
    compiled = compile_pipeline(tmp_path / "p.yaml").read_text()
    assert compiled == GOLDEN.read_text(), "the compiled pipeline changed: review, then `make golden`"


def test_compiled_yaml_is_a_pipeline_spec_with_resources_caching_and_secrets():
    spec, platform = _docs(GOLDEN)
    assert spec.pipeline_info.name == "cockatoo-train"
    assert set(spec.root.input_definitions.parameters) == PARAMETERS
    assert spec.root.input_definitions.parameters["model_type"].default_value.string_value == "deberta"
    tasks = spec.root.dag.tasks
    assert set(tasks) >= {"prepare-data", "tokenize", "train", "evaluate", "promote"}
    schedule = tasks["prepare-data"].inputs.parameters["schedule_time"].runtime_value.constant
    assert schedule.string_value == dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER
    assert not tasks["prepare-data"].caching_options.enable_cache
    assert all(tasks[t].caching_options.enable_cache for t in ("tokenize", "train", "evaluate"))
    # The run form's seed drives prepare's sampling and training (the split has its own seed).
    for task in ("prepare-data", "train"):
        assert tasks[task].inputs.parameters["seed"].component_input_parameter == "seed"
    assert set(spec.root.dag.outputs.artifacts) == {"model", "evaluation", "report", "model_card", "decision",
                                                    "gate"}
    importer = next(t for n, t in tasks.items() if n.startswith("importer"))
    assert importer.component_ref.name.startswith("comp-importer")
    assert "importer" in str(tasks["train"].inputs.artifacts["tokenized"])
    executors = spec.deployment_spec.fields["executors"].struct_value.fields
    by_step = {name.removeprefix("exec-"): json_format.MessageToDict(v.struct_value)["container"]
               for name, v in executors.items() if "importer" not in name}
    for step, container in by_step.items():
        assert container["resources"]["cpuRequest"] > 0 and container["resources"]["memoryRequest"] > 0
        assert container["image"].endswith("cockatoo-cuda:0.1.0" if step == "train" else "cockatoo-cpu:0.1.0")
        assert "pip install" not in json.dumps(container)  # nothing installed at pod start
    assert by_step["train"]["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    configs = json_format.MessageToDict(platform)["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for config in configs.values():
        assert config["secretAsEnv"][0]["keyToEnv"] == [{"secretKey": "token", "envVar": "HF_TOKEN"}]
    for step in ("exec-train", "exec-tokenize"):
        assert configs[step]["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
        assert configs[step]["emptyDirMounts"][0]["medium"] == "Memory"


def test_compile_command_sets_images_accelerator_and_placement(tmp_path, capsys, monkeypatch):
    out = tmp_path / "p.yaml"
    code, _, err = run_cli(["compile", "-o", out, "--image-registry", "europe-docker.pkg.dev/p/r",
                            "--image-tag", "1.2.3", "--accelerator-type", "nvidia-tesla-a100",
                            "--gpus", "2", "--node-selector", "pool=gpu", "--toleration", "gpu=true",
                            "--registry-uri", "http://mlflow.mlflow:5000"], capsys, monkeypatch)
    assert code == 0, err
    text = out.read_text()
    assert "europe-docker.pkg.dev/p/r/cockatoo-cuda:1.2.3" in text
    assert "europe-docker.pkg.dev/p/r/cockatoo-cpu:1.2.3" in text
    spec, platform = _docs(out)
    assert spec.root.input_definitions.parameters["gpus"].default_value.number_value == 2
    assert spec.root.input_definitions.parameters["registry_uri"].default_value.string_value == \
        "http://mlflow.mlflow:5000"
    train_config = json_format.MessageToDict(platform)["platforms"]["kubernetes"]["deploymentSpec"][
        "executors"]["exec-train"]
    assert train_config["nodeSelector"]["labels"] == {"pool": "gpu"}
    assert train_config["tolerations"][0] == {"key": "gpu", "operator": "Equal", "value": "true",
                                              "effect": "NoSchedule"}


def test_scratch_volume_for_image_data_on_prepare_and_tokenize(tmp_path, capsys, monkeypatch):
    out = tmp_path / "p.yaml"
    code, _, err = run_cli(["compile", "-o", out, "--scratch-size", "100Gi"], capsys, monkeypatch)
    assert code == 0, err
    spec, platform = _docs(out)
    configs = json_format.MessageToDict(platform)["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    executors = spec.deployment_spec.fields["executors"].struct_value.fields
    for step in ("exec-prepare-data", "exec-tokenize"):
        (volume,) = configs[step]["genericEphemeralVolume"]
        assert volume["mountPath"] == "/scratch" and volume["size"] == "100Gi"
        env = json_format.MessageToDict(executors[step].struct_value)["container"]["env"]
        assert {"name": "TMPDIR", "value": "/scratch"} in env
    assert "genericEphemeralVolume" not in configs["exec-train"]


# ------------------------------------------------------------------ components


def test_components_run_through_python_func(tiny_models, tmp_path):
    base = str(tiny_models["deberta"])
    data = dsl.Dataset(uri=str(tmp_path / "data"))
    prepare_data.python_func(data_config="sample", labels=[], seed=1, max_samples=300,
                             model_type="deberta", overrides=FAST, base_model=base,
                             schedule_time="2026-11-23T03:00:00Z", data=data)
    assert data.metadata["train_rows"] + data.metadata["validation_rows"] + data.metadata["test_rows"] == 300
    assert len(data.metadata["fingerprint"]) == 64

    tokenized = dsl.Dataset(uri=str(tmp_path / "tok"))
    out = tokenize.python_func(data=data, model_type="deberta", overrides=FAST, base_model=base,
                               cache_root=str(tmp_path / "cache"), tokenized=tokenized)
    assert tokenized.metadata["cache_hit"] is False and tokenized.metadata["cache_key"]
    # Tokenizer diagnostics reach the step's metadata in the KFP UI.
    assert 0 <= tokenized.metadata["unknown_token_share"] < 0.05 and tokenized.metadata["warnings"] == []
    assert set(tokenized.metadata["diagnostics_by_source"]) == {"jigsaw", "toxicchat", "phishing"}
    assert out.cache_uri.startswith(str(tmp_path / "cache" / "tokenized" / tokenized.metadata["cache_key"]))

    entry = dsl.Dataset(uri=out.cache_uri)
    model = dsl.Model(uri=str(tmp_path / "model"))
    # One GPU (here: none): the step trains in its own process (test_the_train_step_on_several_gpus_...
    # covers gpus > 1).
    train.python_func(tokenized=entry, model_type="deberta", overrides=FAST, base_model=base, seed=7,
                      gpus=1, checkpoint_root=str(tmp_path / "durable"), nodes=1,
                      task_config=dsl.TaskConfig(), model=model)
    assert model.metadata["model_type"] == "deberta" and model.metadata["epochs"] == 1
    assert read_model_manifest(model.path)["processes"] == 1
    assert 0 <= model.metadata["best_validation_metric"] <= 1
    assert model.metadata["selection_metric"] == "f1"
    # The run form's seed reaches training and is recorded with the model.
    assert model.metadata["seed"] == 7 and read_model_manifest(model.path)["plan"]["seed"] == 7

    outputs = {"evaluation": dsl.Artifact(uri=str(tmp_path / "eval")),
               "metrics": dsl.Metrics(uri=str(tmp_path / "metrics")),
               "classification_metrics": dsl.ClassificationMetrics(uri=str(tmp_path / "cm")),
               "report": dsl.HTML(uri=str(tmp_path / "report.html")),
               "model_card": dsl.Markdown(uri=str(tmp_path / "card.md"))}
    evaluate.python_func(model=model, tokenized=entry, **outputs)
    scalars = outputs["metrics"].metadata
    assert set(scalars) >= {"test_macro_f1", "test_micro_f1", "f1_scam", "baseline_test_macro_f1",
                            "test_mean_average_precision", "source_phishing_macro_f1"}
    assert scalars["test_macro_f1_minus_baseline"] == pytest.approx(
        scalars["test_macro_f1"] - scalars["baseline_test_macro_f1"], abs=1e-5)
    card = Path(outputs["model_card"].path).read_text()
    assert card.startswith("# Cockatoo moderation classifier: deberta")
    assert card == (Path(model.path) / "README.md").read_text()
    matrix = outputs["classification_metrics"].metadata["confusionMatrix"]
    assert [s["displayName"] for s in matrix["annotationSpecs"]][0] == "scam"
    assert Path(outputs["report"].path).read_text().startswith("<!doctype html>")
    assert outputs["evaluation"].metadata["test_macro_f1"] == pytest.approx(
        outputs["metrics"].metadata["test_macro_f1"], abs=1e-6)

    registry_uri = local_registry_uri(tmp_path / "root")
    gate = {"decision": dsl.Artifact(uri=str(tmp_path / "decision")),
            "decision_report": dsl.Markdown(uri=str(tmp_path / "decision.md"))}
    promote.python_func(model=model, data=data, evaluation=outputs["evaluation"], registry_uri=registry_uri,
                        model_name="m", run_id="run-1", min_improvement=0.0, max_label_drop=0.02,
                        allow_label_change=False, min_gain_over_baseline=-1.0, allow_below_baseline=False,
                        **gate)
    # Any model beats the baseline by more than -1: promoted, with no override used.
    assert gate["decision"].metadata["promoted"] is True and gate["decision"].metadata["version"] == "1"
    assert gate["decision"].metadata["below_baseline_override"] is False
    assert gate["decision"].metadata["model_uri"] == "models:/m/1"
    assert Path(gate["decision_report"].path).read_text().startswith("# Gate: m version 1 promoted")


def test_the_train_step_on_several_gpus_starts_one_cockatoo_train_per_gpu(trained_run, tmp_path, monkeypatch,
                                                                         capsys):
    """gpus=2: the step hands `cockatoo train` to torchrun (test_distributed runs that in two
    processes); the command it hands on trains the run's model when run as it is, and a failed
    launch is one error naming the count."""
    from cockatoo_lib.errors import CockatooError
    from cockatoo_lib.training import distributed

    launched = []
    monkeypatch.setattr(distributed, "launch", lambda gpus, argv: launched.append((gpus, argv)) or 3)
    model = dsl.Model(uri=str(tmp_path / "model"))
    base = read_model_manifest(trained_run["model"])["base_model"]
    with pytest.raises(CockatooError, match="training in 2 processes failed \\(exit code 3\\)"):
        train.python_func(tokenized=dsl.Dataset(uri=str(trained_run["tok"])), model_type="deberta",
                          overrides=FAST, base_model=base, seed=7, gpus=2, checkpoint_root="", nodes=1,
                          task_config=dsl.TaskConfig(), model=model)
    ((gpus, argv),) = launched
    assert gpus == 2 and argv[:5] == ["train", "--tokenized", str(trained_run["tok"]), "--output", model.path]
    code, _, err = run_cli(argv, capsys, monkeypatch)  # what each of the processes runs
    assert code == 0, err[-2000:]
    trained = read_model_manifest(model.path)
    assert (trained["seed"], trained["base_model"], trained["epochs"]) == (7, base, 1)


def test_bad_model_type_fails_the_first_step_listing_valid_values(tmp_path):
    from cockatoo_lib.errors import CockatooError

    with pytest.raises(CockatooError, match="unknown model type 'gpt'; valid: deberta, modernbert"):
        prepare_data.python_func(data_config="sample", labels=[], seed=1, max_samples=0,
                                 model_type="gpt", overrides={}, base_model="", schedule_time="",
                                 data=dsl.Dataset(uri=str(tmp_path / "data")))
    assert not (tmp_path / "data").exists()


def test_promote_on_a_cluster_needs_a_registry_uri(trained_run):
    from cockatoo_lib.errors import CockatooError

    with pytest.raises(CockatooError, match="registry_uri is empty, but this step runs on a cluster"):
        promote.python_func(model=dsl.Model(uri=str(trained_run["model"])),
                            data=dsl.Dataset(uri=str(trained_run["data"])),
                            evaluation=dsl.Artifact(uri=str(trained_run["eval"])), registry_uri="",
                            model_name="m", run_id="r", min_improvement=0.0, max_label_drop=0.02,
                            allow_label_change=False, min_gain_over_baseline=0.0, allow_below_baseline=False,
                            decision=dsl.Artifact(uri="gs://bucket/run/decision"),
                            decision_report=dsl.Markdown(uri="gs://bucket/run/decision.md"))


def test_train_on_a_cluster_refuses_a_local_checkpoint_root(tmp_path):
    from cockatoo_lib.errors import CockatooError

    with pytest.raises(CockatooError, match="checkpoint_root '/tmp/ck' is a local folder, but this step"):
        train.python_func(tokenized=dsl.Dataset(uri=str(tmp_path)), model_type="minilm", overrides={},
                          base_model="", seed=1, gpus=1, checkpoint_root="/tmp/ck", nodes=1,
                          task_config=dsl.TaskConfig(),
                          model=dsl.Model(uri="gs://bucket/run/train/model"))


def test_tokenize_on_a_cluster_refuses_a_local_cache_root(small_data, tmp_path):
    from cockatoo_lib.errors import CockatooError

    output = dsl.Dataset(uri="gs://bucket/run/tokenize/tokenized")
    with pytest.raises(CockatooError, match="local folder, but this step runs on a cluster"):
        tokenize.python_func(data=dsl.Dataset(uri=str(small_data)), model_type="minilm",
                             overrides={}, base_model="", cache_root="", tokenized=output)


# ------------------------------------------------------------------ local runs


@pytest.fixture(scope="module")
def local_run(tiny_models, image_data, tmp_path_factory):
    """One run of the whole pipeline from its compiled file, shared by the tests below (a run
    takes a minute): CLIP with images, so that both towers go through every step, with gate
    rules that only the run's override can pass. Started with a PATH whose python3 is not this
    environment's."""
    root = tmp_path_factory.mktemp("local-run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", "/usr/bin:/bin")
        # Its steps' processes unmeasured: test_components_run_through_python_func measures the
        # same component code in this process, at a fraction of the cost.
        patch.delenv("COVERAGE_PROCESS_CONFIG", raising=False)
        result = run_local({"model_type": "clip-vit", "base_model": str(tiny_models["clip-vit"]),
                            "data_config": str(image_data / "data.yaml"), "overrides": FAST,
                            "min_gain_over_baseline": 1.0, "allow_below_baseline": True,
                            "tokenized_cache_root": str(root / "cache")}, root / "root")
        path_after = os.environ["PATH"]
    return {**result, "root": root, "path_after": path_after}


def test_local_run_of_the_whole_pipeline_from_its_compiled_file(local_run):
    root = local_run["root"]
    assert local_run["path_after"] == "/usr/bin:/bin"  # the run left the caller's environment alone
    assert (Path(local_run["model"]) / "cockatoo.json").exists()
    assert 0 <= local_run["test_macro_f1"] <= 1
    assert Path(local_run["report"]).read_text().startswith("<!doctype html>")
    # The gate ran in the run, with the run's rules: no model gains 1.0 over the baseline, so only
    # the override promoted the first version of the embedded registry.
    decision = local_run["decision"]
    assert decision["rules"]["min_gain_over_baseline"] == 1.0
    assert decision["promoted"] and decision["challenger"] == "1"
    assert decision["baseline"]["passed"] is False and decision["baseline"]["overridden"] is True
    assert local_run["registry_uri"] == local_registry_uri(root / "root")
    version = MLflowRegistry(local_run["registry_uri"]).by_alias("cockatoo-moderation", "champion")
    assert version.version == "1" and version.tags["model_type"] == "clip-vit"
    assert version.tags["kfp_run_id"] not in ("", "local")  # kfp.local's run id
    # What ran is the compiled file a cluster would receive.
    assert (root / "root" / f"{PIPELINE_NAME}.yaml").read_text().startswith("# PIPELINE DEFINITION")


def test_local_run_of_clip_trains_on_images_and_predicts_with_them(local_run, image_data, tmp_path):
    model = read_model_manifest(local_run["model"])
    assert model["model_type"] == "clip-vit" and model["labels"] == ["scam"] and model["train_images"] > 0
    assert (Path(local_run["model"]) / "preprocessor_config.json").exists()
    (entry,) = (local_run["root"] / "cache" / "tokenized").iterdir()
    assert json.loads((entry / "entry-000000.json").read_text())["meta"]["images"]["shape"] == [3, 224, 224]
    metrics = json.loads(Path(local_run["metrics"]).read_text())
    assert metrics["model_type"] == "clip-vit"
    # Predict reads the image column as prepare does; rows with an image score differently
    # with it than without it, rows without one the same.
    from cockatoo_lib.release.predict import Classifier, predict_file

    predict_file(local_run["model"], str(image_data / "posts.csv"), tmp_path / "p.parquet",
                 text_column="caption", image_column="image")
    scored = pd.read_parquet(tmp_path / "p.parquet")
    posts = pd.read_csv(image_data / "posts.csv")
    assert len(scored) == len(posts) and "image" not in scored
    text_only = Classifier.load(local_run["model"]).predict_proba(posts["caption"].tolist())[:, 0]
    has_image = posts["image"].notna().to_numpy()
    assert np.allclose(scored["p_scam"][~has_image], text_only[~has_image], atol=1e-5)
    assert not np.allclose(scored["p_scam"][has_image], text_only[has_image], atol=1e-5)


def test_run_command_checks_parameters_before_running(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["run", "-m", "bert", "--output-root", tmp_path], capsys, monkeypatch)
    assert code == 2 and "unknown model type 'bert'" in error_line(err)
    code, _, err = run_cli(["run", "-m", "minilm", "--set", "epochs=2", "--output-root", tmp_path],
                           capsys, monkeypatch)
    assert code == 2 and "unknown plan setting 'epochs'" in error_line(err)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ cluster


def test_submit_creates_a_run_with_the_pipeline_and_its_parameters(capsys, monkeypatch):
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "secret-token")
    with FakeKFP() as fake:
        code, out, err = run_cli(["submit", "--host", fake.url, "--experiment", "moderation",
                                  "--model-type", "modernbert", "--set", "batch_size=4",
                                  "--param", "seed=7", "--param", 'labels=["scam","toxicity"]'],
                                 capsys, monkeypatch)
        assert code == 0, err
        (run,) = fake.runs
        assert re.search(rf"{fake.url}/#/runs/details/[0-9a-f-]+$", out.strip())
    spec = run.pipeline_spec["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "cockatoo-train"
    assert set(run.runtime_config.parameters) <= set(spec["root"]["inputDefinitions"]["parameters"])
    assert run.runtime_config.parameters == {"model_type": "modernbert", "seed": 7,
                                             "labels": ["scam", "toxicity"],
                                             "overrides": {"batch_size": 4}}
    assert fake.experiments[run.experiment_id]["display_name"] == "moderation"
    assert {r["authorization"] for r in fake.requests} == {"Bearer secret-token"}


def test_schedule_creates_a_recurring_run_one_at_a_time_without_catch_up(capsys, monkeypatch):
    with FakeKFP() as fake:
        code, out, err = run_cli(["schedule", "--host", fake.url, "--cron", "0 0 3 * * 1",
                                  "--model-type", "deberta"], capsys, monkeypatch)
        assert code == 0, err
        (recurring,) = fake.recurring_runs
    assert recurring.trigger.cron_schedule.cron == "0 0 3 * * 1"
    assert int(recurring.max_concurrency) == 1 and recurring.no_catchup is True  # int64: a JSON string
    assert recurring.runtime_config.parameters == {"model_type": "deberta"}
    assert recurring.pipeline_spec["pipeline_spec"]["root"]["dag"]["tasks"]["prepare-data"]
    assert "/#/recurringrun/details/" in out


SPOT = ["--node-selector", "cloud.google.com/gke-spot=true", "--toleration", "cloud.google.com/gke-spot=true",
        "--retries", "5", "--checkpoint-root", "gs://team/checkpoints", "--image-tag", "1.2.3"]


@pytest.mark.parametrize("command", [["submit"], ["schedule", "--cron", "0 0 3 * * 1"]])
def test_submit_and_schedule_take_the_cluster_options_of_compile(command, capsys, monkeypatch):
    with FakeKFP() as fake:
        code, _, err = run_cli([command[0], "--host", fake.url, *command[1:], *SPOT], capsys, monkeypatch)
        assert code == 0, err
        (sent,) = fake.runs or fake.recurring_runs
    spec, platform = sent.pipeline_spec["pipeline_spec"], sent.pipeline_spec["platform_spec"]
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert executors["exec-train"]["nodeSelector"]["labels"] == {"cloud.google.com/gke-spot": "true"}
    assert executors["exec-train"]["tolerations"][0]["key"] == "cloud.google.com/gke-spot"
    assert spec["root"]["dag"]["tasks"]["train"]["retryPolicy"]["maxRetryCount"] == 5
    assert spec["root"]["inputDefinitions"]["parameters"]["checkpoint_root"]["defaultValue"] == \
        "gs://team/checkpoints"
    assert spec["deploymentSpec"]["executors"]["exec-train"]["container"]["image"].endswith(":1.2.3")


def test_schedule_reuses_the_named_experiment_and_reports_a_lookup_error(capsys, monkeypatch):
    args = ["schedule", "--cron", "0 0 3 * * 1", "--experiment", "moderation"]
    with FakeKFP() as fake:
        for _ in range(2):
            code, _, err = run_cli([args[0], "--host", fake.url, *args[1:]], capsys, monkeypatch)
            assert code == 0, err
        assert [e["display_name"] for e in fake.experiments.values()] == ["moderation"]
        assert {r.experiment_id for r in fake.recurring_runs} == set(fake.experiments)
        # Two experiments of one name: an error to show, not a reason to create a third.
        fake.experiments["other"] = {"display_name": "moderation", "experiment_id": "other"}
        code, _, err = run_cli([args[0], "--host", fake.url, *args[1:]], capsys, monkeypatch)
        assert code == 2 and "Multiple experiments is found with name moderation" in error_line(err)
        assert len(fake.experiments) == 2 and len(fake.recurring_runs) == 2


@pytest.mark.parametrize("args, message", [
    (["schedule", "--cron", "0 3 * * 1"], "invalid cron '0 3 \\* \\* 1': KFP expects six fields"),
    (["submit", "--param", "learning_rate=1e-5"],
     "unknown cockatoo-train parameter 'learning_rate'; valid: model_type"),
    (["submit", "--model-type", "bert"], "unknown model type 'bert'"),
])
def test_cluster_commands_check_input_before_contacting_the_server(args, message, capsys, monkeypatch):
    with FakeKFP() as fake:
        code, _, err = run_cli([args[0], "--host", fake.url, *args[1:]], capsys, monkeypatch)
        assert code == 2 and re.search(message, error_line(err))
        assert fake.requests == []


def test_unreachable_host_is_one_line(capsys, monkeypatch):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, _, err = run_cli(["submit", "--host", f"http://127.0.0.1:{port}"], capsys, monkeypatch)
    assert code == 2 and f"cannot reach KFP at http://127.0.0.1:{port}" in error_line(err)


def test_pipeline_inputs_are_the_documented_parameters():
    assert set(pipeline_inputs()) == PARAMETERS


def test_a_run_with_a_registry_of_its_own_makes_no_embedded_one(tmp_path, monkeypatch):
    def stop(*args, **kwargs):  # the parameters are settled by now
        raise RuntimeError("stop before compiling")

    monkeypatch.setattr("pipelines.runner.compile_pipeline", stop)
    with pytest.raises(RuntimeError, match="stop before compiling"):
        run_local({"model_type": "minilm", "registry_uri": "http://mlflow.example:5000"}, tmp_path / "root")
    assert not (tmp_path / "root" / "registry").exists()
    with pytest.raises(RuntimeError, match="stop before compiling"):
        run_local({"model_type": "minilm"}, tmp_path / "root")
    assert (tmp_path / "root" / "registry").is_dir()  # the embedded one, when none is given


def test_a_step_that_fails_in_a_local_run_says_why_in_the_one_line(tmp_path, capsys, monkeypatch):
    # A label outside 0/1 passes the checks before the run and fails in prepare, in its own process.
    pd.DataFrame({"text": [f"post {i}" for i in range(20)], "scam": [0, 1, 2, 0] * 5}).to_csv(
        tmp_path / "posts.csv", index=False)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({
        "labels": ["scam"], "sources": [{"name": "posts", "path": "posts.csv", "text_column": "text",
                                         "labels": {"scam": "scam"}}]}))
    code, _, err = run_cli(["run", "-m", "minilm", "--data-config", tmp_path / "data.yaml", "--output-root",
                            tmp_path / "runs"], capsys, monkeypatch)
    line = error_line(err)
    assert code == 2 and line.startswith("error: the local run failed: "), line
    assert "posts.csv" in line and "scam" in line, line
