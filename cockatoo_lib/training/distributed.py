"""Data-parallel training in one machine or pod: torchrun (torch.distributed.run) starts one
process per GPU (on CPU, `--processes N`, with the gloo backend), each running the same
`cockatoo train`; the Trainer wraps the model in DistributedDataParallel. Every process reads
the tokenized data; process 0 alone writes the model, thresholds and metrics.

On several nodes Kubeflow Trainer's torch-distributed runtime sets the same environment that
torchrun does, so the same command runs there unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
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


def own_card():
    """This process's GPU: the LOCAL_RANK-th of the machine's (torchrun starts one process per
    GPU), made the current device before anything allocates on it."""
    import torch

    from cockatoo_lib.errors import CockatooError

    index, count = local_rank(), torch.cuda.device_count()
    if index >= count:
        raise CockatooError(f"process {index} on this machine has no GPU of its own: {count} GPU(s) here; "
                            "start one process per GPU")
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    return device


def agree_on_smallest(value: int) -> int:
    """The smallest `value` over every process of the training (the value itself when alone).
    Joins the process group the Trainer will use, ahead of it (accelerate takes it as it is)."""
    if world_size() == 1:
        return value
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    found = torch.tensor([value], device=torch.device("cuda", local_rank()) if cuda else "cpu")
    dist.all_reduce(found, op=dist.ReduceOp.MIN)
    return int(found.item())


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def settle_micro_batch(plan, fits: Callable[[int], bool]):
    """The largest divisor of each process's rows per step, up to the plan's micro-batch, that
    `fits` this process's card; then the smallest of those over every process, so that all of
    them train one split (a process that steps down alone would take other batches, or hang).
    `plan` is the run's (cockatoo_lib.plan.catalogue.Plan, which imports this module); so is the
    plan returned."""
    from cockatoo_lib.plan.batch_split import Split, probe

    per_process = plan.batch_size * plan.gradient_accumulation_steps
    checked = probe(Split(plan.batch_size, plan.gradient_accumulation_steps, plan.gradient_checkpointing, 0.0,
                          "the plan's split"), per_process, fits)
    micro = agree_on_smallest(checked.micro_batch)
    if micro == plan.batch_size:
        return plan
    where = "this card" if micro == checked.micro_batch else "the smallest card of the training's processes"
    note = (f"micro-batch {micro} x {per_process // micro}: {where} held {micro} rows at full width, "
            f"not {plan.batch_size}")
    log.warning(note)
    return plan.model_copy(update={"batch_size": micro, "gradient_accumulation_steps": per_process // micro,
                                   "adjustments": plan.adjustments + (note,)})


def launch(processes: int, argv: list[str]) -> int:
    """Run `cockatoo <argv>` in `processes` processes with torchrun on this machine; returns
    the exit code (the failing process prints its own error line)."""
    with tempfile.TemporaryDirectory(prefix="cockatoo-ddp-") as work:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={processes}", "-m", "cockatoo_lib.cli", *argv]
        log.info("starting %d training processes: %s", processes, " ".join(command))
        return subprocess.call(command, env={**os.environ, WORK_ENV: work})


@contextlib.contextmanager
def node_copy(uri: str, name: str, wait_s: float = 3600.0) -> Iterator[Path]:
    """A local copy of the folder at `uri`, made once per node (by its local process 0) in the
    folder this node's processes share, while the block runs; the others wait for it to appear
    whole."""
    from cockatoo_lib.storage import remote
    from cockatoo_lib.storage.publish import fetch

    base = shared_work_dir() if launched() else Path(tempfile.mkdtemp(prefix="cockatoo-"))
    dest, partial = base / name, base / f"{name}.partial"
    if local_rank() == 0:
        fs, _ = remote.url_to_fs(uri)
        for stale in (dest, partial):  # a process of an earlier try in this pod
            shutil.rmtree(stale, ignore_errors=True)
        fetch(fs, uri, partial).rename(dest)  # whole, in one step
        log.info("copied %s to %s", uri, dest)
    deadline = time.monotonic() + wait_s
    while not dest.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{uri} was not copied to {dest} within {wait_s:.0f} s")
        time.sleep(1)
    try:
        yield dest
    finally:
        if local_rank() == 0:
            shutil.rmtree(dest if launched() else base, ignore_errors=True)
