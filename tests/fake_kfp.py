"""A fake KFP API server on loopback, for testing `cockatoo submit` and `cockatoo schedule`
without a cluster. Request bodies are parsed into the real kfp_server_api models, so a body
the real server's API would not accept fails here too."""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import kfp_server_api

API = "/apis/v2beta1"


def parse_model(body: dict, model: str):
    """Deserialize a JSON body into a kfp_server_api model (raises on a malformed body)."""

    class Response:
        data = json.dumps(body)

    return kfp_server_api.ApiClient().deserialize(Response(), model)


class FakeKFP:
    def __init__(self):
        self.requests: list[dict] = []
        self.experiments: dict[str, dict] = {}
        self.runs: list = []
        self.recurring_runs: list = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self, body=None):
                url = urlparse(self.path)
                fake.requests.append({"method": self.command, "path": url.path,
                                      "query": parse_qs(url.query), "body": body,
                                      "authorization": self.headers.get("Authorization")})
                return url

            def do_GET(self):
                url = self._record()
                if url.path == f"{API}/healthz":
                    return self._reply(200, {"multi_user": False})
                if url.path == f"{API}/experiments":
                    query = parse_qs(url.query).get("filter", ["{}"])[0]
                    predicates = json.loads(query).get("predicates", [])
                    wanted = [p.get("stringValue", p.get("string_value")) for p in predicates]
                    found = [e for e in fake.experiments.values() if e["display_name"] in wanted]
                    return self._reply(200, {"experiments": found, "total_size": len(found)})
                return self._reply(404, {"error": f"no route {url.path}"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                url = self._record(body)
                try:
                    if url.path == f"{API}/experiments":
                        parse_model(body, "V2beta1Experiment")
                        experiment = {**body, "experiment_id": str(uuid.uuid4())}
                        fake.experiments[experiment["experiment_id"]] = experiment
                        return self._reply(200, experiment)
                    if url.path == f"{API}/runs":
                        fake.runs.append(parse_model(body, "V2beta1Run"))
                        return self._reply(200, {**body, "run_id": str(uuid.uuid4())})
                    if url.path == f"{API}/recurringruns":
                        fake.recurring_runs.append(parse_model(body, "V2beta1RecurringRun"))
                        return self._reply(200, {**body, "recurring_run_id": str(uuid.uuid4())})
                except (ValueError, TypeError) as exc:
                    return self._reply(400, {"error": str(exc)})
                return self._reply(404, {"error": f"no route {url.path}"})

        return Handler
