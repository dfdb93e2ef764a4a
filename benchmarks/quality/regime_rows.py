"""The regime map's row files (benchmarks/quality/regime_map.py): each result a JSON of its own,
written atomically and read back when done; a row claimed by one of the --jobs workers with the
kernel lock of a claim file beside it; and the map's own results folder."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from fastsp import checkpoint as checkpoint_lib
from fastsp.run_folder import RunLock


def write_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint_lib.atomic_write_text(path, json.dumps(row, indent=2) + "\n")


def read_row(path: Path) -> dict | None:
    """The row's contents, or None when it is not done (missing, or unreadable: done again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _lock_of(path: Path) -> Path:
    return path.with_name(path.name + ".claim")


# row -> "pid N" of the worker holding it, for rows this pass needed and could not take
waiting_for: dict[Path, str] = {}


def claim(path: Path) -> RunLock | None:
    """Take the row at `path` for this worker: the kernel lock of its claim file (the trainer's
    RunLock), which goes with its worker however it ends, on whatever host; None while another
    worker holds it (recorded in `waiting_for`)."""
    lock_path = _lock_of(path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock, holder = RunLock.try_acquire(lock_path)
    if lock is None:
        waiting_for[path] = holder
    return lock


def obtain(path: Path, compute) -> dict | None:
    """The row at `path`: read back if done, else computed and written if this worker can claim
    it (a dead worker's claim is free); None while another worker computes it."""
    done = read_row(path)
    if done is not None and not Path(done.get("checkpoint", ".")).exists():
        print(f"{path} names {done['checkpoint']}, which is gone: computing the row again")
        done = None
    if done is not None:
        return done
    lock = claim(path)
    if lock is None:
        return None
    try:
        done = read_row(path)  # written between the first read and the claim
        if done is None or not Path(done.get("checkpoint", ".")).exists():
            done = compute()
            write_row(path, done)
        return done
    finally:
        lock.path.unlink(missing_ok=True)  # before the release: a waiter locks a new file
        lock.release()


def results_folder(args: argparse.Namespace, suffix: str) -> Path:
    """Where this invocation writes its rows, table and figures: --results, by default
    runs/regime_map[_plan]/results (never the committed benchmarks/results). A folder that
    holds rows already is continued only with --resume (its rows are read back as this map's);
    a folder of files git tracks (published results) is refused: the map writes into its own
    folder, and publishing is a copy of the finished table."""
    results = Path(args.results or f"runs/regime_map{suffix}/results")
    try:
        tracked = subprocess.run(
            ["git", "ls-files", "--", str(results.resolve())],
            capture_output=True,
            text=True,
            cwd=results.resolve().parent if results.parent.exists() else None,
        )
    except FileNotFoundError:  # no git: nothing can be tracked
        tracked = None
    if tracked is not None and tracked.returncode == 0 and tracked.stdout.strip():
        raise SystemExit(
            f"error: --results {results} holds results committed to git "
            f"({tracked.stdout.split()[0]}, ...); the map never rewrites them: pass a new "
            "--results (or none: runs/regime_map*/results) and copy the finished files over"
        )
    if (results / "rows").is_dir() and any((results / "rows").rglob("*.json")) and not args.resume:
        raise SystemExit(
            f"error: --results {results} holds the rows of an earlier map; pass --resume to "
            "continue it (its rows are read back, not computed again), or another --results"
        )
    return results
