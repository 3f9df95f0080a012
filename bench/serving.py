"""B11 serving: requests/s and p50/p99 latency of `cockatoo serve` at 1, 8 and 32 concurrent
clients, one text per request, against what a user would write otherwise (transformers'
text-classification pipeline behind a FastAPI endpoint, one call per request), on one model,
alternating; then a load run while the registry's alias moves twice."""

from __future__ import annotations

import http.client
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.harness import posts, social_media_lengths
from bench.predict_speed import demo_model_folder

KEY, TITLE = "b11", "B11 serving"
CLIENTS = (1, 8, 32)
CEILING_TEXTS = 640  # texts the model alone scores, per form and repeat
LABELS = ["scam", "violence", "harassment", "hate_speech", "toxicity", "obscenity", "jailbreaking"]


def add_arguments(parser) -> None:
    parser.add_argument("--serve-requests", type=int, default=12,
                        help="B11 requests per client and run (at least 200 a run)")
    parser.add_argument("--serve-load-requests", type=int, default=3000, help="B11 load run requests")


def run(args) -> dict:
    return bench_serving(args.serve_requests, args.repeats, args.serve_load_requests)


# ------------------------------------------------------------------ clients


class Client:
    """One keep-alive HTTP connection to a loopback server, as a client library holds one."""

    def __init__(self, port: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        self.connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")


def drive(port: int, path: str, make_body, texts: list[str], clients: int, requests: int,
          on_answer=None) -> dict:
    """`requests` requests from `clients` concurrent clients, each one after the other, one text
    each (texts taken in turn); latency of each, requests/s over the whole, and the failures."""
    latencies, failures, lock = [], [], threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        session = Client(port)
        for i in counter:  # next() of a range iterator is atomic under the GIL
            text = texts[i % len(texts)]
            start = time.perf_counter()
            try:
                status, body = session.post(path, make_body(text))
            except (OSError, http.client.HTTPException) as exc:
                status, body, session = 0, {"error": repr(exc)}, Client(port)
            took = time.perf_counter() - start
            with lock:
                if status == 200:
                    latencies.append(took)
                else:
                    failures.append((status, body))
            if on_answer is not None and status == 200:
                on_answer(text, body)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"requests": requests, "ok": len(latencies), "failures": failures[:5], "failed": len(failures),
            "requests_per_s": len(latencies) / wall,
            "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None}


def v1_body(text: str) -> dict:
    return {"instances": [text]}


# ------------------------------------------------------------------ servers


def start_server(command: list[str], port: int, ready_path: str, log: Path, timeout: float = 300):
    out = log.open("wb")
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", ready_path)
            if connection.getresponse().status == 200:
                return process
        except OSError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"{' '.join(command[:5])}: not ready on port {port}; log:\n{log.read_text()[-3000:]}")


def serve_command(model: str, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "serve", "--model", model, "--http-port", str(port),
            *extra]


def baseline_command(folder: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "bench.serving", str(folder), str(port)]


def serve_baseline(folder: str, port: int) -> None:
    """(b): transformers' text-classification pipeline behind a FastAPI endpoint, one pipeline
    call per request, as its documentation shows; sigmoid scores for every label."""
    import uvicorn
    from fastapi import FastAPI
    from transformers import pipeline

    from cockatoo_lib.training.model_folder import read_model_manifest

    max_length = read_model_manifest(Path(folder))["inference_max_length"]
    classify = pipeline("text-classification", model=folder, top_k=None, function_to_apply="sigmoid")
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    @app.post("/predict")
    def predict(body: dict) -> dict:  # a plain def: FastAPI runs it in its thread pool
        scores = classify(body["instances"], truncation=True, max_length=max_length)
        return {"predictions": [{x["label"]: x["score"] for x in row} for row in scores]}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ------------------------------------------------------------------ the benchmark


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The form of the weights each side serves, for the ceiling of the model alone.
SIDE_FORMS = {"cockatoo": "fp32", "cockatoo-bf16": "bf16", "cockatoo-int8": "int8"}
SIDES = {"cockatoo": "(a) `cockatoo serve`",
         "cockatoo-bf16": "(a') `cockatoo serve`, bf16",
         "cockatoo-int8": "(a'') `cockatoo serve`, int8",
         "pipeline": "(b) pipeline + FastAPI"}


def bench_serving(per_client: int, repeats: int, load_requests: int) -> dict:
    from cockatoo_lib.plan.catalogue import resolve_plan
    from cockatoo_lib.release.gate import serving_tag
    from cockatoo_lib.release.model_registry import MLflowRegistry, Registration
    from cockatoo_lib.release.predict import Classifier, native_forms

    max_length = resolve_plan("minilm").inference_max_length
    texts = posts(social_media_lengths(2000, max_length, seed=3), seed=3)
    sides = {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        folder = demo_model_folder(work / "model", LABELS)
        # (a') and (a''): the same weights registered as versions whose gate accepted one reduced
        # form each, which the server then serves; bf16 only where this CPU runs it natively.
        registry_uri = f"sqlite:///{work / 'forms.db'}"
        ports = {side: free_port() for side in SIDES}
        commands = {"cockatoo": serve_command(str(folder), ports["cockatoo"], "--model-name", "m"),
                    "pipeline": baseline_command(folder, ports["pipeline"])}
        for form in native_forms():
            accepted = Registration(str(folder), {serving_tag(form): "accepted"}, {}, {})
            version = MLflowRegistry(registry_uri).register("bench", accepted).version
            side = f"cockatoo-{form}"
            commands[side] = serve_command(f"models:/bench/{version}", ports[side], "--model-name", "m",
                                           "--registry-uri", registry_uri)
        servers = [start_server(command, ports[side], "/health" if side == "pipeline" else "/v2/health/ready",
                                work / f"{side}.log") for side, command in commands.items()]
        try:
            targets = {side: (ports[side], "/predict" if side == "pipeline" else "/v1/models/m:predict")
                       for side in SIDES if side in commands}
            for port, path in targets.values():  # warm them up: first calls allocate
                drive(port, path, v1_body, texts, 4, 40)
            runs = {(side, n): [] for side in targets for n in CLIENTS}
            trained = Classifier(folder, device="cpu")  # the ceiling of each served form, between turns
            alone = {form: trained.in_form(form) for side, form in SIDE_FORMS.items() if side in targets}
            alone_runs = {form: [] for form in alone}
            for _ in range(repeats):
                for n in CLIENTS:
                    for side, (port, path) in targets.items():
                        runs[side, n].append(drive(port, path, v1_body, texts, n, max(200, per_client * n)))
                for form, classifier in alone.items():
                    alone_runs[form].append(model_alone(classifier, texts[:CEILING_TEXTS]))
            for (side, n), results in runs.items():
                sides.setdefault(side, {})[n] = _median(results)
        finally:
            for server in servers:
                server.terminate()
                server.wait(60)
        load = load_run(work, folder, load_requests, texts)
    return {"repeats": repeats, "per_client": per_client,
            "model": "all-MiniLM-L6-v2 (22M parameters), 7 labels", "max_length": max_length,
            "sides": sides, "load": load,
            "model_alone": {form: statistics.median(r) for form, r in alone_runs.items()}}


def model_alone(classifier, texts: list[str], batch: int = 32) -> float:
    """Texts/s of the model alone, in this process: the texts in arrival batches of `batch` with
    the server's token budget, as a server at 32 clients scores them, but with no HTTP, clients
    or queue beside it: the most a server could do on this machine."""
    from cockatoo_lib.serving.settings import ServeSettings

    budget = ServeSettings().max_batch_tokens
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        classifier.predict_proba(texts[i:i + batch], batch_size=batch, max_batch_tokens=budget)
    return len(texts) / (time.perf_counter() - start)


def _median(results: list[dict]) -> dict:
    keys = ("requests_per_s", "p50_ms", "p99_ms")
    return {**{k: statistics.median(r[k] for r in results) for k in keys},
            "requests": results[0]["requests"], "failed": sum(r["failed"] for r in results)}


def shifted_copy(model: Path, folder: Path, shift: float) -> Path:
    """The model with every label's logit moved by `shift`: a version with other probabilities."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, folder)
    weights = load_file(folder / "model.safetensors")
    (bias,) = [k for k in weights if k.startswith("classifier") and k.endswith("bias")]
    weights[bias] = weights[bias] + shift
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def load_run(work: Path, model: Path, requests: int, texts: list[str], clients: int = 16) -> dict:
    """`requests` requests from `clients` clients to a server following models:/bench@champion
    while the alias moves 1 -> 2 -> 1. Every answer is checked against what its version gives
    offline."""
    from cockatoo_lib.release.model_registry import CHAMPION, MLflowRegistry, Registration
    from cockatoo_lib.release.predict import Classifier

    uri = f"sqlite:///{work / 'registry.db'}"
    registry = MLflowRegistry(uri)
    folders = [model, shifted_copy(model, work / "shifted", 1.5)]
    for folder in folders:
        registry.register("bench", Registration(str(folder), {}, {}, {}))
    registry.set_alias("bench", CHAMPION, "1")
    classifiers = {str(i): Classifier(f) for i, f in enumerate(folders, start=1)}
    port = free_port()
    server = start_server(serve_command("models:/bench@champion", port, "--registry-uri", uri,
                                        "--poll-interval-s", "0.5"), port, "/v2/health/ready",
                          work / "load.log")
    answers, moves, done = [], [], threading.Event()

    def mover() -> None:  # the alias moves at a third and at two thirds of the run
        for at, version in ((requests // 3, "2"), (2 * requests // 3, "1")):
            while len(answers) < at and not done.is_set():
                time.sleep(0.05)
            registry.set_alias("bench", CHAMPION, version)
            moves.append((len(answers), version))

    thread = threading.Thread(target=mover)
    thread.start()
    try:
        result = drive(port, "/v1/models/bench:predict", v1_body, texts, clients, requests,
                       on_answer=lambda text, body: answers.append((text, body)))
    finally:
        done.set()
        thread.join()
        server.terminate()
        server.wait(60)
    wrong, versions = 0, {}
    for text, body in answers:
        version = body["model_version"]
        versions[version] = versions.get(version, 0) + 1
        want = classifiers[version].predict_proba([text])[0]
        got = np.array([body["predictions"][0]["probabilities"][x] for x in classifiers[version].labels])
        wrong += not np.allclose(got, want, atol=1e-5)
    return {"requests": requests, "clients": clients, "ok": result["ok"], "failed": result["failed"],
            "answers_by_version": versions, "wrong_version_answers": wrong, "alias_moves": moves,
            "requests_per_s": result["requests_per_s"], "p99_ms": result["p99_ms"]}


def section(m: dict, b11: dict) -> list[str]:
    def at(side: str, n: int) -> dict:  # keyed by str(n) once read back from results.json
        return b11["sides"][side].get(n) or b11["sides"][side][str(n)]

    def ratio(side: str, n: int, key: str) -> float:
        return at(side, n)[key] / at("pipeline", n)[key]

    sides = [side for side in SIDES if side in b11["sides"]]
    rows = [f"| {n} | {SIDES[side]} | {at(side, n)['requests_per_s']:.1f} | {at(side, n)['p50_ms']:.1f} | "
            f"{at(side, n)['p99_ms']:.1f} | {ratio(side, n, 'requests_per_s'):.2f}× |"
            for n in CLIENTS for side in sides]
    verdicts = [f"{SIDES[side]}: at 32 clients **{ratio(side, 32, 'requests_per_s'):.2f}× the requests/s** "
                f"of (b), p99 {ratio(side, 32, 'p99_ms'):.2f}× (b)'s; at 1 client **p50 "
                f"{ratio(side, 1, 'p50_ms'):.2f}× (b)'s**." for side in sides if side != "pipeline"]
    alone = b11["model_alone"]
    ceilings = [f"{form} {alone[form]:.0f} texts/s, of which {SIDES[side].split()[0]} at 32 clients "
                f"reaches {at(side, 32)['requests_per_s'] / alone[form]:.0%}"
                for side, form in SIDE_FORMS.items() if form in alone and side in sides]
    load = b11["load"]
    return [
        "## B11: serving",
        "",
        f"{b11['model']}, max length {b11['max_length']}, {m['cores']} CPU cores; one text per request "
        "(B1's length mix), each client one request after another on a keep-alive connection, the clients "
        "in the benchmark's process on loopback; for each client count the servers take turns, "
        f"{b11['repeats']} repeats, medians. (a) `cockatoo serve` (V1 protocol, default batching) on the "
        "model folder: the weights as trained; (a') and (a'') the same weights as a registry version "
        "whose gate accepted its bf16 or int8 form, which the server then serves (what each costs in "
        "F1: B7; bf16 runs where the CPU has bf16 instructions); (b) "
        "transformers' `pipeline(\"text-classification\")` behind a FastAPI endpoint, one call per request.",
        "",
        "| clients | server | req/s | p50 ms | p99 ms | req/s ÷ (b)'s |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "Targets: at 32 clients at least 3× (b)'s requests/s with a lower p99; at 1 client p50 at most 1.2× "
        "(b)'s. " + " ".join(verdicts),
        "",
        f"The ceiling: the model alone, {CEILING_TEXTS} of these texts in arrival batches of 32 with the "
        "server's token budget, no HTTP, clients or queue (in the benchmark's process, between the servers' "
        f"turns, {b11['repeats']} repeats, medians): " + "; ".join(ceilings) + f". 3× (b)'s requests/s "
        f"at 32 clients is {3 * at('pipeline', 32)['requests_per_s']:.0f} requests/s.",
        "",
        f"Load run: {load['requests']:,} requests from {load['clients']} clients to a server following "
        f"`models:/bench@champion` (polling every 0.5 s) while the alias moved to version 2 and back to 1 "
        f"(after {', '.join(str(a) for a, _ in load['alias_moves'])} answers): {load['ok']:,} answered 200, "
        f"{load['failed']} failed; answers by version {load['answers_by_version']}; "
        f"{load['wrong_version_answers']} answers differed from what their named version gives offline. "
        f"{load['requests_per_s']:.0f} requests/s, p99 {load['p99_ms']:.0f} ms.",
    ]


if __name__ == "__main__":  # the baseline server: python -m bench.serving FOLDER PORT
    serve_baseline(sys.argv[1], int(sys.argv[2]))
