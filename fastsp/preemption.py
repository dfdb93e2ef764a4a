"""SIGTERM and SIGINT: a request to stop, answered at the trainer's next safe point (stdlib only).

The entry points (fastsp/train.py, fastsp/pipeline.py) install the handlers first thing, before
torch is imported, so that a signal at any moment has one documented outcome:
- before training starts (imports, data, models, checkpoint reads): the command stops before
  writing anything, exit 75 (`fastsp.errors.Preempted`; rerun the same command);
- during training: the step in flight finishes, a checkpoint is written, exit 75 (rerun with
  --resume);
- a second signal: the default action, at once (the process dies of it, no traceback).
DataLoader workers ignore both (`ignore_in_worker`): a scheduler signals the whole process group,
and a worker that died of it would take the trainer down before it could checkpoint.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    """Whether a stop was asked for, and by which signal."""

    def __init__(self):
        self.requested = False
        self.name = ""

    def _handle(self, signum, frame):
        if self.requested:  # the second signal: stop waiting, die of it
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.requested = True
        self.name = signal.Signals(signum).name


_installed: StopSignal | None = None
_previous: dict[int, object] = {}


def installed() -> bool:
    return _installed is not None


def install() -> StopSignal:
    """The process's stop request; the first call installs the handlers. Handlers can only be
    installed from the main thread; elsewhere signals keep their defaults (and the request never
    comes)."""
    global _installed
    if _installed is None:
        _installed = StopSignal()
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                _previous[sig] = signal.signal(sig, _installed._handle)
    return _installed


def uninstall() -> None:
    """Put back the handlers `install` replaced (for callers of the Python API)."""
    global _installed
    for sig, handler in _previous.items():
        signal.signal(sig, handler)
    _previous.clear()
    _installed = None


def ignore_in_worker() -> None:
    """In a DataLoader worker: leave SIGTERM and SIGINT to the trainer. torch's worker handler
    re-raises a SIGTERM that its parent did not send, so a signal to the process group killed the
    workers first and the trainer then failed on 'worker killed by signal'. A worker still ends
    when the trainer shuts the loader down, or exits (torch's watchdog on the parent pid)."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
