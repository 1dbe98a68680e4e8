"""Fault injection for the tests (never imported by the package): slow or failing writes, and a torchrun entry point
whose chosen rank raises, stalls or reports its pid.

In-process (with pytest's ``monkeypatch``)::

    slow_fsync(monkeypatch, 0.05)        # every fsync takes 50 ms longer (widens crash windows)
    failing_fsync(monkeypatch, after=2)  # the third fsync and later raise ENOSPC (a full disk)

As a torchrun worker script (``python -m torch.distributed.run … tests/faults.py [fault…] -- <fusedsae args>``)::

    --raise-rank R --at-batch B   rank R raises RuntimeError("injected fault on rank R") at its B-th batch
    --stall-rank R --at-batch B   rank R sleeps for an hour at its B-th batch (a hung rank)
    --pid-dir DIR                 every rank writes DIR/rank-<r>.pid once it trains
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from pathlib import Path
from typing import Any


def slow_fsync(monkeypatch: Any, seconds: float) -> None:
    real = os.fsync

    def slow(fd: int) -> None:
        time.sleep(seconds)
        real(fd)

    monkeypatch.setattr(os, "fsync", slow)


def failing_fsync(monkeypatch: Any, after: int = 0) -> None:
    """fsync succeeds ``after`` times, then raises ``OSError(ENOSPC)`` (the data never reached the disk)."""
    real = os.fsync
    calls = {"n": 0}

    def failing(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        real(fd)

    monkeypatch.setattr(os, "fsync", failing)


def _worker(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--raise-rank", type=int, default=None)
    parser.add_argument("--stall-rank", type=int, default=None)
    parser.add_argument("--at-batch", type=int, default=3)
    parser.add_argument("--pid-dir", default=None)
    split = argv.index("--")
    faults, fusedsae_args = parser.parse_args(argv[:split]), argv[split + 1 :]
    rank = int(os.environ.get("RANK", "0"))

    from fusedsae.data import ToySource

    real_next = ToySource.next_batch

    def next_batch(self: ToySource) -> Any:
        if self.index == 0 and faults.pid_dir:
            Path(faults.pid_dir, f"rank-{rank}.pid").write_text(str(os.getpid()))
        if self.index == faults.at_batch:
            if faults.raise_rank == rank:
                raise RuntimeError(f"injected fault on rank {rank}")
            if faults.stall_rank == rank:
                time.sleep(3600)
        return real_next(self)

    ToySource.next_batch = next_batch  # type: ignore[method-assign]
    from fusedsae.__main__ import entry  # what `torchrun -m fusedsae` runs

    return entry(fusedsae_args)


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
