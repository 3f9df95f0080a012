"""`cockatoo serve` as a real server process on loopback (its V1 and v2 protocols, bad input,
health and metrics, following the registry's alias), the batcher it is built on, and
`cockatoo deploy`'s InferenceService against the Kubernetes API stand-in."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from fake_k8s import FakeKubernetes
from helpers import error_line, free_port, make_image, run_cli, serve
from PIL import Image

from bench.serving import shifted_copy
from cockatoo_lib.release.model_registry import CHAMPION, MLflowRegistry, Registration
from cockatoo_lib.release.predict import Classifier
from cockatoo_lib.serving.batching import Batcher

NAME = "moderation"


def _post(url: str, body, timeout: float = 60, content_type: str = "application/json") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _start(args: list[str], port: int):
    return serve([sys.executable, "-m", "pipelines.cli", "serve", *map(str, args), "--http-port", str(port)],
                 port, ready_path="/v2/health/ready")


@pytest.fixture(scope="module")
def registry_server(trained_run, tmp_path_factory):
    """A server following models:/moderation@champion in a SQLite registry that holds three
    versions: 1 the trained model, 2 the same with other probabilities, 3 weights that do not
    load. The champion starts at 1."""
    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    registry = MLflowRegistry(uri)
    broken = shutil.copytree(trained_run["model"], root / "broken")
    (broken / "model.safetensors").write_bytes(b"not weights")
    folders = [trained_run["model"], shifted_copy(trained_run["model"], root / "shifted", 1.5), broken]
    for folder in folders:
        registry.register(NAME, Registration(str(folder), {}, {}, {}))
    registry.set_alias(NAME, CHAMPION, "1")
    port = free_port()
    process = _start(["--model", f"models:/{NAME}@{CHAMPION}", "--registry-uri", uri,
                      "--poll-interval-s", "0.2", "--max-batch-size", "8", "--max-batch-wait-ms", "5",
                      "--max-instances", "10", "--max-text-chars", "500", "--max-body-bytes", "4096"], port)
    expected = {str(v): Classifier(folder) for v, folder in enumerate(folders[:2], start=1)}
    yield {"url": f"http://127.0.0.1:{port}", "registry": registry, "expected": expected,
           "process": process}
    process.terminate()
    process.wait(30)


TEXTS = ["you are wonderful", "I will hurt you", "buy cheap pills now", "a calm note about the weather"]


def _v1_answers(body: dict) -> tuple[list[dict], list[list]]:
    return [p["probabilities"] for p in body["predictions"]], [p["labels"] for p in body["predictions"]]


def _check_answer(server, texts: list[str], version: str, probabilities: list[dict], flagged: list[list]):
    """The answer is what the model of `version` gives offline."""
    classifier = server["expected"][version]
    want = classifier.predict_proba(texts)
    got = np.array([[p[label] for label in classifier.labels] for p in probabilities])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert flagged == [[x for x, hit in zip(classifier.labels, row >= classifier.thresholds) if hit]
                       for row in want]


@pytest.mark.slow
def test_v1_predict_answers_each_labels_probability_the_flags_and_the_version(registry_server):
    url = f"{registry_server['url']}/v1/models/{NAME}:predict"
    status, body = _post(url, {"instances": TEXTS[:2] + [{"text": t} for t in TEXTS[2:]]})
    assert status == 200, body
    assert body["model_name"] == NAME and body["model_version"] in registry_server["expected"]
    _check_answer(registry_server, TEXTS, body["model_version"], *_v1_answers(body))


@pytest.mark.slow
def test_v2_infer_answers_the_same_as_tensors(registry_server):
    url = f"{registry_server['url']}/v2/models/{NAME}/infer"
    status, body = _post(url, {"id": "r1", "inputs": [{"name": "text", "shape": [len(TEXTS)],
                                                        "datatype": "BYTES", "data": TEXTS}]})
    assert status == 200, body
    assert body["id"] == "r1" and body["model_version"] in registry_server["expected"]
    outputs = {x["name"]: x for x in body["outputs"]}
    labels = outputs["probabilities"]["parameters"]["labels"].split(",")
    probs = np.array(outputs["probabilities"]["data"]).reshape(outputs["probabilities"]["shape"])
    assert outputs["probabilities"]["shape"] == [len(TEXTS), len(labels)]
    _check_answer(registry_server, TEXTS, body["model_version"], [dict(zip(labels, row)) for row in probs],
                  [x.split(",") if x else [] for x in outputs["labels"]["data"]])


BAD_REQUESTS = [  # (body, the field the 400 names)
    (b'{"instances": ["unterminated', "request body: not valid JSON"),
    ({"texts": ["hello"]}, "instances: missing"),
    ({"instances": []}, "instances: empty"),
    ({"instances": "hello"}, "instances: expected a list"),
    ({"instances": ["fine", 42]}, "instances[1]: expected a string"),
    ({"instances": ["fine", {"text": ["a list"]}]}, "instances[1].text: expected a string"),
    ({"instances": ["fine", "   "]}, "instances[1]: empty text"),
    ({"instances": ["x" * 501]}, "instances[0]: 501 characters, over the limit of 500 (max_text_chars)"),
    ({"instances": ["hi"] * 11}, "instances: 11 instances, over the limit of 10 (max_instances)"),
    ({"instances": ["hi " * 2000]}, "request body: over the limit of 4096 bytes (max_body_bytes)"),
    ({"instances": [{"text": "hi", "image": {"b64": "aGk="}}]},
     "instances[0].image: this model reads text only"),
    ({"instances": [{"text": "hi", "colour": "red"}]}, "instances[0].colour: unknown field"),
    (["hi"], "request body: expected a JSON object"),
    ({"instances": [{"text": "hi", "image": 42}]}, "instances[0].image: expected an http(s) URL"),
    ({"instances": [{"text": "hi", "image": {"b64": 42}}]}, "instances[0].image: b64 must be a string"),
]


@pytest.mark.slow
def test_bad_input_is_a_400_naming_the_field_and_the_server_serves_on(registry_server):
    url = f"{registry_server['url']}/v1/models/{NAME}:predict"
    for body, message in BAD_REQUESTS:
        status, answer = _post(url, body)
        assert (status, answer.get("error", "")[:len(message)]) == (400, message), (body, answer)
    v2 = f"{registry_server['url']}/v2/models/{NAME}/infer"
    for inputs, message in [([{"name": "txt", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
                             "inputs[txt]"),
                            ([{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a"]}],
                             "inputs[text]: shape [2] for 1 values"),
                            ([{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}],
                             "inputs[text]: datatype FP32"),
                            ("not a list", "inputs:"),
                            ([{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
                             'inputs: no input named "text"'),
                            ([{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]},
                              {"name": "image", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}],
                             "inputs[image]: 1 images for 2 texts")]:
        status, answer = _post(v2, {"inputs": inputs})
        assert status == 400 and answer["error"].startswith(message), answer
    status, answer = _post(url, {"instances": ["still here"]})
    assert status == 200 and len(answer["predictions"]) == 1
    # What `curl -d` sends: JSON labelled as a form.
    status, answer = _post(url, {"instances": ["a form"]}, content_type="application/x-www-form-urlencoded")
    assert status == 200 and len(answer["predictions"]) == 1


@pytest.mark.slow
def test_only_the_inference_routes_take_a_post_in_json_and_nobody_can_unload_the_model(registry_server):
    url = registry_server["url"]
    for path in (f"/v2/repository/models/{NAME}/unload", f"/v2/repository/models/{NAME}/load",
                 f"/v1/models/{NAME}:explain"):
        status, answer = _post(url + path, {"instances": ["x" * 20_000]})  # over max_body_bytes: not read
        assert status == 404 and answer["error"].startswith(f"POST {path}: not served here"), (path, answer)
    assert _get(f"{url}/v2/models/{NAME}/ready")[0] == 200
    # The Open Inference Protocol's binary extension: a 415 that says to send JSON.
    header = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES"}]}).encode()
    request = urllib.request.Request(f"{url}/v2/models/{NAME}/infer", data=header + b"\x05\x00\x00\x00hello",
                                     headers={"Content-Type": "application/octet-stream",
                                              "Inference-Header-Content-Length": str(len(header))})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 415 and "send the JSON form" in json.loads(refused.value.read())["error"]
    status, answer = _post(f"{url}/v1/models/{NAME}:predict", {"instances": ["still served"]})
    assert status == 200 and len(answer["predictions"]) == 1
    metrics = _get(url + "/metrics")[1]

    def refused(status: int) -> float:
        line = f'cockatoo_bad_requests_total{{model_name="{NAME}",status="{status}"}} '
        return float(metrics.split(line)[1].split()[0])

    assert refused(404) >= 3 and refused(415) >= 1


@pytest.mark.slow
def test_health_and_metrics(registry_server):
    url = registry_server["url"]
    for path in ("/v2/health/live", "/v2/health/ready", f"/v1/models/{NAME}", f"/v2/models/{NAME}/ready"):
        assert _get(url + path)[0] == 200, path
    _post(f"{url}/v1/models/{NAME}:predict", {"instances": ["hello"]})
    _post(f"{url}/v1/models/{NAME}:predict", {"instances": []})
    status, metrics = _get(url + "/metrics")
    assert status == 200
    for line in (f'cockatoo_requests_total{{model_name="{NAME}",outcome="ok"}}',
                 f'cockatoo_requests_total{{model_name="{NAME}",outcome="bad_input"}}',
                 f'cockatoo_errors_total{{kind="bad_input",model_name="{NAME}"}}',
                 f'cockatoo_bad_requests_total{{model_name="{NAME}",status="400"}}',
                 f'cockatoo_request_seconds_count{{model_name="{NAME}"}}',
                 f'cockatoo_batch_instances_count{{model_name="{NAME}"}}',
                 f'cockatoo_model_version{{model_name="{NAME}"}}'):
        assert line in metrics.replace(' 1.0', '').replace(' 2.0', ''), line


@pytest.mark.slow
def test_the_server_follows_the_alias_without_a_failed_request_or_a_mixed_answer(registry_server, capsys,
                                                                                   monkeypatch):
    """Clients send while the alias moves 1 -> 2 -> 3 (does not load) -> 1 (a rollback with
    `cockatoo promote`): every request succeeds, every answer is what its version gives, and
    both versions answer."""
    url, registry = f"{registry_server['url']}/v1/models/{NAME}:predict", registry_server["registry"]
    answers, failures, stop = [], [], threading.Event()

    def client(i: int):
        while not stop.is_set():
            texts = [TEXTS[(i + k) % len(TEXTS)] for k in range(1 + i % 3)]
            status, body = _post(url, {"instances": texts})
            (answers if status == 200 else failures).append((texts, body))

    def versions_seen_after(n: int) -> set[str]:
        return {body["model_version"] for _, body in answers[n:]}

    def wait_for(version: str):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            mark = len(answers)
            time.sleep(0.5)
            if versions_seen_after(mark) == {version}:
                return
        pytest.fail(f"the server did not move to version {version}; saw {versions_seen_after(0)}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        wait_for("1")
        registry.set_alias(NAME, CHAMPION, "2")
        wait_for("2")
        registry.set_alias(NAME, CHAMPION, "3")
        time.sleep(2)  # ten polls: it tries version 3, fails (again, backing off), and keeps 2
        mark = len(answers)
        time.sleep(1)
        assert versions_seen_after(mark) == {"2"}
        code, _, err = run_cli(["promote", "--model-name", NAME, "--version", "1", "--registry-uri",
                                registry.uri], capsys, monkeypatch)
        assert code == 0, err
        wait_for("1")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not failures, failures[:3]
    assert len(answers) > 50
    for texts, body in answers:
        _check_answer(registry_server, texts, body["model_version"], *_v1_answers(body))
    status, metrics = _get(registry_server["url"] + "/metrics")
    def sample(name: str) -> float:
        return float(metrics.split(name + " ")[1].split()[0])

    # Version 3 was tried again with a doubling wait (0.2, 0.4, 0.8 s ...): more than once over
    # the 15 polls of those 3 s, far fewer times than it polled (the promotion back to 1 adds
    # seconds: the eighth try would come 25 s in).
    loads = sample(f'cockatoo_errors_total{{kind="model_load",model_name="{NAME}"}}')
    assert 2 <= loads <= 8 and sample(f'cockatoo_follow_failures_total{{model_name="{NAME}"}}') == loads
    count = float(metrics.split(f'cockatoo_batch_instances_count{{model_name="{NAME}"}} ')[1].split()[0])
    total = float(metrics.split(f'cockatoo_batch_instances_sum{{model_name="{NAME}"}} ')[1].split()[0])
    assert total / count > 1.5, "six clients' requests were not gathered into batches"


@pytest.mark.slow
def test_a_clip_model_reads_text_with_an_image_url_or_base64(trained_clip, tmp_path):
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    picture = make_image(tmp_path / "a.jpg", seed=1)
    (tmp_path / "broken.jpg").write_bytes(picture[: len(picture) // 3])
    handler = lambda *a, **k: SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    images = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    host = f"http://localhost:{images.server_address[1]}"
    model = trained_clip["model"]
    port = free_port()
    # The image server is on loopback: allowed by naming it exactly, as an in-cluster one would be.
    process = _start(["--model", model, "--image-url-hosts", "localhost", "--max-concurrent-requests", "1"],
                     port)
    try:
        url = f"http://127.0.0.1:{port}/v1/models/{model.name}:predict"
        b64 = base64.b64encode(picture).decode()
        status, body = _post(url, {"instances": [{"text": "look", "image": {"b64": b64}},
                                                 {"text": "look", "image": f"{host}/a.jpg"},
                                                 {"text": "look"}]})
        assert status == 200, body
        classifier = Classifier(model)
        want = classifier.predict_proba(["look"] * 3, [picture, picture, None])
        got = np.array([[p["probabilities"][x] for x in classifier.labels] for p in body["predictions"]])
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert body["model_version"] == str(model)
        huge = io.BytesIO()
        Image.new("1", (6000, 5000)).save(huge, "PNG")  # 30 million pixels in a few kB
        refused = "instances[0].image: image URL not fetched: its host is not allowed here, or it did not"
        for image, message in [(f"{host}/broken.jpg", "instances[0].image: cannot read the image"),
                               (f"{host}/missing.jpg", refused),  # a 404 reads as a host not allowed
                               (f"{host.replace('localhost', '127.0.0.1')}/a.jpg", refused),
                               ({"b64": base64.b64encode(huge.getvalue()).decode()},
                                "instances[0].image: cannot read the image: 6000 x 5000 pixels, over the "
                                "limit of 25,000,000"),
                               ({"b64": "%%%"},
                                "instances[0].image: neither an http(s) URL nor valid base64")]:
            status, answer = _post(url, {"instances": [{"text": "look", "image": image}]})
            assert status == 400 and answer["error"].startswith(message), answer
        v2 = f"http://127.0.0.1:{port}/v2/models/{model.name}/infer"
        status, body = _post(v2, {"inputs": [
            {"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]},
            {"name": "image", "shape": [2], "datatype": "BYTES", "data": [b64, ""]}]})
        assert status == 200, body
        assert _post(url, {"instances": ["still here"]})[0] == 200
        # One request in progress (its body not yet sent) is the limit: the next is a 503 with
        # Retry-After, at once, and once the first goes away a request is served again.
        import socket

        held = socket.create_connection(("127.0.0.1", port))
        held.sendall(f"POST /v1/models/{model.name}:predict HTTP/1.1\r\nHost: x\r\n"
                     "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n".encode())
        time.sleep(0.5)
        request = urllib.request.Request(url, data=json.dumps({"instances": ["x"]}).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as busy:
            urllib.request.urlopen(request, timeout=10)
        assert busy.value.code == 503 and busy.value.headers["Retry-After"] == "1"
        assert "max_concurrent_requests" in json.loads(busy.value.read())["error"]
        held.close()
        time.sleep(0.5)
        assert _post(url, {"instances": ["still here"]})[0] == 200
    finally:
        process.terminate()
        process.wait(30)
        images.shutdown()


def test_the_follower_keeps_the_served_version_when_the_registry_or_a_load_fails(caplog):
    from cockatoo_lib.errors import CockatooError
    from cockatoo_lib.serving.server import AliasFollower

    class Source:
        name, alias, answer = NAME, CHAMPION, "2"

        def alias_version(self):
            if isinstance(self.answer, Exception):
                raise self.answer
            return self.answer

        broken = True

        def load(self, version):
            if version == "2" and self.broken:
                raise OSError("weights truncated")
            return f"served {version}"

    from prometheus_client import REGISTRY

    def failures():
        return REGISTRY.get_sample_value("cockatoo_follow_failures_total", {"model_name": NAME}) or 0.0

    before, now = failures(), [0.0]
    switched = []
    follower = AliasFollower(Source(), "1", switched.append, 60, NAME, clock=lambda: now[0])
    follower.poll()
    follower.poll()  # not again before the back-off has passed
    assert (switched, follower.current) == ([], "1") and failures() == before + 1
    assert [r.message for r in caplog.records if r.levelname == "ERROR"] == [
        f"cannot load {NAME} version 2: weights truncated; still serving version 1 "
        "(failure 1; next try in 60 s)"]
    now[0] = 61.0
    follower.poll()  # tried again, fails again: the wait doubles
    assert failures() == before + 2 and "(failure 2; next try in 120 s)" in caplog.records[-1].message
    now[0] = 200.0
    follower.source.broken = False  # the artifact store is back
    follower.poll()
    assert (switched, follower.current) == (["served 2"], "2")
    switched.clear()
    follower.source.answer = CockatooError("model registry http://mlflow: cannot read: connection refused")
    follower.poll()
    assert "connection refused; still serving version 2" in caplog.records[-1].message
    follower.source.answer = "3"
    follower.poll()
    assert (switched, follower.current) == (["served 3"], "3")


@pytest.mark.slow
def test_a_version_is_served_in_a_reduced_form_only_where_its_gate_accepted_it(trained_run, tmp_path,
                                                                               monkeypatch):
    from cockatoo_lib.release import gate, predict
    from cockatoo_lib.serving.server import ModelSource

    registry = MLflowRegistry(f"sqlite:///{tmp_path / 'mlflow.db'}")
    offline = Classifier(trained_run["model"])
    forms = {form: offline.in_form(form).predict_proba(TEXTS) for form in predict.FORMS}
    for form in ("bf16", "int8"):  # the forms are told apart by their answers
        assert not np.allclose(forms["fp32"], forms[form], atol=1e-6)

    def judge(out: str) -> dict:
        return gate.promote(registry, NAME, trained_run["model"], trained_run["data"], trained_run["eval"],
                            tmp_path / out)["serving"]

    def served_form(native: list[str], reduced_forms: bool = True) -> str:
        monkeypatch.setattr(predict, "native_forms", lambda: native)
        served = ModelSource(f"models:/{NAME}/1", registry.uri, reduced_forms=reduced_forms).load()
        form = served.classifier.form
        np.testing.assert_allclose(served.classifier.predict_proba(TEXTS), forms[form], atol=1e-6)
        return form

    def tags() -> tuple[str, str]:
        found = registry.version(NAME, "1").tags
        return found[gate.serving_tag("bf16")], found[gate.serving_tag("int8")]

    # The probabilities move a little; in F1 on 42 test rows, a flag or none.
    first = judge("first")
    bf16, int8 = first["forms"]["bf16"], first["forms"]["int8"]
    assert 0 < bf16["max_probability_change"] < 0.01 and 0 < int8["max_probability_change"] < 0.01
    assert first["rows"] == pd.read_parquet(trained_run["data"] / "test.parquet").shape[0]
    # Allowed a little less than they cost, the gate refuses both: the server serves as trained.
    monkeypatch.setattr(gate, "MAX_SERVING_F1_DROP", min(bf16["drop"], int8["drop"]) - 0.001)
    assert not any(v["accepted"] for v in judge("refused")["forms"].values())
    assert tags() == ("refused", "refused")
    assert served_form(["bf16", "int8"]) == served_form(["int8"]) == "fp32"
    # Allowed what they cost: bf16 where the CPU runs it natively, else int8; never with
    # --no-reduced-forms.
    monkeypatch.setattr(gate, "MAX_SERVING_F1_DROP", max(bf16["drop"], int8["drop"]))
    judge("both")
    assert tags() == ("accepted", "accepted")
    assert (served_form(["bf16", "int8"]), served_form(["int8"])) == ("bf16", "int8")
    assert served_form(["bf16", "int8"], reduced_forms=False) == "fp32"
    # A version whose gate accepted bf16 only: bf16 where native, else as trained (not int8).
    registry.tag_version(NAME, "1", {gate.serving_tag("int8"): "refused"})
    assert (served_form(["bf16", "int8"]), served_form(["int8"])) == ("bf16", "fp32")
    decision = (tmp_path / "both" / gate.DECISION_MD).read_text()
    assert "## Serving in a reduced form on a CPU" in decision
    assert f"| int8 | {int8['macro_f1']:.4f} | {int8['drop']:.4f} |" in decision
    assert "| accepted (serving_int8) |" in decision


@pytest.mark.parametrize("avx512_bf16, amx, forms", [
    (False, False, ["int8"]), (True, False, ["bf16", "int8"]), (False, True, ["bf16", "int8"])])
def test_bf16_is_served_first_only_on_a_cpu_with_bf16_instructions(monkeypatch, avx512_bf16, amx, forms):
    import torch

    from cockatoo_lib.release.predict import native_forms

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert native_forms() == forms


@pytest.mark.slow
def test_the_reduced_form_verdict_follows_the_drop_the_decision_shows(trained_run, monkeypatch):
    from cockatoo_lib.release import gate

    # A drop a hair above the bound, as the decision rounds it, is the bound: accepted; one
    # that rounds above it is refused. (fp32, bf16, int8 scored in that order.)
    bound = gate.MAX_SERVING_F1_DROP
    f1 = iter([0.5, 0.5 - bound - 4e-7, 0.5 - bound - 4e-6])
    monkeypatch.setattr(gate, "report", lambda *args, **kwargs: {"macro_f1": next(f1)})
    rows = gate.split_rows(trained_run["data"], "test")
    result = gate.serving_check(Classifier(trained_run["model"]), rows)
    assert result["forms"]["bf16"]["drop"] == bound and result["forms"]["bf16"]["accepted"]
    assert result["forms"]["int8"]["drop"] > bound and not result["forms"]["int8"]["accepted"]


def test_out_of_range_settings_are_one_line(capsys, monkeypatch):
    code, _, err = run_cli(["serve", "--model", "m", "--max-batch-size", "0"], capsys, monkeypatch)
    assert code == 2
    assert error_line(err) == "error: --max-batch-size 0: input should be greater than or equal to 1"


@pytest.mark.slow
def test_a_model_that_cannot_load_is_one_line_before_the_port_opens(trained_run, tmp_path, capsys,
                                                                    monkeypatch):
    code, _, err = run_cli(["serve", "--model", str(tmp_path), "--http-port", str(free_port())],
                           capsys, monkeypatch)
    assert code == 2 and "is not a cockatoo model folder" in error_line(err)
    code, _, err = run_cli(["serve", "--model", "models:/nothing@champion", "--registry-uri",
                            f"sqlite:///{tmp_path / 'r.db'}"], capsys, monkeypatch)
    assert code == 2 and "no model named 'nothing' is registered" in error_line(err)
    broken = shutil.copytree(trained_run["model"], tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not weights")
    code, _, err = run_cli(["serve", "--model", str(broken)], capsys, monkeypatch)
    assert code == 2 and error_line(err).startswith(f"error: cannot load the model {broken}: ")


def test_the_readme_lists_every_server_setting_with_its_default():
    from cockatoo_lib.serving.settings import ServeSettings

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = dict(line.split(" | ")[:2] for line in readme.splitlines() if line.startswith("| `")
                and line.split("`")[1] in ServeSettings.model_fields)
    shown = {name: ("on" if f.default else "off") if isinstance(f.default, bool)
             else str(f.default) if isinstance(f.default, int) else (f.default or "(none)")
             if isinstance(f.default, str) else f"{f.default:g}"
             for name, f in ServeSettings.model_fields.items()}
    assert rows == {f"| `{name}`": value for name, value in shown.items()}


# ------------------------------------------------------------------ batching


def test_the_batcher_gathers_concurrent_requests_and_never_splits_or_mixes_them():
    batches = []
    version = {"now": 1}

    def score(instances):
        batches.append(list(instances))
        time.sleep(0.01)
        scored_by = version["now"]
        version["now"] += 1  # the next batch is scored by another version
        return [x * 10 for x in instances], scored_by

    async def main():
        batcher = Batcher(score, max_batch_size=8, max_wait_s=0.005)
        requests = [[i] for i in range(30)] + [[100 + i, 200 + i, 300 + i] for i in range(5)]
        answers = await asyncio.gather(*(batcher.submit(r) for r in requests))
        big = await batcher.submit(list(range(20)))  # over the batch size: a batch of its own
        batcher.close()
        return requests, answers, big

    requests, answers, big = asyncio.run(main())
    for request, (results, _) in zip(requests, answers):
        assert results == [x * 10 for x in request]
        batch = next(b for b in batches if request[0] in b)
        assert all(x in batch for x in request)  # one request, one batch, one version
    assert max(len(b) for b in batches[:-1]) <= 8
    assert len(batches) < len(requests) / 2, batches  # gathered, not one by one
    assert big[0] == [x * 10 for x in range(20)] and batches[-1] == list(range(20))


def test_a_failing_batch_fails_its_requests_and_the_batcher_goes_on():
    calls = []

    def score(instances):
        calls.append(instances)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return instances, "v"

    async def main():
        batcher = Batcher(score, max_batch_size=4, max_wait_s=0)
        with pytest.raises(RuntimeError, match="out of memory"):
            await batcher.submit(["a"])
        answer = await batcher.submit(["b"])
        batcher.close()
        return answer

    assert asyncio.run(main()) == (["b"], "v")


# ------------------------------------------------------------------ deploy


DEPLOY = ["deploy", "--model-name", NAME, "--registry-uri", "http://mlflow.mlflow:5000",
          "--namespace", "moderation", "--image-registry", "registry.example.com/ml", "--image-tag", "1.2.3",
          "--min-replicas", "2", "--max-replicas", "5", "--no-reduced-forms", "--max-batch-size", "16"]


def test_deploy_writes_an_inference_service_that_serves_the_champion(tmp_path, capsys, monkeypatch):
    out = tmp_path / "isvc.yaml"
    code, stdout, err = run_cli([*DEPLOY, "--output", out], capsys, monkeypatch)
    assert code == 0, err
    manifest = yaml.safe_load(out.read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert manifest["metadata"] == {"name": NAME, "namespace": "moderation",
                                    "labels": {"app.kubernetes.io/part-of": "cockatoo"}}
    predictor = manifest["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (2, 5)
    (container,) = predictor["containers"]
    assert container["image"] == "registry.example.com/ml/cockatoo-cpu:1.2.3"
    assert container["command"] == ["cockatoo", "serve"]
    assert container["args"] == ["--model", f"models:/{NAME}@champion", "--registry-uri",
                                 "http://mlflow.mlflow:5000", "--http-port", "8080", "--model-name", NAME,
                                 "--max-batch-size", "16", "--no-reduced-forms"]
    assert {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e} == {
        "MLFLOW_TRACKING_USERNAME": {"name": "cockatoo-mlflow", "key": "username", "optional": True},
        "MLFLOW_TRACKING_PASSWORD": {"name": "cockatoo-mlflow", "key": "password", "optional": True},
        "MLFLOW_TRACKING_TOKEN": {"name": "cockatoo-mlflow", "key": "token", "optional": True}}
    # The CPU limit is what the server sizes torch's threads from; /tmp is scratch on the node's disk.
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi", "ephemeral-storage": "4Gi"},
        "limits": {"cpu": "2", "memory": "4Gi", "ephemeral-storage": "4Gi"}}
    # Ready while the served model is loaded, not merely while the process answers.
    assert container["readinessProbe"]["httpGet"] == {"path": f"/v2/models/{NAME}/ready", "port": 8080}
    # A model that takes minutes to download and load is not killed by the liveness probe meanwhile.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 900
    # The `restricted` Pod Security Standard: non-root, no escalation, no capabilities, seccomp; a
    # read-only root, every write (downloads, HOME, caches) under the emptyDir at /tmp.
    assert container["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"}}
    assert container["volumeMounts"] == [{"name": "scratch", "mountPath": "/tmp"}]
    assert predictor["volumes"] == [{"name": "scratch", "emptyDir": {"sizeLimit": "4Gi"}}]
    assert all(e["value"].startswith("/tmp") for e in container["env"] if e["name"] in ("TMPDIR", "HOME",
                                                                                       "HF_HOME"))
    # Knative queues what is past the server's own bound instead of sending it to be refused.
    assert predictor["containerConcurrency"] == 64
    # Every field is one kserve's and the kubernetes client's models know, at its place.
    assert _unknown_fields(manifest, "V1beta1InferenceService") == []
    # The served command reads the manifest's arguments as meant.
    from typer.main import get_command

    from pipelines.cli import app
    command = get_command(app)
    serve_command = command.get_command(command.make_context("cockatoo", ["serve", "--help"],
                                                             resilient_parsing=True), "serve")
    given = serve_command.make_context("serve", list(container["args"])).params
    assert given["model"] == f"models:/{NAME}@champion"
    assert (given["max_batch_size"], given["reduced_forms"]) == (16, False)


def _unknown_fields(value, kind: str, where: str = "") -> list[str]:
    """The paths in `value` that the OpenAPI model `kind` (kserve's or the kubernetes client's,
    by class name, or list[...] / dict(str, ...)) has no field for."""
    import re

    import kserve.models
    import kubernetes.client.models

    if m := re.fullmatch(r"list\[(.*)\]", kind):
        return [x for i, item in enumerate(value) for x in _unknown_fields(item, m.group(1), f"{where}[{i}]")]
    if m := re.fullmatch(r"dict\(str, (.*)\)", kind):
        return [x for k, item in value.items() for x in _unknown_fields(item, m.group(1), f"{where}.{k}")]
    model = getattr(kserve.models, kind, None) or getattr(kubernetes.client.models, kind, None)
    if model is None:  # str, int, bool, object
        return []
    by_json = {json_name: attr for attr, json_name in model.attribute_map.items()}
    return [x for key, item in value.items()
            for x in ([f"{where}.{key}"] if key not in by_json
                      else _unknown_fields(item, model.openapi_types[by_json[key]], f"{where}.{key}"))]


@pytest.mark.parametrize(("extra", "memory"), [([], "4Gi"), (["--model-type", "modernbert"], "6Gi"),
                                             (["-m", "clip-vit"], "6Gi"), (["-m", "minilm"], "2Gi"),
                                             (["-m", "modernbert", "--memory", "8Gi"], "8Gi")])
def test_deploys_memory_holds_a_switch_of_versions_of_the_model_type_it_serves(extra, memory, tmp_path,
                                                                             capsys, monkeypatch):
    """A switch holds the old version served, the new one as trained and its reduced form: 2.5
    copies of the fp32 weights and the runtime (ModernBERT-large's 395M parameters: 5.2 GiB)."""
    out = tmp_path / "isvc.yaml"
    code, _, err = run_cli([*DEPLOY, *extra, "--output", out], capsys, monkeypatch)
    assert code == 0, err
    (container,) = yaml.safe_load(out.read_text())["spec"]["predictor"]["containers"]
    resources = container["resources"]
    assert resources["requests"]["memory"] == resources["limits"]["memory"] == memory


def test_deploy_refuses_an_unknown_model_type(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli([*DEPLOY, "-m", "bert", "--output", tmp_path / "x.yaml"], capsys, monkeypatch)
    assert code == 2 and error_line(err).startswith("error: unknown model type 'bert'; known: deberta")
    assert not (tmp_path / "x.yaml").exists()


def test_deploy_gives_the_server_a_teams_ca_from_its_secret(tmp_path, capsys, monkeypatch):
    out = tmp_path / "isvc.yaml"
    code, _, err = run_cli([*DEPLOY, "--output", out, "--ca-secret", "team-ca"], capsys, monkeypatch)
    assert code == 0, err
    manifest = yaml.safe_load(out.read_text())
    predictor = manifest["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert {"name": "COCKATOO_EXTRA_CA_PEM",
            "valueFrom": {"secretKeyRef": {"name": "team-ca", "key": "ca.crt"}}} in container["env"]
    assert _unknown_fields(manifest, "V1beta1InferenceService") == []


def test_deploy_apply_creates_then_updates_the_service(tmp_path, capsys, monkeypatch):
    with FakeKubernetes(lambda body: ("Complete", "", ""), namespace="moderation") as k8s:
        monkeypatch.setenv("KUBECONFIG", str(k8s.kubeconfig(tmp_path)))
        code, out, err = run_cli([*DEPLOY, "--output", tmp_path / "a.yaml", "--apply"], capsys, monkeypatch)
        assert code == 0 and "created InferenceService moderation/moderation" in out, err
        code, out, err = run_cli([*DEPLOY[:-1], "64", "--output", tmp_path / "b.yaml", "--apply"],
                                 capsys, monkeypatch)
        assert code == 0 and "updated InferenceService moderation/moderation" in out, err
        stored = k8s.custom[("inferenceservices", NAME)]
        args = stored["spec"]["predictor"]["containers"][0]["args"]
        assert args[args.index("--max-batch-size") + 1] == "64"
        assert stored["metadata"]["resourceVersion"] == "2"


def test_deploy_refuses_what_a_cluster_cannot_serve(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["deploy", "--model-name", NAME, "--registry-uri", "sqlite:///runs/registry/mlflow.db",
                            "--output", tmp_path / "x.yaml"], capsys, monkeypatch)
    assert code == 2 and "a registry the cluster can reach" in error_line(err)
    code, _, err = run_cli([*DEPLOY, "--min-replicas", "6", "--output", tmp_path / "x.yaml"],
                           capsys, monkeypatch)
    assert code == 2 and "replicas: min 6 and max 5" in error_line(err)
    code, _, err = run_cli([*DEPLOY, "--name", "Moderation_v2", "--output", tmp_path / "x.yaml"],
                           capsys, monkeypatch)
    assert code == 2 and "InferenceService name 'Moderation_v2'" in error_line(err)
    assert not (tmp_path / "x.yaml").exists()
    with FakeKubernetes(lambda body: ("Complete", "", "")) as k8s:  # then gone: nobody answers
        kubeconfig = k8s.kubeconfig(tmp_path)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    code, _, err = run_cli([*DEPLOY, "--output", tmp_path / "z.yaml", "--apply"], capsys, monkeypatch)
    assert code == 2
    assert error_line(err).startswith("error: cannot apply InferenceService moderation/moderation:")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    monkeypatch.setattr("kubernetes.config.load_incluster_config", _no_cluster)
    code, _, err = run_cli([*DEPLOY, "--output", tmp_path / "y.yaml", "--apply"], capsys, monkeypatch)
    assert code == 2 and "no Kubernetes cluster to apply to" in error_line(err)


def _no_cluster():
    from kubernetes.config import ConfigException

    raise ConfigException("not in a pod")
