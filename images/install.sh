#!/bin/sh
# Installs torch from the index given (its pin read from pyproject.toml by the builder stage),
# then the project's wheel with every other dependency from PyPI at its version in
# requirements.lock, trims what no step loads, then checks the pins, the lock and torch's build
# (COCKATOO_TORCH_BUILD).
# Usage: install.sh TORCH_INDEX_URL
set -eu
index=$1
torch=$(cat /tmp/dist/torch-requirement.txt)
# One try of at most 20 s per request: an index that cannot be reached fails the build within a
# minute (pip's defaults retry for ~23 minutes, then take PyPI's build of another CUDA).
pip install --no-deps --retries 1 --timeout 20 --index-url "$index" "$torch" \
  || { echo "images: cannot install $torch from $index" >&2; exit 1; }
pip install --constraint /tmp/dist/requirements.lock "$(echo /tmp/dist/cockatoo_pipelines-*.whl)[demo]"

# What no step loads (sizes in docs/benchmarks.md, B8): the packages' test suites, torch's C++
# test programs, and bitsandbytes' kernels for other builds than this torch's.
site=$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
find "$site" -type d -name tests -prune -exec rm -rf {} +
rm -rf "$site/torch/test" "$site"/torch/bin/test_* "$site"/torch/bin/*Test
keep=$(python -c 'import torch; print("cuda" + torch.version.cuda.replace(".", "") if torch.version.cuda else "cpu")')
find "$site/bitsandbytes" -maxdepth 1 -name 'libbitsandbytes_*.so' ! -name "libbitsandbytes_cpu.so" \
  ! -name "libbitsandbytes_$keep.so" -delete
# torch's C++ headers (62 MB) serve builds against torch (extensions, torch.compile's C++ code):
# the CPU image has no compiler to run them, and stays under 2 GB without them.
if [ "$keep" = cpu ]; then rm -rf "$site/torch/include"; fi

python -m cockatoo_lib.versions --lock /tmp/dist/requirements.lock
rm -rf /tmp/dist
