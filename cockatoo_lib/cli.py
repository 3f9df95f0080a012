"""The `cockatoo` command line: every pipeline step, runnable on its own without KFP.

Bad input prints one line (`error: ...`) and exits with code 2; no traceback.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import typer

from cockatoo_lib.errors import CockatooError
from cockatoo_lib.plan.catalogue import CATALOGUE
from cockatoo_lib.storage.fileio import check_output

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train multi-label content-moderation classifiers.")

MODEL_TYPE = typer.Option("deberta", "--model-type", "-m", help=", ".join(CATALOGUE))
SET = typer.Option(None, "--set", "-s", help="override a plan setting: key=value (repeatable)")


def option_group(options: dict[str, tuple[type, typer.models.OptionInfo]], build: Callable, into: str):
    """A decorator: the command gets `options`, and receives them as one object `into`,
    `build(**their values)` (a group of options several commands share)."""
    def decorate(command):
        signature = inspect.signature(command)
        kept = [p for p in signature.parameters.values() if p.name != into]
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
                 for name, (kind, option) in options.items()]

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            group = build(**{name: kwargs.pop(name) for name in options})
            return command(*args, **{into: group}, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=kept + added)
        wrapper.__annotations__ = {**{p.name: p.annotation for p in kept},
                                   **{name: kind for name, (kind, _) in options.items()}}
        del wrapper.__wrapped__  # typer reads the signature above, not the wrapped function's
        return wrapper

    return decorate


def _serve_options() -> dict[str, tuple[type, typer.models.OptionInfo]]:
    from cockatoo_lib.serving.settings import ServeSettings, option

    return {name: (f.annotation, typer.Option(f.default, option(name, switch=f.annotation is bool),
                                              help=f.description))
            for name, f in ServeSettings.model_fields.items()}


def _serve_settings(**values):
    from cockatoo_lib.serving.settings import ServeSettings

    return ServeSettings.of(**values)


with_serve_settings = option_group(_serve_options(), _serve_settings, "settings")


def _plan(model_type: str, overrides: list[str] | None, detect: bool = True, hardware=None):
    from cockatoo_lib.plan.catalogue import detect_hardware, parse_overrides, resolve_plan

    return resolve_plan(model_type, parse_overrides(overrides or []),
                        hardware or (detect_hardware() if detect else None))


@app.command()
def plan(model_type: str = MODEL_TYPE, set_: list[str] = SET,
         hardware: bool = typer.Option(False, "--hardware", help="apply this machine's adjustments"),
         gpu_memory_gib: float = typer.Option(None, "--gpu-memory-gib",
                                              help="plan for CUDA cards with this much memory each"),
         gpus: int = typer.Option(1, "--gpus",
                                  help="with --gpu-memory-gib: that many cards, one process each")):
    """Print the resolved settings for a model type: the guide's, this machine's (--hardware),
    or for cards (--gpu-memory-gib, --gpus): the split is each process's, the effective batch
    the whole step's."""
    from cockatoo_lib.plan.catalogue import plan_table, planned_card
    from cockatoo_lib.plan.limits import check_range

    card = None
    check_range("processes", gpus, "--gpus")
    if gpu_memory_gib is not None:
        check_range("gpu_memory_gib", gpu_memory_gib, "--gpu-memory-gib")
        card = planned_card(gpu_memory_gib, gpus)
    elif gpus != 1:
        raise CockatooError("--gpus needs --gpu-memory-gib: the memory of each card")
    rows = plan_table(_plan(model_type, set_, detect=hardware, hardware=card))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


@app.command()
def prepare(config: str = typer.Option(..., "--config", "-c", help="data config YAML or preset name"),
            output: Path = typer.Option(..., "--output", "-o"),
            seed: int = typer.Option(42, "--seed"),
            max_samples: int = typer.Option(0, "--max-samples", help="0 = all rows"),
            labels: str = typer.Option("", "--labels", help="comma-separated active labels")):
    """Read, map, clean and split the data config's sources into Parquet files."""
    from cockatoo_lib.data.prepare import load_data_config
    from cockatoo_lib.data.prepare import prepare as run

    active = [x.strip() for x in labels.split(",") if x.strip()]
    manifest = run(load_data_config(config, active), output, seed=seed, max_samples=max_samples)
    typer.echo(f"{output}: " + ", ".join(f"{s} {v['rows']}" for s, v in manifest["splits"].items())
               + f" rows; fingerprint {manifest['fingerprint'][:16]}"
               + (f"; {sum(v['images'] for v in manifest['splits'].values())} images, "
                  f"{manifest['images']['dropped']} dropped" if "images" in manifest else ""))


@app.command()
def tokenize(data: Path = typer.Option(..., "--data", "-d"),
             output: Path = typer.Option(..., "--output", "-o"),
             model_type: str = MODEL_TYPE, set_: list[str] = SET,
             cache_root: str = typer.Option(None, "--cache-root", help="folder, gs:// or s3:// URI")):
    """Tokenize prepared splits for a model, through the per-model cache."""
    from cockatoo_lib.tokenize import DEFAULT_CACHE_ROOT, diagnostic_warnings
    from cockatoo_lib.tokenize import tokenize as run

    info = run(data, _plan(model_type, set_, detect=False), output, cache_root or DEFAULT_CACHE_ROOT)
    images = f"; pixels of {sum(info['images']['rows'].values())} images" if "images" in info else ""
    overall = info["diagnostics"]["overall"]
    typer.echo(f"{output}: cache {'hit' if info['cache_hit'] else 'miss'} {info['cache_key']}; "
               f"{sum(info['truncated'].values())} texts truncated at {info['max_length']} tokens "
               f"({overall['truncated_share']:.1%}); {overall['unknown_token_share']:.2%} of tokens unknown"
               f"{images}")
    for warning in diagnostic_warnings(info["diagnostics"]):
        typer.echo(f"warning: {warning}")


@app.command()
def train(data: Path = typer.Option(None, "--data", "-d", help="prepared data, to check against"),
          tokenized: str = typer.Option(..., "--tokenized", "-t", help="folder, gs:// or s3:// URI"),
          output: str = typer.Option(..., "--output", "-o",
                                     help="folder, or a gs:// or s3:// URI to publish the model at"),
          model_type: str = MODEL_TYPE, set_: list[str] = SET,
          processes: int = typer.Option(1, "--processes",
                                        help="data-parallel processes on this machine (torchrun; "
                                             "one per GPU on CUDA, gloo on CPU)"),
          checkpoint_root: str = typer.Option(None, "--checkpoint-root",
                                              help="folder, gs:// or s3:// URI: publish checkpoints there "
                                                   "and resume from the newest when run again"),
          keep_checkpoints: int = typer.Option(0, "--keep-checkpoints",
                                               help="checkpoints kept once the model is written"),
          leave_checkpoints: bool = typer.Option(False, "--leave-checkpoints",
                                                 help="keep every checkpoint, listed in cockatoo.json, for a "
                                                      "later step to remove (a pipeline's evaluate step)")):
    """Fine-tune the model and tune per-label thresholds on validation."""
    from cockatoo_lib.plan.limits import check_range
    from cockatoo_lib.training import distributed

    check_range("processes", processes, "--processes")
    check_range("keep_checkpoints", keep_checkpoints, "--keep-checkpoints")
    if processes > 1 and not distributed.launched():
        if "://" not in output:
            check_output(output)  # before starting any process
        code = distributed.launch(processes, sys.argv[1:])
        if code:
            raise typer.Exit(code)
        return
    from cockatoo_lib.training.trainer import train as run  # here: a launcher has no use for it (8 s)

    info = run(tokenized, _plan(model_type, set_), output, data_dir=data, checkpoint_root=checkpoint_root,
               keep_checkpoints=keep_checkpoints, leave_checkpoints=leave_checkpoints)
    if distributed.rank() != 0:
        return
    typer.echo(f"{output}: best validation {info['selection_metric']} {info['best_validation_metric']:.4f} "
               f"at epoch {info['best_epoch']} of {info['epochs']:g}; seed {info['seed']}")


@app.command()
def evaluate(model: Path = typer.Option(..., "--model"),
             tokenized: Path = typer.Option(..., "--tokenized", "-t"),
             data: Path = typer.Option(None, "--data", "-d", help="prepared data, to check against"),
             output: Path = typer.Option(..., "--output", "-o")):
    """Score the test split; write metrics.json and report.html."""
    from cockatoo_lib.evaluation.evaluate import evaluate as run

    results = run(model, tokenized, output, data_dir=data)
    typer.echo(f"{output}: test macro-F1 {results['macro_f1']:.4f} (tuned thresholds), "
               f"{results['at_0.5']['macro_f1']:.4f} (0.5); "
               f"linear baseline {results['baseline']['macro_f1']:.4f}")


REGISTRY_URI = typer.Option(None, "--registry-uri", envvar="MLFLOW_TRACKING_URI",
                            help="MLflow registry: sqlite:///PATH or http://HOST:PORT")


@app.command()
def gate(model: Path = typer.Option(..., "--model"),
         data: Path = typer.Option(..., "--data", "-d"),
         evaluation: Path = typer.Option(..., "--evaluation"),
         output: Path = typer.Option(..., "--output", "-o"),
         registry_uri: str = REGISTRY_URI,
         model_name: str = typer.Option("cockatoo-moderation", "--model-name"),
         min_improvement: float = typer.Option(0.0, "--min-improvement"),
         max_label_drop: float = typer.Option(0.02, "--max-label-drop"),
         allow_label_change: bool = typer.Option(False, "--allow-label-change"),
         min_gain_over_baseline: float = typer.Option(0.0, "--min-gain-over-baseline"),
         allow_below_baseline: bool = typer.Option(False, "--allow-below-baseline",
                                                   help="promote even if the linear baseline does as well")):
    """Register a trained model and promote it to champion if it beats the linear baseline and the
    current champion."""
    from cockatoo_lib.steps import PromoteArgs, promote_step

    meta = promote_step(PromoteArgs.of(locals(), model_dir=str(model), data_dir=str(data),
                                       evaluation_dir=str(evaluation), output=str(output),
                                       output_uri=str(output), registry_uri=registry_uri or ""))
    typer.echo(f"{meta['model_uri']}: {'promoted to champion' if meta['promoted'] else 'not promoted'}; "
               + "; ".join(meta["reasons"]))


@app.command()
def promote(model_name: str = typer.Option(..., "--model-name"),
            version: str = typer.Option(..., "--version"),
            registry_uri: str = REGISTRY_URI):
    """Make a registered version the champion by hand (a rollback); the old one becomes previous."""
    from cockatoo_lib.release.model_registry import CHAMPION, PREVIOUS, open_registry

    registry = open_registry(registry_uri)
    if registry.version(model_name, version) is None:
        raise CockatooError(f"model registry {registry.uri}: {model_name} has no version {version}")
    before = registry.by_alias(model_name, CHAMPION)
    if before is not None and before.version != version:
        registry.set_alias(model_name, PREVIOUS, before.version)
    registry.set_alias(model_name, CHAMPION, version)
    registry.tag_version(model_name, version, {"gate": "promoted by hand"})
    typer.echo(f"{model_name}: champion is version {version}"
               + (f" (was {before.version}, now previous)" if before and before.version != version else ""))


@app.command()
def predict(model: str = typer.Option(..., "--model",
                                      help="model folder, gs://…, s3://… or models:/NAME@ALIAS"),
            input_: str = typer.Option(..., "--input", "-i",
                                       help="CSV, JSONL or Parquet, local or in a bucket"),
            output: str = typer.Option(..., "--output", "-o",
                                       help="CSV, JSONL or Parquet, by suffix; or a folder (FOLDER/) of "
                                            "Parquet shards, written as it goes and resumed when run again"),
            text_column: str = typer.Option("text", "--text-column"),
            image_column: str = typer.Option(None, "--image-column", help="for a model that reads images"),
            registry_uri: str = REGISTRY_URI,
            batch_size: int = typer.Option(64, "--batch-size"),
            shard_rows: int = typer.Option(100_000, "--shard-rows",
                                           help="rows per shard of a folder output")):
    """Score a file, folder or glob with a trained model: each label's probability and the labels
    at its thresholds."""
    from cockatoo_lib.plan.limits import check_range
    from cockatoo_lib.release.batch_predict import is_folder_output, predict_folder
    from cockatoo_lib.release.predict import predict_file

    check_range("batch_size", batch_size, "--batch-size")
    check_range("shard_rows", shard_rows, "--shard-rows")
    if is_folder_output(output):
        show_predictions(predict_folder(model, input_, output, text_column, image_column, registry_uri,
                                        batch_size, shard_rows))
        return
    show_predictions(predict_file(model, input_, output, text_column, image_column, registry_uri, batch_size))


@app.command()
@with_serve_settings
def serve(model: str = typer.Option(..., "--model",
                                    help="models:/NAME@ALIAS (followed as it moves), models:/NAME/VERSION, "
                                         "a model folder, gs://… or s3://…"),
          registry_uri: str = REGISTRY_URI,
          http_port: int = typer.Option(8080, "--http-port", help="as KServe's model servers"),
          model_name: str = typer.Option(None, "--model-name",
                                         help="the name in the endpoints' paths; default: the registered "
                                              "name or the folder's"),
          settings=None):
    """Serve a model over KServe's V1 and v2 protocols, in batches; a models:/NAME@ALIAS model
    follows its alias (README: serving)."""
    from cockatoo_lib.plan.limits import check_range
    from cockatoo_lib.serving.server import serve as run

    check_range("http_port", http_port, "--http-port")
    run(model, registry_uri, http_port=http_port, model_name=model_name, settings=settings)


def show_predictions(info: dict, expected: list[str] | None = None) -> None:
    """The first rows' labels; with `expected` (what a reader would say of each row, in order),
    each beside it and whether they agree."""
    typer.echo(f"{info['output']}: {info['rows']} rows; predicted positives: "
               + ", ".join(f"{k} {v}" for k, v in info["positives"].items()))
    for i, (text, labels) in enumerate(info["preview"]):
        line = f"  {text[:70]!r:<74} -> {labels or '(none)'}"
        if expected is not None:
            want = expected[i] or ""
            agree = set(filter(None, labels.split(","))) == set(filter(None, want.split(",")))
            line += f"   expected: {want or '(none)'}{'' if agree else '   <- differs'}"
        typer.echo(line)


def main() -> None:
    from cockatoo_lib.storage.secrets import step_environment

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        step_environment()
        app()  # click itself reports usage errors, with exit code 2
    except CockatooError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
