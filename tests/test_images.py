"""What the images promise, checked without a container engine: the pins, torch's build, and
the install script's quick failure. `make test-images` runs the built images
(tests/test_images_run.py)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import error_line, run_cli

from cockatoo_lib import versions

ROOT = Path(__file__).parents[1]
DOCKERFILE = (ROOT / "images" / "Dockerfile").read_text()


def _stage(target: str) -> str:
    return re.search(rf"^FROM \S+ AS {target}$(.*?)(?=^FROM |\Z)", DOCKERFILE, re.M | re.S).group(1)


def test_this_environment_has_exactly_the_pinned_versions():
    pins = versions.pinned()
    assert {"torch", "transformers", "bitsandbytes", "kfp", "kfp-kubernetes", "docker"} <= set(pins)
    assert versions.mismatches() == []


def test_a_drifted_version_is_reported(monkeypatch):
    real = versions.metadata.version
    monkeypatch.setattr(versions.metadata, "version",
                        lambda name: "0.0.1" if name == "transformers" else real(name))
    assert versions.mismatches() == ["transformers: pinned ==5.23.0, installed 0.0.1"]


def test_pins_with_extras_are_checked_and_local_versions_match(monkeypatch):
    pins = versions.pinned()
    assert "moto" in pins  # pinned as moto[server]==5.2.5 in the dev extra
    real = versions.metadata.version
    fake = {"torch": "2.13.0+cpu", "moto": "0.0.1"}
    monkeypatch.setattr(versions.metadata, "version", lambda name: fake.get(name) or real(name))
    assert versions.mismatches() == ["moto: pinned ==5.2.5, installed 0.0.1"]
    fake["torch"] = "2.13.1+cpu"
    assert "torch: pinned ==2.13.0, installed 2.13.1+cpu" in versions.mismatches()


@pytest.mark.parametrize(("declared", "torch_cuda", "problem"), [
    ("cpu", None, None),
    ("cuda13", "13.0", None),
    ("cpu", "13.0", "declares COCKATOO_TORCH_BUILD=cpu, but its torch has CUDA 13.0"),
    ("cuda13", "12.8", "declares COCKATOO_TORCH_BUILD=cuda13, but its torch has CUDA 12.8"),
    ("cuda13", None, "declares COCKATOO_TORCH_BUILD=cuda13, but its torch has no CUDA (the CPU build)"),
    ("cuda", "13.0", "is neither 'cpu' nor 'cuda' and a CUDA major"),
])
def test_torch_must_be_the_build_the_image_declares(declared, torch_cuda, problem):
    found = versions.torch_build_problem(declared, torch_cuda)
    assert (found is None) if problem is None else (problem in found)


@pytest.mark.parametrize(("declared", "code"), [("cpu", 0), ("cuda13", 1)])
def test_the_versions_check_fails_when_torch_is_not_the_declared_build(declared, code):
    check = subprocess.run([sys.executable, "-m", "cockatoo_lib.versions"], capture_output=True, text=True,
                           env={**os.environ, versions.TORCH_BUILD_ENV: declared})
    assert check.returncode == code, check.stderr  # this machine's torch is the CPU build
    if code:
        assert check.stderr.strip() == ("error: torch: this image declares COCKATOO_TORCH_BUILD=cuda13, "
                                        "but its torch has no CUDA (the CPU build)")


@pytest.mark.parametrize(("target", "build", "index_arg"), [("cpu", "cpu", "TORCH_INDEX_URL"),
                                                             ("cuda", "cuda13", "TORCH_CUDA_INDEX_URL")])
def test_each_image_declares_its_torch_build_and_installs_through_the_script(target, build, index_arg):
    stage = _stage(target)
    assert f"ENV COCKATOO_TORCH_BUILD={build}" in stage
    assert f'RUN sh /tmp/dist/install.sh "${{{index_arg}}}"' in stage
    assert re.search(r"^USER 1000$", stage, re.M)  # not root
    # No second list of versions: the builder reads torch's pin from pyproject.toml.
    assert not re.search(r"pip install[^\n]*==", DOCKERFILE + (ROOT / "images" / "install.sh").read_text())


def test_an_unreachable_torch_index_fails_the_install_script_with_one_line(tmp_path):
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "torch-requirement.txt").write_text("torch==2.13.0\n")
    script = (ROOT / "images" / "install.sh").read_text().replace("/tmp/dist", str(dist))
    # pip as in an image: no settings of this machine's (its wheel folder holds torch), and an
    # empty folder to install into (this environment has torch already).
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PIP_")}, "PIP_CONFIG_FILE": os.devnull,
           "PIP_TARGET": str(tmp_path / "site"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run([shutil.which("sh"), "-c", script, "install.sh", "http://127.0.0.1:9/simple/"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == "images: cannot install torch==2.13.0 from http://127.0.0.1:9/simple/"


def test_a_run_in_containers_without_an_engine_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    code, _, err = run_cli(["run", "-m", "minilm", "--in-image", "cockatoo-cpu:0.1.0", "--output-root",
                            tmp_path / "runs"], capsys, monkeypatch)
    assert code != 0
    assert error_line(err).startswith("error: no container engine answers (docker: ")
    assert not (tmp_path / "runs").exists()


def test_the_lock_holds_every_pin_of_pyproject_and_this_environment_matches_it():
    """requirements.lock is derived from pyproject.toml (`make lock`): a pin changed without it
    fails here, before an image build or `make install` refuses the constraint."""
    lock = versions.read_lock((ROOT / "requirements.lock").read_text())
    assert {name: spec for name, spec in versions.pinned().items()
            if not spec.contains(lock.get(versions.canonicalize_name(name), "0"), prereleases=True)} == {}
    assert versions.unlocked(lock) == []
    assert "--constraint /tmp/dist/requirements.lock" in (ROOT / "images" / "install.sh").read_text()
    assert "--lock /tmp/dist/requirements.lock" in (ROOT / "images" / "install.sh").read_text()


def test_a_package_outside_the_lock_or_at_another_version_is_reported(monkeypatch, capsys, tmp_path):
    lock = versions.read_lock((ROOT / "requirements.lock").read_text())
    lock["numpy"] = "1.0.0"
    del lock["pyarrow"]
    assert versions.unlocked(lock) == ["numpy: locked ==1.0.0, installed 2.4.6",
                                       "pyarrow 25.0.1: installed, but not in the lock"]
    # torch's CUDA build brings what it pins exactly itself (nvidia-*, triton): allowed, at that version.
    monkeypatch.setattr(versions, "torch_exact_pins", lambda: {"pyarrow": "25.0.1", "numpy": "2.4.6"})
    assert versions.unlocked(lock) == ["numpy: locked ==1.0.0, installed 2.4.6"]
    written = tmp_path / "lock.txt"
    written.write_text("".join(f"{n}=={v}\n" for n, v in lock.items()))
    assert versions.main(["--lock", str(written)]) == 1
    assert "error: numpy: locked ==1.0.0, installed 2.4.6" in capsys.readouterr().err


def test_the_lock_is_written_from_pips_report_without_local_versions_or_the_project():
    report = {"install": [{"metadata": {"name": "Torch", "version": "2.13.0+cpu"}},
                          {"metadata": {"name": "cockatoo-pipelines", "version": "0.1.0"}},
                          {"metadata": {"name": "PyYAML", "version": "6.0.3"}}]}
    text = versions.write_lock(report)
    assert text.startswith("# Every package") and text.endswith("pyyaml==6.0.3\ntorch==2.13.0\n")
    assert versions.read_lock(text) == {"pyyaml": "6.0.3", "torch": "2.13.0"}


def test_pushed_images_start_from_a_base_named_by_digest():
    def make(*args):
        return subprocess.run(["make", "-s", "-C", str(ROOT), *args], capture_output=True, text=True)

    refused = make("base-by-digest", "PYTHON_IMAGE=python:3.11-slim-bookworm")
    assert refused.returncode != 0 and "push-images: name the base by digest" in refused.stderr
    assert make("base-by-digest", "PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:" + "0" * 64).returncode == 0
    planned = make("-n", "push-images", "PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:" + "0" * 64).stdout
    builds = [line for line in planned.splitlines() if line.startswith("docker build")]
    assert len(builds) == 2 and all("--build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:" in b
                                    for b in builds)
    assert "push-images: base-by-digest images" in (ROOT / "Makefile").read_text()
