"""The `cockatoo-score` pipeline's three steps: plan, score a shard (many at once), finish.

- plan: the model URI pinned to one version (models:/NAME@ALIAS -> models:/NAME/VERSION, read
  once, so every shard scores with the version the alias named when the run started), the input
  listed once and its files dealt round-robin to at most `shards` shards (a shard is a set of
  files: files are the unit a pod reads); `{today}` and `{yesterday}` in the input and output
  URIs become the run's UTC date and the day before, so a daily schedule scores yesterday's posts.
- shard i: `predict --output OUTPUT/shard-0000i/` on its files. Its Parquet parts and its
  manifest are written create-only, so a retried shard keeps what an earlier try finished and
  overwrites nothing; a shard already finished with the same model and files is done.
- finish: every shard's manifest read and checked; OUTPUT/manifest.json (rows, model version,
  per-label positives, seconds, the shards) written last, create-only.
"""

from __future__ import annotations

import datetime as dt
import json
import time

from cockatoo_lib.errors import CockatooError
from cockatoo_lib.release.batch_predict import MANIFEST, finished_already, input_files, predict_folder
from cockatoo_lib.release.model_registry import open_registry, parse_model_uri
from cockatoo_lib.storage import remote
from cockatoo_lib.storage.publish import create_only


def shard_folder(index: int | float) -> str:
    # int(): a plan that went through KFP holds its numbers as floats (a protobuf Struct's doubles).
    return f"shard-{int(index):05d}"


def pin_model(model: str, registry_uri: str | None) -> str:
    """models:/NAME@ALIAS as the version the alias names now; any other URI as given."""
    if not model.startswith("models:/"):
        return model
    name, alias, _ = parse_model_uri(model)
    if alias is None:
        return model
    version = open_registry(registry_uri).by_alias(name, alias)
    if version is None:
        raise CockatooError(f"model {model}: no version of {name} has the alias {alias!r} in the registry "
                            f"{registry_uri or '(default)'}")
    return version.uri


def dated(uri: str, run_time: str = "") -> str:
    """`uri` with {today} and {yesterday} as the run's UTC date (YYYY-MM-DD) and the day before.
    `run_time`: an ISO time (KFP's schedule time), empty for now."""
    try:
        when = (dt.datetime.fromisoformat(run_time.replace("Z", "+00:00")) if run_time
                else dt.datetime.now(dt.UTC))
    except ValueError:
        raise CockatooError(f"the run's time {run_time!r} is no ISO time (KFP's schedule time placeholder "
                            "unresolved?); {today} and {yesterday} need it") from None
    day = when.astimezone(dt.UTC).date()
    try:
        return uri.format(today=day.isoformat(), yesterday=(day - dt.timedelta(days=1)).isoformat())
    except (KeyError, IndexError, ValueError) as exc:
        raise CockatooError(f"{uri!r}: only {{today}} and {{yesterday}} may appear in braces "
                            f"({exc})") from None


def plan_scoring(model: str, input_uri: str, output_uri: str, shards: int, registry_uri: str | None = None,
                 run_time: str = "") -> dict:
    """What every shard step needs: the pinned model, the dated URIs, each shard's files."""
    from cockatoo_lib.plan.limits import check_range

    check_range("shards", shards)
    input_uri, output_uri = dated(input_uri, run_time), dated(output_uri, run_time).rstrip("/")
    fs, root = remote.url_to_fs(output_uri)
    if fs.exists(f"{root}/{MANIFEST}"):
        raise finished_already(output_uri)
    files = input_files(input_uri)
    count = min(shards, len(files))
    return {"model": pin_model(model, registry_uri), "input": input_uri, "output": output_uri,
            "started": time.time(), "shards": [{"index": i, "files": files[i::count]} for i in range(count)]}


def shard_output(output_uri: str, index: int | float) -> str:
    return f"{output_uri.rstrip('/')}/{shard_folder(index)}"


def score_shard(model: str, files: list[str], output_uri: str, index: int, registry_uri: str | None = None,
                text_column: str = "text", image_column: str | None = None, batch_size: int = 64) -> dict:
    return predict_folder(model, files[0], shard_output(output_uri, index), text_column, image_column or None,
                          registry_uri, batch_size, files=files, finished_is_done=True)


def finish_scoring(plan: dict) -> dict:
    """Check that every shard finished with the plan's model on its files; write the manifest."""
    output_uri = plan["output"]
    fs, root = remote.url_to_fs(output_uri)
    shards = []
    for shard in plan["shards"]:
        path = f"{shard_output(root, shard['index'])}/{MANIFEST}"
        try:
            done = json.loads(fs.cat_file(path))
        except FileNotFoundError:
            raise CockatooError(f"shard {shard['index']} has no {path}: its step did not finish; nothing "
                                "is published") from None
        if done.get("model") != plan["model"] or done.get("files") != shard["files"]:
            raise CockatooError(f"{path} is of another run (model {done.get('model')}, "
                                f"{len(done.get('files', []))} files); use a new output")
        shards.append(done)
    labels = shards[0]["labels"]
    manifest = {
        "rows": sum(s["rows"] for s in shards),
        "model": plan["model"],
        "input": plan["input"],
        "output": output_uri,
        "labels": labels,
        "positives": {x: sum(s["positives"][x] for s in shards) for x in labels},
        "shards": [{"folder": shard_folder(p["index"]), "rows": s["rows"], "files": len(p["files"]),
                    "seconds": s["seconds"]} for p, s in zip(plan["shards"], shards, strict=True)],
        "seconds": round(time.time() - plan["started"], 1),
    }
    try:
        create_only(fs, f"{root}/{MANIFEST}", json.dumps(manifest, indent=2).encode())
    except FileExistsError:
        raise CockatooError(f"{output_uri}/{MANIFEST} appeared while this run finished (another run on the "
                            "same output?)") from None
    return manifest
