"""Which cores each serving worker runs on (arXiv 2406.07553: one worker per NUMA node, each pinned).

A worker's intra-op thread pool lives on its own cores, so N workers never time-share a core and
each keeps its caches warm. Cores are handed out node by node (Linux's /sys/devices/system/node),
so a worker's share stays within one NUMA node where the shares allow; on a machine without NUMA
(one node) they are simply consecutive cores.
"""

from __future__ import annotations

import os
from pathlib import Path

from accelc.errors import UsageError

NODES = Path("/sys/devices/system/node")


def parse_cpulist(text: str) -> list[int]:
    """Linux's cpulist format: "0-3,8,10-11" -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus: list[int] = []
    for part in filter(None, text.strip().split(",")):
        first, _, last = part.partition("-")
        cpus += range(int(first), int(last or first) + 1)
    return cpus


def numa_nodes() -> list[list[int]]:
    """The CPUs of each NUMA node, in node order; one node of every CPU where sysfs says nothing."""
    nodes = []
    for path in sorted(NODES.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        try:
            nodes.append(parse_cpulist((path / "cpulist").read_text()))
        except (OSError, ValueError):
            continue
    return [n for n in nodes if n] or [sorted(os.sched_getaffinity(0))]


def core_sets(workers: int, threads: int | None = None) -> list[list[int]]:
    """`workers` disjoint sets of `threads` cores (default: an equal share of this process's cores)."""
    allowed = os.sched_getaffinity(0)
    ordered = [cpu for node in numa_nodes() for cpu in node if cpu in allowed]
    ordered += sorted(allowed - set(ordered))
    if workers < 1:
        raise UsageError(f"--workers {workers} is below its minimum 1")
    threads = threads if threads is not None else max(len(ordered) // workers, 1)
    if threads < 1:
        raise UsageError(f"--threads {threads} is below its minimum 1")
    if workers * threads > len(ordered):
        raise UsageError(
            f"--workers {workers} with {threads} threads each needs {workers * threads} cores; this process "
            f"may run on {len(ordered)} ({','.join(map(str, ordered))}): lower --workers or --threads"
        )
    return [ordered[i * threads : (i + 1) * threads] for i in range(workers)]


def pin(cores: list[int]) -> None:
    """Pin this process (and the threads it starts from now on: ORT's pool inherits it) to `cores`."""
    os.sched_setaffinity(0, cores)
    os.environ["OMP_NUM_THREADS"] = str(len(cores))
