"""How many intra-op threads a step of the pipeline runs on: the cores no other work holds when it starts.

torch's CPU build runs its operators on libgomp, whose waiting threads spin. On a small machine that another process
also uses, a thread that finished first spins on the core its partner needs, and every operator waits for the
scheduler: with one of two cores busy the LM trained 4.1x slower on two threads than on one, generation 6.3x,
pretokenizing 3.6x; on the idle machine two threads were the fastest (docs/BENCHMARKS.md, "On a machine another
process also uses"). No one OpenMP setting is right for both, so each heavy step counts the cores busy as it starts
and takes the others.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with ``n`` intra-op threads (None: unchanged) and restore the previous count after.

    A step that picks its own thread count for a shared CPU must give the caller's back: without that, everything
    later in the same process (``omnitok demo`` evaluates after training) would silently run on that count too.
    """
    prev = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _cpu_times() -> tuple[float, float] | None:
    """(idle, total) jiffies of all cores from /proc/stat; None where there is no such file."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields)


def busy_cores(window_s: float = 0.3) -> float:
    """How many cores other work keeps busy now: CPU time sampled over ``window_s``, else the load average.

    Why not the load average alone: it is a one-minute mean, so right after a step of the same pipeline has used
    every core (the demo's world build, then its image tokenizer) it still reads "all busy" on an idle machine.
    """
    cores = os.cpu_count() or 1
    before = _cpu_times()
    if before is not None:
        time.sleep(window_s)
        after = _cpu_times()
        if after is not None and after[1] > before[1]:
            return cores * (1.0 - (after[0] - before[0]) / (after[1] - before[1]))
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def auto_threads() -> int:
    """Intra-op threads that leave busy cores alone: the cores not busy now, at least one, at most torch's count.

    torch's count is the ceiling, so ``OMP_NUM_THREADS`` (or an earlier ``torch.set_num_threads``) still caps it.
    """
    cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores - int(busy_cores() + 0.5)))


@contextmanager
def free_cores() -> Iterator[int]:
    """Run a block on :func:`auto_threads` threads (the cores free as it starts); restore the count after.

    Where the heavy commands (``omnitok train``, ``pretokenize``, ``eval``, ``generate``) and the demo's steps
    start. On an idle machine it changes nothing; it costs the 0.3 s the CPU times are sampled over.
    """
    n = auto_threads()
    with torch_threads(n):
        yield n


__all__ = ["auto_threads", "busy_cores", "free_cores", "torch_threads"]
