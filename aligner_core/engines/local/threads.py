"""How many CPU threads the local engine gives torch.

torch starts one intra-op thread per core it sees on the machine, which on a shared or containerised
host is often more than this process may use (CPU affinity, a cgroup quota) and more than the physical
cores (hyper-threads add little to matrix multiplies). Oversubscribed threads spin and wait: a 2-core
job measured 79 s of CPU for the demo with the default and 23 s with one thread while other jobs ran.

The knob: ``ALIGNER_CPU_THREADS=N`` (or the usual ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``, or your own
``torch.set_num_threads``, which is left alone when it is already lower).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger("aligner_core")

#: The environment variable that sets the local engine's CPU threads.
ENV = "ALIGNER_CPU_THREADS"
_configured = False


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2/v1 CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        count = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(count, quota) if quota else count)


def _cgroup_quota() -> int | None:
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return max(1, int(int(text[0]) / int(text[1])))
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return max(1, quota // period)
    except (OSError, ValueError):
        pass
    return None


def physical_cores() -> int | None:
    """Physical cores on the machine (Linux ``/proc/cpuinfo``), or None when it cannot tell."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores, physical = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            cores.add((physical, value.strip()))
    return len(cores) or None


def default_threads() -> int:
    """The physical cores this process may use (never more than the CPUs it may run on)."""
    usable = usable_cpus()
    cores = physical_cores()
    return max(1, min(usable, cores) if cores else usable)


def configure_cpu_threads() -> int:
    """Give torch a sensible thread count once per process; returns the count in use.

    ``ALIGNER_CPU_THREADS`` wins; with ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` set, torch already honours
    them and nothing changes; otherwise torch's count is lowered to :func:`default_threads` (never raised).
    """
    global _configured
    import torch

    if _configured:
        return torch.get_num_threads()
    _configured = True
    wanted = os.environ.get(ENV)
    if wanted:
        try:
            threads = max(1, int(wanted))
        except ValueError:
            logger.warning("%s=%r is not a whole number: ignored", ENV, wanted)
        else:
            torch.set_num_threads(threads)
            return threads
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        return torch.get_num_threads()
    best = default_threads()
    if torch.get_num_threads() > best:
        logger.info(
            "using %d CPU threads (torch saw %d; set %s to choose)", best, torch.get_num_threads(), ENV
        )
        torch.set_num_threads(best)
    return torch.get_num_threads()
