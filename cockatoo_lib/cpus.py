"""How many CPUs this process may use: in a pod, its CPU limit (the cgroup's quota), not the node's
core count, which is what os.cpu_count() and torch see."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def cgroup_quota() -> float | None:
    """CPUs the cgroup's quota allows (cgroup v2 cpu.max, or v1's cfs files); None without one."""
    root = CGROUP
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """The CPUs this process is pinned to, fewer where a quota allows less (rounded up: a limit
    of 1.5 CPUs keeps two threads busy part of the time)."""
    pinned = len(os.sched_getaffinity(0))
    quota = cgroup_quota()
    return pinned if quota is None else max(1, min(pinned, math.ceil(quota)))


def size_torch_threads() -> int:
    """torch's intra-op pool to the CPUs this process may use (torch sizes it from the node's
    cores: in a pod limited to 2 of 64, 64 threads would be throttled); the count set."""
    import torch

    threads = available_cpus()
    torch.set_num_threads(threads)
    return threads
