"""Deliberate process kills at named points, for the reliability tests (off unless asked for).

    FASTSP_KILL_AT=step:5                 SIGKILL this process after step 5's update
    FASTSP_KILL_AT=checkpoint:ema.safetensors   ... while writing a checkpoint, after that file
    FASTSP_KILL_AT=prune:step_00000002    ... while pruning: renamed out of sight, not yet removed
    FASTSP_KILL_RANK=1                    only on rank 1 (default: every rank)
    FASTSP_KILL_ATTEMPT=0                 only on torchrun's attempt 0 (TORCHELASTIC_RESTART_COUNT)

A real SIGKILL, not an exception: nothing after the point runs, no `finally`, no flush, exactly
as when the machine or the scheduler kills a job. The points are listed where `kill_point` is
called (fastsp/training/loop.py, fastsp/checkpoint.py).
"""

import os
import signal


def kill_point(name: str) -> None:
    """SIGKILL the process if FASTSP_KILL_AT names this point (and rank and attempt match)."""
    target = os.environ.get("FASTSP_KILL_AT")
    if target is None or target != name:
        return
    rank = os.environ.get("FASTSP_KILL_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    attempt = os.environ.get("FASTSP_KILL_ATTEMPT")
    if attempt is not None and attempt != os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"):
        return
    os.kill(os.getpid(), signal.SIGKILL)
