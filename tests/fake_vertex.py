"""A loopback stand-in for Vertex AI's custom job REST API (v1), as far as the train step uses it:
create, read, list by label, cancel. A created job is parsed with the API's own message type
(google.cloud.aiplatform_v1's CustomJob), so a field the API does not know is a 400 as it would
be there. It runs in a thread: `on_create(body)` plays the replicas and returns the job's end
state ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED" with a message, or None for a job that runs until
cancelled)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class FakeVertex:
    def __init__(self, on_create: Callable[[dict], tuple[str | None, str]]):
        self.on_create = on_create
        self.jobs: dict[str, dict] = {}  # resource name -> the job as the API returns it
        self.created: list[dict] = []  # the bodies, as the step sent them
        self.cancelled: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeVertex:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _run(self, resource: str, body: dict) -> None:
        state, message = self.on_create(body)
        job = self.jobs[resource]
        if state and job["state"] == "JOB_STATE_RUNNING":
            job.update(state=state, **({"error": {"code": 9, "message": message}} if message else {}))

    def _create(self, parent: str, body: dict) -> tuple[int, dict]:
        from google.cloud.aiplatform_v1.types import CustomJob
        from google.protobuf import json_format

        try:
            json_format.ParseDict(body, CustomJob.pb(CustomJob()))
        except json_format.ParseError as exc:
            return 400, {"error": {"code": 400, "message": f"Invalid JSON payload received. {exc}"}}
        self.created.append(body)
        resource = f"{parent}/customJobs/{1000 + len(self.created)}"
        self.jobs[resource] = {**body, "name": resource, "state": "JOB_STATE_RUNNING",
                               "createTime": f"2026-12-06T08:00:{len(self.created):02d}Z"}
        threading.Thread(target=self._run, args=(resource, body), daemon=True).start()
        return 200, self.jobs[resource]

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                url = urlparse(self.path)
                path = url.path.removeprefix("/v1/")
                if path.endswith("/customJobs"):
                    wanted = re.fullmatch(r'labels\.(\w+)="([^"]*)"', parse_qs(url.query)["filter"][0])
                    key, value = wanted.groups()
                    found = [j for name, j in fake.jobs.items()
                             if name.startswith(path) and j.get("labels", {}).get(key) == value]
                    return self._answer(200, {"customJobs": found} if found else {})
                if path in fake.jobs:
                    return self._answer(200, fake.jobs[path])
                return self._answer(404, {"error": {"code": 404, "message": f"{path} not found"}})

            def do_POST(self):
                path = urlparse(self.path).path.removeprefix("/v1/")
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"] or 0)) or b"{}")
                if path.endswith("/customJobs"):
                    return self._answer(*fake._create(path.removesuffix("/customJobs"), body))
                if path.endswith(":cancel") and path.removesuffix(":cancel") in fake.jobs:
                    resource = path.removesuffix(":cancel")
                    fake.cancelled.append(resource)
                    fake.jobs[resource]["state"] = "JOB_STATE_CANCELLED"
                    return self._answer(200, {})
                return self._answer(404, {"error": {"code": 404, "message": f"{path} not found"}})

        return Handler
