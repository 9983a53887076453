"""CPU placement for inference next to the pipeline's other threads (no torch import here).

On a CPU backend, inference competes for cores with reading, preprocessing, overlay and writers. The
automatic policy gives inference all cores but :func:`reserved_cores` and, on Linux, pins its thread
to those cores and the other stage threads to the rest, so a writer never preempts an inference thread
in the middle of a parallel kernel (see :func:`affinity_plan`).
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def reserved_cores(cores: int) -> int:
    """Cores the automatic policy keeps for the stages beside inference: a quarter, at least one."""
    return max(1, cores // 4)


def affinity_plan(device: str, threads: int) -> dict[str, set[int]] | None:
    """CPU sets for the pipeline's threads when inference runs on the CPU: ``inference`` gets the last
    ``threads`` usable cores (at most all but one), ``others`` the rest. None where it does not apply
    (not Linux, a GPU backend, a single usable core)."""
    if device != "cpu" or not hasattr(os, "sched_setaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None
    wanted = threads if threads > 0 else len(cores) - reserved_cores(len(cores))
    count = min(max(1, wanted), len(cores) - 1)
    return {"inference": set(cores[-count:]), "others": set(cores[:-count])}
