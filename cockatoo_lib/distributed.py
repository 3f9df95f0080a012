"""Data-parallel training in one machine or pod: torchrun (torch.distributed.run) starts one
process per GPU (on CPU, `--processes N`, with the gloo backend), each running the same
`cockatoo train`; the Trainer wraps the model in DistributedDataParallel. Every process reads
the tokenized data; process 0 alone writes the model, thresholds and metrics.

On several nodes Kubeflow Trainer's torch-distributed runtime sets the same environment that
torchrun does, so the same command runs there unchanged.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# A folder every process of one training shares (Trainer checkpoints), set by `launch`.
WORK_ENV = "COCKATOO_TRAIN_WORK"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched() -> bool:
    """Inside a process that torchrun (or Kubeflow Trainer) started."""
    return "LOCAL_RANK" in os.environ


def shared_work_dir() -> Path:
    """The folder this training's processes on this node share. torchrun gives all of them
    one run id; outside torchrun, the launcher's folder."""
    if WORK_ENV in os.environ:
        return Path(os.environ[WORK_ENV])
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return Path(tempfile.gettempdir()) / f"cockatoo-train-{run_id}"


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def launch(processes: int, argv: list[str]) -> int:
    """Run `cockatoo <argv>` in `processes` processes with torchrun on this machine; returns
    the exit code (the failing process prints its own error line)."""
    with tempfile.TemporaryDirectory(prefix="cockatoo-ddp-") as work:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={processes}", "-m", "cockatoo_lib.cli", *argv]
        log.info("starting %d training processes: %s", processes, " ".join(command))
        return subprocess.call(command, env={**os.environ, WORK_ENV: work})
