"""A loopback stand-in for the Kubernetes API, as far as Kubeflow Trainer's SDK uses it: the
torch-distributed ClusterTrainingRuntime, TrainJobs (created, read, listed by label, deleted),
their node pods and the pods' logs. A created job "runs" at once: `on_create(body)` plays the
nodes (it may write what they would) and returns the job's end, ("Complete", "") or ("Failed",
message), or ("Running", "") for a job that never ends, and its log; the end is dated now.
KServe's InferenceServices are stored as they are created and replaced (`custom`), with a
resourceVersion that counts the writes."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

TRAINER = "/apis/trainer.kubeflow.org/v1alpha1"
KSERVE = "/apis/serving.kserve.io/v1beta1"
CREATED = "2026-11-30T08:00:00Z"

RUNTIME = {
    "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "ClusterTrainingRuntime",
    "metadata": {"name": "torch-distributed", "labels": {"trainer.kubeflow.org/framework": "torch"}},
    "spec": {
        "mlPolicy": {"numNodes": 1, "torch": {"numProcPerNode": "auto"}},
        "template": {"spec": {"replicatedJobs": [{
            "name": "node", "replicas": 1,
            "template": {
                "metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                "spec": {"template": {"spec": {"containers": [
                    {"name": "node", "image": "pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime",
                     "command": ["/bin/bash", "-c"]}]}}}}}]}},
    },
}


class FakeKubernetes:
    def __init__(self, on_create: Callable[[dict], tuple[str, str, str]], namespace: str = "default"):
        self.on_create, self.namespace = on_create, namespace
        self.jobs: dict[str, dict] = {}
        self.created: list[dict] = []  # the bodies, as the SDK sent them
        self.deleted: list[str] = []
        self.logs: dict[str, str] = {}
        self.custom: dict[tuple[str, str], dict] = {}  # (plural, name) -> the stored object
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def kubeconfig(self, folder: Path) -> Path:
        path = folder / "kubeconfig"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "t"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake",
                                                      "namespace": self.namespace}}]}))
        return path

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _pods(self, name: str) -> dict:
        if name not in self.jobs:
            return {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": []}
        conditions = self.jobs[name]["status"]["conditions"]
        phase = ("Running" if not conditions else "Succeeded" if conditions[0]["type"] == "Complete"
                 else "Failed")
        job = self.jobs[name]
        pod = {"metadata": {"name": f"{name}-node-0-0-abcde", "namespace": self.namespace,
                            "creationTimestamp": CREATED,
                            "labels": {"jobset.sigs.k8s.io/jobset-name": name,
                                       "jobset.sigs.k8s.io/replicatedjob-name": "node",
                                       "batch.kubernetes.io/job-completion-index": "0"}},
               "spec": {"containers": [{"name": "node", "image": job["spec"]["trainer"]["image"]}]},
               "status": {"phase": phase}}
        return {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [pod]}

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, body, content_type="application/json"):
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _missing(self):
                self._reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                  "reason": "NotFound", "code": 404})

            def do_GET(self):
                path, _, query = self.path.partition("?")
                ns = fake.namespace
                if path == "/api/v1/namespaces/kubeflow-system/configmaps/kubeflow-trainer-public":
                    return self._reply(200, {"kind": "ConfigMap", "apiVersion": "v1", "metadata": {},
                                             "data": {"kubeflow_trainer_version": "v2.1.0"}})
                if path == f"{TRAINER}/clustertrainingruntimes/torch-distributed":
                    return self._reply(200, RUNTIME)
                if path == f"{TRAINER}/namespaces/{ns}/trainjobs":  # the list, by label selector
                    wanted = dict(kv.split("=") for kv in unquote(query.partition("labelSelector=")[2]
                                                                  .split("&")[0]).split(",") if kv)
                    items = [j for j in fake.jobs.values()
                             if wanted.items() <= (j["metadata"].get("labels") or {}).items()]
                    return self._reply(200, {"kind": "TrainJobList", "metadata": {}, "items": items,
                                             "apiVersion": "trainer.kubeflow.org/v1alpha1"})
                if m := re.fullmatch(rf"{TRAINER}/namespaces/{ns}/trainjobs/([\w-]+)", path):
                    job = fake.jobs.get(m.group(1))
                    return self._reply(200, job) if job else self._missing()
                if path == f"/api/v1/namespaces/{ns}/pods":
                    name = re.search(r"jobset-name%3D([\w-]+)", query)
                    return self._reply(200, fake._pods(name.group(1) if name else ""))
                if m := re.fullmatch(rf"/api/v1/namespaces/{ns}/pods/([\w-]+)-node-0-0-abcde/log", path):
                    return self._reply(200, fake.logs.get(m.group(1), ""), "text/plain")
                if m := re.fullmatch(rf"{KSERVE}/namespaces/{ns}/(\w+)/([\w-]+)", path):
                    found = fake.custom.get((m.group(1), m.group(2)))
                    return self._reply(200, found) if found else self._missing()
                return self._missing()  # namespaced runtimes, among others

            def _store(self, plural: str, body: dict, create: bool):
                key = (plural, body["metadata"]["name"])
                current = fake.custom.get(key)
                if create and current:
                    return self._reply(409, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                             "reason": "AlreadyExists", "code": 409})
                if not create and (not current or body["metadata"].get("resourceVersion")
                                   != current["metadata"]["resourceVersion"]):
                    return self._reply(409 if current else 404, {"kind": "Status", "code": 409})
                version = int(current["metadata"]["resourceVersion"]) + 1 if current else 1
                fake.custom[key] = {**body, "metadata": {**body["metadata"], "resourceVersion": str(version)}}
                return self._reply(200 if current else 201, fake.custom[key])

            def do_PUT(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if m := re.fullmatch(rf"{KSERVE}/namespaces/{fake.namespace}/(\w+)/([\w-]+)", self.path):
                    return self._store(m.group(1), body, create=False)
                return self._missing()

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if m := re.fullmatch(rf"{KSERVE}/namespaces/{fake.namespace}/(\w+)", self.path):
                    return self._store(m.group(1), body, create=True)
                if self.path.startswith(f"{TRAINER}/namespaces/{fake.namespace}/trainjobs"):
                    fake.created.append(body)
                    outcome, message, log = fake.on_create(body)
                    name = body["metadata"]["name"]
                    fake.logs[name] = log
                    condition = {"type": outcome, "status": "True", "message": message,
                                 "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                 "reason": "JobSetFailed" if message else "Done"}
                    fake.jobs[name] = {**body, "metadata": {**body["metadata"], "namespace": fake.namespace,
                                                            "creationTimestamp": CREATED},
                                       "status": {"conditions": [condition] if outcome != "Running" else []}}
                    return self._reply(201, fake.jobs[name])
                return self._missing()

            def do_DELETE(self):
                m = re.fullmatch(rf"{TRAINER}/namespaces/{fake.namespace}/trainjobs/([\w-]+)", self.path)
                if m and m.group(1) in fake.jobs:
                    fake.deleted.append(m.group(1))
                    return self._reply(200, fake.jobs.pop(m.group(1)))
                return self._missing()

        return Handler
