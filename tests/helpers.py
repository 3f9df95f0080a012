from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

BIN = Path(sys.executable).parent


def run_cli(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """Run `cockatoo ARGS` in this process through the real entry point."""
    from pipelines.cli import main  # the console script: library and pipeline commands

    monkeypatch.setattr(sys, "argv", ["cockatoo", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def forked(target, *args) -> multiprocessing.Process:
    """`target(*args)` in a process forked from this one, started: a process of its own, to kill
    or to race against, that begins with this process's imports loaded instead of spending ~5 s
    of CPU importing torch and transformers as a fresh interpreter does. Its `exitcode` is -9
    when killed, a SystemExit's code, or 1 after an exception (whose traceback goes to stderr).
    Unmeasured: what it runs, this process runs and measures too."""
    process = multiprocessing.get_context("fork").Process(target=_forked_main, args=(target, args))
    process.start()
    return process


def _forked_main(target, args) -> None:
    import coverage

    if coverage.Coverage.current() is not None:  # its measurements would die with the process
        coverage.Coverage.current().stop()
    if "torch" in sys.modules and sys.modules["torch"].get_num_threads() != 1:
        raise RuntimeError("forked with a torch thread pool, which OpenMP does not carry over a fork: "
                           "the tests run with OMP_NUM_THREADS=1 (tests/conftest.py)")
    target(*args)


def cli_main(args: list[str]) -> None:
    """`cockatoo ARGS` through the real entry point, for a forked process."""
    from pipelines.cli import main

    sys.argv = ["cockatoo", *map(str, args)]
    main()


def error_line(err: str) -> str:
    """The one `error:` line the CLI printed; fails if there is none or a traceback."""
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def write_config(folder: Path, sources: list[dict], **extra) -> Path:
    path = folder / "data.yaml"
    path.write_text(yaml.safe_dump({"sources": sources, **extra}))
    return path


def make_image(path_or_none, seed: int, size=(64, 48), fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A small generated image (a gradient plus noise, like a photo only in how it encodes);
    written to `path_or_none` when given. Returns its encoded bytes."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    base = np.linspace(0, 255, w)[None, :, None] * rng.random(3) + rng.normal(0, 20, (h, w, 3))
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    if path_or_none is not None:
        Path(path_or_none).write_bytes(buffer.getvalue())
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(command: list[str], port: int, env: dict | None = None, ready_path: str | None = None,
          timeout: float = 180):
    """Start a server process and wait until it is ready: its loopback `port` accepts connections
    and, with `ready_path`, a GET there answers. The bound holds on a busy 2-core machine (an
    MLflow server once took over 30 s to start under load); the wait ends at once if the process
    exits. Either way the failure carries the server's own log."""
    log = Path(tempfile.mkstemp(prefix="server-", suffix=".log")[1])
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            if ready_path:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{ready_path}", timeout=5).close()
            return process
        except OSError:  # refused, not answering yet, or an HTTP error status
            time.sleep(0.25)
    process.kill()
    process.wait()
    state = f"exited with {process.returncode}" if process.returncode not in (None, -9) else \
        f"not ready within {timeout:.0f} s"
    pytest.fail(f"{' '.join(command[:4])} ...: {state} on port {port}; its log:\n{log.read_text()[-4000:]}")


class SilentHost:
    """A loopback port whose connections the kernel accepts and nobody ever answers."""

    def __enter__(self) -> str:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def __exit__(self, *exc) -> None:
        self._listener.close()


def without_coverage() -> dict[str, str]:
    """This environment without coverage's hand-on to subprocesses: for a process the test kills,
    whose measurements die with it, so that it does not pay for them."""
    return {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}


def check_reduced_forms(model_dir, texts: list[str], images=None) -> None:
    """Each reduced form scores close to the model as trained, and not exactly as it."""
    import torch

    from cockatoo_lib.errors import CockatooError
    from cockatoo_lib.release.predict import Classifier

    classifier = Classifier(model_dir)
    full = classifier.predict_proba(texts, images)
    assert classifier.in_form("fp32") is classifier
    for form, bound in (("bf16", 0.02), ("int8", 0.05)):
        reduced = classifier.in_form(form)
        change = np.abs(reduced.predict_proba(texts, images) - full).max()
        assert reduced.form == form and 0 < change < bound, (form, change)
    assert classifier.form == "fp32" and classifier.model.dtype == torch.float32  # copies, not changed
    with pytest.raises(CockatooError, match="unknown model form 'fp16'; one of: fp32, bf16, int8"):
        classifier.in_form("fp16")
