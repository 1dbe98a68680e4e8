"""Running under ``torchrun``: every failure reported with the failing rank's own error, no orphaned workers, and no
collective that waits forever.

* :func:`record_errors` wraps the entry point like ``torch.distributed.elastic``'s ``@record``: a rank that fails
  writes its error (message and traceback) to the error file torchrun gives it, and the agent prints that as the
  root cause, instead of only the other ranks' "Connection closed by peer". Unlike ``@record`` it also records a
  ``SystemExit`` with a message (how the CLI reports a user's mistake in one line).
* :func:`start_parent_watchdog`: a worker whose agent dies (killed, or its node lost) exits within about a second
  instead of training on and writing files nobody supervises.
* :func:`process_group_timeout`: ``init_process_group``'s timeout (``FUSEDSAE_DIST_TIMEOUT`` seconds, default
  600): a rank stalled in a collective fails with gloo/NCCL's timeout error instead of hanging the job forever.
"""

from __future__ import annotations

import datetime
import functools
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

DEFAULT_TIMEOUT_S = 600.0


def under_torchrun() -> bool:
    """True in a worker started by torchrun / torch.distributed.run (its agent sets TORCHELASTIC_RUN_ID)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def process_group_timeout() -> datetime.timedelta:
    """The timeout for ``init_process_group`` and every collective (``FUSEDSAE_DIST_TIMEOUT`` seconds)."""
    raw = os.environ.get("FUSEDSAE_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"FUSEDSAE_DIST_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if seconds <= 0:
        raise ValueError(f"FUSEDSAE_DIST_TIMEOUT must be > 0 seconds, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


def record_errors(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps ``main`` so that, under torchrun, an exception or a ``SystemExit`` with a message is written to this
    worker's error file (``TORCHELASTIC_ERROR_FILE``) before it propagates. Outside torchrun it changes nothing."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not under_torchrun():
            return main(*args, **kwargs)
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        handler = get_error_handler()
        handler.initialize()
        rank = os.environ.get("RANK", "?")
        try:
            return main(*args, **kwargs)
        except SystemExit as exc:
            if exc.code not in (None, 0):
                message = exc.code if isinstance(exc.code, str) else f"exit code {exc.code}"
                handler.record_exception(RuntimeError(f"rank {rank}: {message}"))
            raise
        except Exception as exc:
            handler.record_exception(exc)
            raise

    return wrapper


def start_parent_watchdog(interval_s: float = 1.0) -> threading.Thread | None:
    """Under torchrun, starts a daemon thread that ends this worker (exit code 1, one line on stderr) once its
    parent, the torchrun agent, is gone: the worker is then re-parented, so ``os.getppid()`` changes. Polling
    rather than ``prctl(PR_SET_PDEATHSIG)``: that fires when the parent *thread* that forked us exits, and works
    only on Linux. Returns the thread (None outside torchrun)."""
    if not under_torchrun():
        return None
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                rank = os.environ.get("RANK", "?")
                print(
                    f"fusedsae: rank {rank}: the torchrun agent (pid {parent}) is gone; stopping this worker",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)  # no cleanup to wait for: nobody supervises this process any more

    thread = threading.Thread(target=watch, name="fusedsae-parent-watchdog", daemon=True)
    thread.start()
    return thread
