"""Where trained models are registered, versioned and given aliases (`champion`, `previous`).

`ModelRegistry` is the small interface the pipeline uses; `MLflowRegistry` implements it with
the MLflow client: a SQLite store for local runs (`sqlite:///…`), a tracking server on a
cluster (`http://mlflow.mlflow:5000`, credentials from MLFLOW_TRACKING_* environment variables).
Another registry (Kubeflow's, Vertex AI's) is another class with these methods.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cockatoo_lib.errors import CockatooError, first_line

log = logging.getLogger(__name__)

CHAMPION, PREVIOUS = "champion", "previous"
# A cluster's MLflow credentials: the keys of the secret (cockatoo-mlflow) and the variables the
# MLflow client reads them from; the gate step and the model server get them alike.
MLFLOW_SECRET_KEYS = {"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD",
                      "token": "MLFLOW_TRACKING_TOKEN"}
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))/?$")


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class Registration:
    """What a run registers: the model folder, and what it is known by."""

    model_dir: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    # Per-epoch training metrics: [{"epoch": 1.0, "f1": ...}, ...], logged at their epochs.
    history: list[dict] = field(default_factory=list)
    # Files beside the model that belong to the run (metrics.json, the gate's decision).
    run_files: list[str] = field(default_factory=list)


class ModelRegistry(Protocol):
    uri: str

    def register(self, name: str, registration: Registration) -> ModelVersion: ...
    def version(self, name: str, version: str) -> ModelVersion | None: ...
    def by_alias(self, name: str, alias: str) -> ModelVersion | None: ...
    def find_version(self, name: str, tag: str, value: str) -> ModelVersion | None: ...
    def set_alias(self, name: str, alias: str, version: str) -> None: ...
    def tag_version(self, name: str, version: str, tags: dict[str, str]) -> None: ...
    def download(self, model_uri: str, dest: str | Path) -> Path: ...


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of models:/NAME@ALIAS or models:/NAME/VERSION."""
    match = MODEL_URI.match(uri)
    if not match:
        raise CockatooError(f"model URI {uri!r} is not models:/NAME@ALIAS or models:/NAME/VERSION")
    return match["name"], match["alias"], match["version"]


def local_registry_uri(root: str | Path) -> str:
    """The embedded registry of local runs: a SQLite file under `root`, artifacts beside it."""
    folder = Path(root).expanduser().resolve() / "registry"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def open_registry(uri: str | None) -> ModelRegistry:
    if not uri:
        raise CockatooError("no model registry given: pass --registry-uri (e.g. sqlite:///runs/registry/"
                            "mlflow.db, or http://mlflow.mlflow:5000)")
    return MLflowRegistry(uri)


class MLflowRegistry:
    """The MLflow Model Registry and tracking: one MLflow run per registration, in the
    experiment named after the model; the version's artifact is the whole model folder."""

    def __init__(self, uri: str):
        from mlflow import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def _call(self, what: str, fn, *args, **kwargs):
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise CockatooError(f"model registry {self.uri}: cannot {what}: "
                                f"{first_line(exc, 'message')}") from None
        except CockatooError:
            raise
        except Exception as exc:  # noqa: BLE001 - connection errors arrive as many types
            raise CockatooError(f"model registry {self.uri}: cannot {what}: "
                                f"{first_line(exc, 'message')}") from None

    def _experiment_id(self, name: str) -> str:
        experiment = self._call("read experiments", self.client.get_experiment_by_name, name)
        if experiment is not None:
            return experiment.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):  # artifacts beside the database, not in the cwd
            location = (Path(self.uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
        return self._call("create an experiment", self.client.create_experiment, name,
                          artifact_location=location)

    def register(self, name: str, registration: Registration) -> ModelVersion:
        client = self.client
        run = self._call("start a run", client.create_run, self._experiment_id(name),
                         tags=registration.tags, run_name=registration.tags.get("kfp_run_id") or None)
        run_id = run.info.run_id
        try:
            from mlflow.entities import Metric, Param

            params = [Param(k, str(v)[:6000]) for k, v in registration.params.items()]
            metrics = [Metric(k, float(v), 0, 0) for k, v in registration.metrics.items()]
            for row in registration.history:
                step = int(round(row["epoch"]))
                metrics += [Metric(f"validation_{k}", float(v), 0, step)
                            for k, v in row.items() if k != "epoch"]
            for start in range(0, max(len(params), len(metrics)), 100):  # MLflow's batch limits
                self._call("log the run", client.log_batch, run_id, metrics=metrics[start:start + 100],
                           params=params[start:start + 100])
            self._call("upload the model", client.log_artifacts, run_id, registration.model_dir, "model")
            for path in registration.run_files:
                self._call("upload run files", client.log_artifact, run_id, path)
            if self._call("read the registered model", client.get_registered_model, name) is None:
                self._call("create the registered model", client.create_registered_model, name)
            version = self._call("register a version", client.create_model_version, name,
                                 source=f"{run.info.artifact_uri}/model", run_id=run_id,
                                 tags=registration.tags)
        except BaseException:
            self._call("end the run", client.set_terminated, run_id, "FAILED")
            raise
        self._call("end the run", client.set_terminated, run_id, "FINISHED")
        log.info("registered %s version %s (MLflow run %s)", name, version.version, run_id)
        return ModelVersion(name, str(version.version), dict(registration.tags))

    def version(self, name: str, version: str) -> ModelVersion | None:
        found = self._call("read a version", self.client.get_model_version, name, version)
        return None if found is None else _version(found)

    def by_alias(self, name: str, alias: str) -> ModelVersion | None:
        model = self._call("read the registered model", self.client.get_registered_model, name)
        number = (model.aliases or {}).get(alias) if model is not None else None
        return None if number is None else self.version(name, str(number))

    def find_version(self, name: str, tag: str, value: str) -> ModelVersion | None:
        """The oldest version of `name` tagged `tag` = `value`, if any."""
        if "'" in name or not re.fullmatch(r"[\w.-]+", tag + value):
            raise CockatooError(f"cannot search the registry for tag {tag}={value!r}")
        found = self._call("search versions", self.client.search_model_versions,
                           f"name = '{name}' and tags.{tag} = '{value}'") or []
        found = sorted(found, key=lambda v: int(v.version))
        return _version(found[0]) if found else None

    def set_alias(self, name: str, alias: str, version: str) -> None:
        if self.version(name, version) is None:
            raise CockatooError(f"model registry {self.uri}: {name} has no version {version}")
        self._call("set an alias", self.client.set_registered_model_alias, name, alias, version)

    def tag_version(self, name: str, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._call("tag a version", self.client.set_model_version_tag, name, version, key, value)

    def download(self, model_uri: str, dest: str | Path) -> Path:
        from mlflow.artifacts import download_artifacts

        name, alias, number = parse_model_uri(model_uri)
        found = self.by_alias(name, alias) if alias else self.version(name, number)
        if found is None and alias:
            if self._call("read the registered model", self.client.get_registered_model, name) is None:
                raise CockatooError(f"model registry {self.uri}: no model named {name!r} is registered")
            why = " (no version has passed the gate yet; its decision says why)" if alias == CHAMPION else ""
            raise CockatooError(f"model registry {self.uri}: no version of {name} has the alias {alias!r}"
                                f"{why}; predict from a model folder, or give a version the alias by hand: "
                                f"cockatoo promote --model-name {name} --version N")
        if found is None:
            raise CockatooError(f"model registry {self.uri}: {model_uri} does not exist")
        source = self._call("find the version's files", self.client.get_model_version_download_uri,
                            name, found.version)
        return Path(self._call("download the model", download_artifacts, artifact_uri=source,
                               dst_path=str(dest), tracking_uri=self.uri))


def _version(found) -> ModelVersion:
    return ModelVersion(found.name, str(found.version), dict(found.tags or {}),
                        tuple(getattr(found, "aliases", ()) or ()))


def plan_params(plan: dict) -> dict[str, str]:
    """The plan as MLflow params (scalars as text, the rest as JSON)."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in plan.items()}
