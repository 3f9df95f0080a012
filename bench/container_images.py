"""B10: the images' sizes and what fills them (`make bench-images`, after building them).

For each image: its size as the engine reports it, its base image's, and, measured inside it,
the installed packages, torch, the CUDA libraries of the nvidia-* wheels, and the bytecode.
Writes the B10 section of docs/benchmarks.md and nothing else.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from bench.harness import RESULTS, ROOT, replace_section

# Bytes under each place, measured inside the image (no network, any uid).
MEASURE = r"""
import json, os, sysconfig
site = sysconfig.get_path("purelib")
def size(top, only=lambda name: True):
    total = 0
    for folder, _, files in os.walk(top):
        total += sum(os.lstat(os.path.join(folder, f)).st_size for f in files if only(f))
    return total
print(json.dumps({"site_packages": size(site), "torch": size(os.path.join(site, "torch")),
                  "triton": size(os.path.join(site, "triton")),
                  "cuda_libraries": size(os.path.join(site, "nvidia")),
                  "bytecode": size(site, lambda f: f.endswith(".pyc")),
                  "torch_build": os.environ.get("COCKATOO_TORCH_BUILD")}))
"""


def _docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True).stdout.strip()


def _size(image: str) -> int:
    return int(_docker("image", "inspect", "-f", "{{.Size}}", image))


def measure(image: str) -> dict:
    inside = json.loads(_docker("run", "--rm", "--network", "none", "--user", "54321", image,
                                "python", "-c", MEASURE).splitlines()[-1])
    return {"image": image, "size": _size(image), **inside}


def measure_base(base: str) -> dict:
    """The base both images start from; `stand_in` names a local stand-in's label (else None)."""
    stand_in = _docker("image", "inspect", "-f", '{{index .Config.Labels "stand-in"}}', base)
    return {"name": base, "size": _size(base),
            "stand_in": stand_in if stand_in not in ("", "<no value>") else None}


def section(images: dict[str, dict], base: dict, date: str) -> list[str]:
    def gb(n: int) -> str:
        return f"{n / 1e9:.2f} GB"

    rows = [f"| {kind} | {m['torch_build']} | **{gb(m['size'])}** | {gb(base['size'])} | "
            f"{gb(m['site_packages'])} | {gb(m['torch'])} | {gb(m['triton'])} | {gb(m['cuda_libraries'])} | "
            f"{gb(m['bytecode'])} |" for kind, m in images.items()]
    cuda = images["cuda"]
    measured = (f"a local stand-in for it (label stand-in={base['stand_in']}: Debian's Python; the "
                "official image's size differs)" if base["stand_in"] else "it")
    return [
        "## B10: images",
        "",
        f"`make bench-images` (bench/container_images.py) after `make images`, {date}; sizes as the "
        f"engine reports them (uncompressed), the rest measured inside each image. Both images start "
        f"from `{base['name']}`; the base measured here was {measured}.",
        "",
        "| image | torch | size | base | installed packages | of which torch | triton "
        "| CUDA libraries (nvidia-*) | bytecode |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"The CUDA image's {gb(cuda['cuda_libraries'])} of CUDA libraries come with torch's wheels (the "
        "nvidia-* packages), which torch loads in preference to any system copy. A CUDA base image "
        "(`nvidia/cuda:*-cudnn-runtime`) would add its own copy of the same libraries, gigabytes that "
        "nothing loads, on top of these, so both images use the slim Python base. Both drop what no step "
        "loads: the packages' test suites, torch's C++ test programs, and bitsandbytes' kernels for other "
        "builds than the image's torch (images/install.sh).",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description="B10: image sizes")
    parser.add_argument("--cpu", required=True, help="the CPU image, built")
    parser.add_argument("--cuda", required=True, help="the CUDA image, built")
    parser.add_argument("--base", default="python:3.11-slim-bookworm", help="the base both start from")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    images, base = {"cpu": measure(args.cpu), "cuda": measure(args.cuda)}, measure_base(args.base)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "b10.json").write_text(json.dumps({"images": images, "base": base}, indent=2))
    replace_section(args.output, "b10", section(images, base, time.strftime("%Y-%m-%d")))
    sizes = ", ".join(f"{kind} {m['size'] / 1e9:.2f} GB" for kind, m in images.items())
    print(f"wrote B10 into {args.output}: {sizes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
