import re
from pathlib import Path

import pytest

from cockatoo_lib import versions

ROOT = Path(__file__).parents[1]
DOCKERFILES = {kind: (ROOT / "images" / kind / "Dockerfile").read_text() for kind in ("cpu", "cuda")}


def test_this_environment_has_exactly_the_pinned_versions():
    pins = versions.pinned()
    assert {"torch", "transformers", "bitsandbytes", "kfp", "kfp-kubernetes"} <= set(pins)
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


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_images_install_the_project_pins_and_check_them(kind):
    text = DOCKERFILES[kind].replace("\\\n", " ")  # join continued lines
    install = re.search(r"^RUN (pip install .*)$", text, re.M).group(1)
    assert re.search(r'pip install .*"?\.(\[demo\])?"?( |$)', install)  # the project itself
    assert "==" not in install  # no second list of versions
    assert "python -m cockatoo_lib.versions" in install
    assert "COPY pyproject.toml" in text
    assert re.search(r"^USER 1000$", text, re.M)  # not root


def test_cuda_image_is_a_cuda_12_runtime():
    assert re.search(r"^FROM nvidia/cuda:12\.[0-9.]+-[a-z-]*runtime", DOCKERFILES["cuda"], re.M)
