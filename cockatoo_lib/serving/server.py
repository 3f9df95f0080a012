"""`cockatoo serve`: a trained model behind KServe's V1 and Open Inference (v2) protocols.

A `kserve.Model` on kserve's `ModelServer`. Each instance is a text, or for CLIP a text and an
image (an http(s) URL, or base64 bytes). Each answer gives every label's probability, the
labels flagged at the model's stored thresholds, and the version that answered. Requests are
gathered into batches (batching.Batcher); a model given as `models:/NAME@ALIAS` is followed:
when the alias moves, the new version loads in the background and takes over between two
batches, so no batch mixes versions and no request fails during the switch.

Bad input is a 400 whose message names the field (`instances[2].text: ...`); the limits are
`ServeSettings`. Readiness and liveness are kserve's (`/v2/health/ready`, `/v2/health/live`,
`/v1/models/NAME`); `/metrics` adds cockatoo_* counters and histograms to kserve's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from cockatoo_lib.errors import CockatooError, first_line
from cockatoo_lib.serving.settings import DEFAULT_HTTP_PORT, ServeSettings

log = logging.getLogger(__name__)

# Prometheus metrics, beside kserve's own request_*_seconds histograms on /metrics.
REQUESTS = Counter("cockatoo_requests", "predict and infer requests, by outcome",
                   ["model_name", "outcome"])
LATENCY = Histogram("cockatoo_request_seconds", "time from a request's decoded body to its answer",
                    ["model_name"], buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
BATCH_SIZE = Histogram("cockatoo_batch_instances", "instances per scored batch", ["model_name"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
ERRORS = Counter("cockatoo_errors", "bad requests, failed batches and versions that failed to load",
                 ["model_name", "kind"])
VERSION = Gauge("cockatoo_model_version", "the registry version being served (0: a model folder)",
                ["model_name"])
BAD_REQUESTS = Counter("cockatoo_bad_requests", "requests refused as the client's fault, by HTTP status "
                       "(400 bad input, 404 a route not served, 415 the binary extension)",
                       ["model_name", "status"])
FOLLOW_FAILURES = Counter("cockatoo_follow_failures", "failed loads of the version the alias points at "
                          "(the replica serves its old version meanwhile)", ["model_name"])
# A version that failed to load is tried again after the poll interval, doubling per failure up to
# this: a blip in the artifact store must not pin a replica to the old champion.
MAX_RETRY_S = 600.0


class BadInput(CockatooError):
    """A request the server refuses with 400; the message starts with the field."""


# Where an instance's image is, in each protocol's terms: the field a 400 names.
V1_IMAGE, V2_IMAGE = "instances[{}].image", "inputs[image][{}]"


def count_bad_input(model_name: str, status: int = 400) -> None:
    REQUESTS.labels(model_name, "bad_input").inc()
    ERRORS.labels(model_name, "bad_input").inc()
    BAD_REQUESTS.labels(model_name, str(status)).inc()


@dataclass(frozen=True)
class Instance:
    text: str
    image: bytes | str | None = None  # bytes, or an http(s) URL until it is fetched
    # The model's input pixels of the image, made in the request's thread, and the spec they
    # follow (a version served next might read others).
    pixels: bytes | None = None
    pixel_spec: dict | None = None


@dataclass(frozen=True)
class Served:
    """One loaded model version; a batch holds one of these from start to end."""

    classifier: object  # release.predict.Classifier
    version: str  # the registry version, or the model folder or URI
    uri: str


class ModelSource:
    """Where the model comes from: a folder or bucket URI (fixed), or models:/NAME@ALIAS
    (followed) or models:/NAME/VERSION (fixed) in a registry."""

    def __init__(self, model: str, registry_uri: str | None, reduced_forms: bool = True):
        from cockatoo_lib.release.model_registry import open_registry, parse_model_uri

        self.model, self.registry_uri, self.reduced_forms = model, registry_uri, reduced_forms
        self.name = self.alias = self.version = None
        self.registry = None
        if model.startswith("models:/"):
            self.name, self.alias, self.version = parse_model_uri(model)
            self.registry = open_registry(registry_uri)

    @property
    def follows(self) -> bool:
        return self.alias is not None

    @property
    def endpoint_name(self) -> str:
        return self.name or Path(self.model.rstrip("/")).name or "cockatoo"

    def alias_version(self) -> str | None:
        found = self.registry.by_alias(self.name, self.alias)
        return None if found is None else found.version

    def load(self, version: str | None = None) -> Served:
        from cockatoo_lib.release.predict import Classifier

        if self.registry is None:
            return Served(Classifier.load(self.model), self.model, self.model)
        version = version or self.version or self.alias_version()
        if version is None:  # the download names the missing alias and what to do
            return Served(Classifier.load(self.model, self.registry_uri), "", self.model)
        uri = f"models:/{self.name}/{version}"
        classifier = Classifier.load(uri, self.registry_uri)
        form = self.serving_form(classifier, self.registry.version(self.name, version).tags)
        return Served(classifier.in_form(form), version, uri)

    def serving_form(self, classifier, tags: dict) -> str:
        """On a CPU, the first reduced form it runs natively that the version's gate accepted
        (release.gate.serving_check); else, and on a GPU, the weights as trained."""
        from cockatoo_lib.release.gate import serving_tag
        from cockatoo_lib.release.predict import native_forms

        if self.reduced_forms and classifier.device.type == "cpu":
            for form in native_forms():
                if tags.get(serving_tag(form)) == "accepted":
                    return form
        return "fp32"


class AliasFollower:
    """Polls the registry; when the alias points at another version, loads it in this thread
    and hands it to `switch`. A version that fails to load is logged and counted
    (cockatoo_follow_failures), the old one keeps serving, and the load is tried again after
    the poll interval, doubling per failure up to MAX_RETRY_S; an unreachable registry is logged
    too."""

    def __init__(self, source: ModelSource, current: str, switch, interval_s: float, model_name: str,
                 clock=time.monotonic):
        self.source, self.current, self.switch = source, current, switch
        self.interval_s, self.model_name, self.clock = interval_s, model_name, clock
        self.failed: str | None = None
        self.failures, self.retry_at = 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cockatoo-alias-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        try:
            version = self.source.alias_version()
        except CockatooError as exc:
            log.warning("%s; still serving version %s", exc, self.current)
            return
        if version in (None, self.current) or (version == self.failed and self.clock() < self.retry_at):
            return
        if version != self.failed:
            self.failed, self.failures = None, 0
        log.info("%s@%s moved to version %s (serving %s): loading it", self.source.name,
                 self.source.alias, version, self.current)
        try:
            served = self.source.load(version)
        except Exception as exc:  # noqa: BLE001 - whatever breaks a load, the old version serves on
            self.failed, self.failures = version, self.failures + 1
            wait = min(self.interval_s * 2 ** (self.failures - 1), MAX_RETRY_S)
            self.retry_at = self.clock() + wait
            ERRORS.labels(self.model_name, "model_load").inc()
            FOLLOW_FAILURES.labels(self.model_name).inc()
            log.error("cannot load %s version %s: %s; still serving version %s (failure %d; next try "
                      "in %.0f s)", self.source.name, version, first_line(exc), self.current, self.failures,
                      wait)
            return
        self.switch(served)
        self.current, self.failed, self.failures = version, None, 0


def _field_error(where: str, why: str) -> BadInput:
    return BadInput(f"{where}: {why}")


def parse_v1(body, settings: ServeSettings, reads_images: bool) -> list[Instance]:
    """KServe V1: {"instances": [TEXT, or {"text": TEXT, "image": URL or {"b64": DATA}}, ...]}."""
    if not isinstance(body, dict):
        raise _field_error("request body", 'expected a JSON object with "instances"')
    instances = body.get("instances")
    if instances is None:
        raise _field_error("instances", 'missing: send {"instances": ["a text", ...]}')
    if not isinstance(instances, list):
        raise _field_error("instances", f"expected a list, got {type(instances).__name__}")
    _check_count("instances", len(instances), settings)
    out = []
    for i, item in enumerate(instances):
        where = f"instances[{i}]"
        if isinstance(item, dict):
            unknown = set(item) - {"text", "image"}
            if unknown:
                raise _field_error(f"{where}.{sorted(unknown)[0]}", 'unknown field; an instance has '
                                                                    '"text" and, for CLIP, "image"')
            text, image = item.get("text"), _image_ref(item.get("image"), V1_IMAGE.format(i))
            where += ".text"
        else:
            text, image = item, None
        out.append(Instance(_check_text(text, where, settings), image))
    return _check_images(out, V1_IMAGE, reads_images, settings)


def parse_v2(request, settings: ServeSettings, reads_images: bool) -> list[Instance]:
    """Open Inference Protocol: a BYTES input "text" of shape [n], and for CLIP an optional BYTES
    input "image" of shape [n] (URLs or base64; an empty string for no image)."""
    inputs = {x.name: x for x in request.inputs}
    unknown = set(inputs) - {"text", "image"}
    if unknown:
        raise _field_error(f"inputs[{sorted(unknown)[0]}]", 'unknown input; send "text" and, for CLIP, '
                                                            '"image"')
    if "text" not in inputs:
        raise _field_error("inputs", 'no input named "text" (BYTES, shape [n])')
    texts = _v2_strings(inputs["text"], "inputs[text]")
    _check_count("inputs[text]", len(texts), settings)
    images = [None] * len(texts)
    if "image" in inputs:
        images = _v2_strings(inputs["image"], "inputs[image]")
        if len(images) != len(texts):
            raise _field_error("inputs[image]", f"{len(images)} images for {len(texts)} texts")
        images = [_image_ref(x or None, V2_IMAGE.format(i)) for i, x in enumerate(images)]
    out = [Instance(_check_text(t, f"inputs[text][{i}]", settings), image)
           for i, (t, image) in enumerate(zip(texts, images))]
    return _check_images(out, V2_IMAGE, reads_images, settings)


def _v2_strings(tensor, where: str) -> list:
    if tensor.datatype != "BYTES":
        raise _field_error(where, f"datatype {tensor.datatype}; expected BYTES")
    data = tensor.data
    if isinstance(data, np.ndarray):
        data = data.tolist()
    if not isinstance(data, list):
        raise _field_error(where, "expected a list of strings")
    flat = [x for row in data for x in (row if isinstance(row, list) else [row])]
    if len(tensor.shape) != 1 or tensor.shape[0] != len(flat):
        raise _field_error(where, f"shape {list(tensor.shape)} for {len(flat)} values; "
                                  f"expected [{len(flat)}]")
    return [x.decode("utf-8", "replace") if isinstance(x, bytes) else x for x in flat]


def _check_count(where: str, n: int, settings: ServeSettings) -> None:
    if n == 0:
        raise _field_error(where, "empty; send at least one")
    if n > settings.max_instances:
        raise _field_error(where, f"{n} instances, over the limit of {settings.max_instances} "
                                  "(max_instances); split the request")


def _check_text(text, where: str, settings: ServeSettings) -> str:
    if not isinstance(text, str):
        raise _field_error(where, f"expected a string, got {type(text).__name__}")
    if not text.strip():
        raise _field_error(where, "empty text")
    if len(text) > settings.max_text_chars:
        raise _field_error(where, f"{len(text)} characters, over the limit of {settings.max_text_chars} "
                                  "(max_text_chars)")
    return text


def _image_ref(value, where: str) -> bytes | str | None:
    if value is None:
        return None
    if isinstance(value, dict) and set(value) == {"b64"}:
        value = value["b64"]
        if not isinstance(value, str):
            raise _field_error(where, "b64 must be a string")
    elif not isinstance(value, str):
        raise _field_error(where, 'expected an http(s) URL or {"b64": DATA}')
    if value.startswith(("http://", "https://")):
        return value
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _field_error(where, "neither an http(s) URL nor valid base64") from None


def _check_images(instances: list[Instance], where: str, reads_images: bool,
                  settings: ServeSettings) -> list[Instance]:
    for i, x in enumerate(instances):
        if x.image is not None and not reads_images:
            raise _field_error(where.format(i), "this model reads text only")
        if isinstance(x.image, str) and not settings.image_url_hosts:
            raise _field_error(where.format(i), 'image URLs are off on this server (cockatoo serve '
                                                '--image-url-hosts names the hosts it may fetch from); send '
                                                'the image inline as {"b64": DATA}')
    return instances


def read_images(instances: list[Instance], where: str, settings: ServeSettings, classifier) -> list[Instance]:
    """Fetch the URLs, check every image against the limits and decode it into `classifier`'s
    pixels (blocking: run it in the request's thread, so that one large image holds up no batch)."""
    from cockatoo_lib.data.clip_images import check_image
    from cockatoo_lib.serving.image_urls import REFUSED, FetchRefused, HostPolicy, fetch_image

    policy = HostPolicy(settings.image_url_hosts)
    images = []
    for i, x in enumerate(instances):
        data = x.image
        if isinstance(data, str):
            try:
                data = fetch_image(data, policy, settings.image_fetch_timeout_s, settings.max_image_bytes)
            except FetchRefused as exc:
                log.info("%s: image URL %s not fetched: %s", where.format(i), x.image[:200], exc)
                raise _field_error(where.format(i), REFUSED) from None
        if data is not None and len(data) > settings.max_image_bytes:
            raise _field_error(where.format(i), f"{len(data)} bytes, over the limit of "
                                                f"{settings.max_image_bytes} "
                                                "(max_image_bytes)")
        if data is not None and (why := check_image(data, settings.max_image_pixels)):
            raise _field_error(where.format(i), f"cannot read the image: {why}")
        images.append(data)
    pixels = classifier.pixels(images, len(images), checked=True)
    return [Instance(x.text, data, p, classifier.pixel_spec) for x, data, p in zip(instances, images, pixels)]


@dataclass
class _Parsed:
    instances: list[Instance]
    v2_request: object | None  # the InferRequest of a v2 call: its id goes into the answer


def make_model(name: str, source: ModelSource, settings: ServeSettings):
    """The kserve Model: built here because kserve is imported only by the server."""
    import kserve
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

    from cockatoo_lib.serving.batching import Batcher

    class CockatooModel(kserve.Model):
        def __init__(self):
            super().__init__(name)
            self.served: Served | None = None
            self.follower: AliasFollower | None = None
            self.batcher = Batcher(self._score, max_batch_size=settings.max_batch_size,
                                   max_wait_s=settings.max_batch_wait_ms / 1000,
                                   on_batch=BATCH_SIZE.labels(name).observe)

        def load(self) -> bool:
            self.switch(source.load())
            if source.follows:
                self.follower = AliasFollower(source, self.served.version, self.switch,
                                              settings.poll_interval_s, name)
                self.follower.start()
            self.ready = True
            return True

        def switch(self, served: Served) -> None:
            self.served = served  # one assignment: a batch scores with the version it started with
            VERSION.labels(name).set(int(served.version) if served.version.isdigit() else 0)
            log.info("serving %s as %s (version %s, %s)", served.uri, name, served.version,
                     served.classifier.form)

        def stop(self) -> None:
            if self.follower is not None:
                self.follower.stop()
            self.batcher.close()
            super().stop()

        @property
        def reads_images(self) -> bool:
            return self.served.classifier.image_processor is not None

        def _score(self, instances: list[Instance]):
            served = self.served  # read once: the whole batch is this version's
            classifier, images, pixels = served.classifier, None, None
            if classifier.image_processor is not None:
                images = [x.image for x in instances]
                if all(x.image is None or x.pixel_spec == classifier.pixel_spec for x in instances):
                    pixels = [x.pixels for x in instances]  # else the version changed: decode again
            probs = classifier.predict_proba([x.text for x in instances], images,
                                             batch_size=settings.max_batch_size,
                                             max_batch_tokens=settings.max_batch_tokens, pixels=pixels)
            return probs, served

        def validate(self, payload):
            return payload  # preprocess has checked it

        async def __call__(self, body, headers=None, verb=None):
            start = time.perf_counter()
            try:
                result = await (super().__call__(body, headers) if verb is None
                                else super().__call__(body, headers, verb))
            except BadInput as exc:
                count_bad_input(name)
                raise InvalidInput(str(exc)) from None
            except Exception:
                REQUESTS.labels(name, "error").inc()
                ERRORS.labels(name, "internal").inc()
                raise
            REQUESTS.labels(name, "ok").inc()
            LATENCY.labels(name).observe(time.perf_counter() - start)
            return result

        async def preprocess(self, payload, headers=None) -> _Parsed:
            if isinstance(payload, bytes):  # kserve leaves a body not labelled JSON (curl -d) undecoded
                import orjson

                payload = orjson.loads(payload)  # _BodyCheck has made sure it parses
            if isinstance(payload, InferRequest):
                instances = parse_v2(payload, settings, self.reads_images)
                where, request = V2_IMAGE, payload
            else:
                instances = parse_v1(payload, settings, self.reads_images)
                where, request = V1_IMAGE, None
            if any(x.image is not None for x in instances):
                instances = await asyncio.to_thread(read_images, instances, where, settings,
                                                    self.served.classifier)
            return _Parsed(instances, request)

        async def predict(self, parsed: _Parsed, headers=None, response_headers=None):
            probs, served = await self.batcher.submit(parsed.instances)
            return np.asarray(probs), served, parsed

        async def postprocess(self, result, headers=None, response_headers=None):
            probs, served, parsed = result
            classifier = served.classifier
            flagged = [[x for x, hit in zip(classifier.labels, row >= classifier.thresholds) if hit]
                       for row in probs]
            if parsed.v2_request is None:
                return {"model_name": name, "model_version": served.version,
                        "predictions": [{"probabilities": dict(zip(classifier.labels, map(float, row))),
                                         "labels": labels} for row, labels in zip(probs, flagged)]}
            labels = ",".join(classifier.labels)
            return InferResponse(
                response_id=parsed.v2_request.id or "", model_name=name, model_version=served.version,
                infer_outputs=[
                    InferOutput("probabilities", list(probs.shape), "FP32", probs.ravel().tolist(),
                                parameters={"labels": labels}),
                    InferOutput("labels", [len(flagged)], "BYTES", [",".join(x) for x in flagged])])

    return CockatooModel()


class _BodyCheck:
    """ASGI middleware. POST goes to the predict and infer routes only: any other (kserve's model
    repository load and unload, :explain) is a 404 before its body is read, so nobody who can
    reach the endpoint can unload the model. On those routes a body over the size limit, or one
    that is not JSON, is a 400 that says so, before kserve reads it; past `max_concurrent_requests`
    in progress, a request is a 503 with Retry-After before its body is read (the queue in front
    of the batches is bounded, and a load balancer sends the retry to another replica)."""

    def __init__(self, app, max_body_bytes: int, model_name: str, max_concurrent_requests: int):
        self.app, self.max_body_bytes, self.model_name = app, max_body_bytes, model_name
        self.max_concurrent_requests, self.in_progress = max_concurrent_requests, 0

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if not path.endswith((":predict", "/infer")):
            return await self._refuse(send, f"POST {path}: not served here; POST goes to "
                                            "/v1/models/NAME:predict or /v2/models/NAME/infer", status=404)
        if self.in_progress >= self.max_concurrent_requests:
            REQUESTS.labels(self.model_name, "busy").inc()
            return await self._answer(send, 503, f"busy: {self.in_progress} requests in progress, the limit "
                                                 "(max_concurrent_requests); retry", [(b"retry-after", b"1")])
        self.in_progress += 1
        try:
            return await self._checked(scope, receive, send)
        finally:
            self.in_progress -= 1

    async def _checked(self, scope, receive, send):
        if any(name.lower() == b"inference-header-content-length" for name, _ in scope.get("headers", [])):
            return await self._refuse(send, "request body: the binary tensor extension is not taken; send "
                                            "the JSON form of the request", status=415)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return await self._refuse(send, f"request body: over the limit of {self.max_body_bytes} "
                                                "bytes (max_body_bytes)")
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        import orjson

        try:
            orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return await self._refuse(send, f"request body: not valid JSON ({exc})")
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _refuse(self, send, message: str, status: int = 400) -> None:
        count_bad_input(self.model_name, status)
        await self._answer(send, status, message)

    @staticmethod
    async def _answer(send, status: int, message: str, headers: list | None = None) -> None:
        import orjson

        data = orjson.dumps({"error": message})
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(data)).encode()), *(headers or [])]})
        await send({"type": "http.response.body", "body": data})


def _import_kserve_server():
    """kserve.model_server parses sys.argv when imported; it must not see cockatoo's options."""
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        from kserve import model_server
    finally:
        sys.argv = argv
    return model_server


def serve(model: str, registry_uri: str | None = None, *, http_port: int = DEFAULT_HTTP_PORT,
          model_name: str | None = None, settings: ServeSettings = ServeSettings()) -> None:
    """Load the model (a bad one is a CockatooError before the port opens), then serve until
    SIGTERM or SIGINT."""
    from cockatoo_lib.cpus import size_torch_threads

    model_server = _import_kserve_server()
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import ORJSONResponse


    source = ModelSource(model, registry_uri, settings.reduced_forms)
    name = model_name or source.endpoint_name
    served_model = make_model(name, source, settings)
    try:
        served_model.load()
    except CockatooError:
        raise
    except Exception as exc:  # noqa: BLE001 - weights, tokenizer or config that do not load
        raise CockatooError(f"cannot load the model {model}: {first_line(exc)}") from None

    async def refuse_invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        # loc is ("body", "InferenceRequest", "inputs", 0, ...): the field's path inside the body
        where = ".".join(str(x) for x in first.get("loc", ())
                         if x != "body" and not str(x)[:1].isupper()) or "request body"
        count_bad_input(name)
        return ORJSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=400)

    log.info("torch: %d threads, the CPUs this pod may use", size_torch_threads())
    app = model_server.app
    app.add_middleware(_BodyCheck, max_body_bytes=settings.max_body_bytes, model_name=name,
                       max_concurrent_requests=settings.max_concurrent_requests)
    app.add_exception_handler(RequestValidationError, refuse_invalid)
    # Two timing lines per request would triple the log; /metrics has the latencies.
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    model_server.ModelServer(http_port=http_port, enable_grpc=False, workers=1,
                             enable_latency_logging=False).start([served_model])
