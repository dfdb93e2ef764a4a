"""Who may write a run folder, and whether an output path can be written at all (stdlib only).

`RunLock`: a run folder belongs to one run at a time. Two trainers on one --out would prune each
other's checkpoints and rewrite each other's metrics.jsonl and config.json. The lock is an OS
lock (fcntl.flock) on RUN/.lock, which the kernel releases when the holding process ends however
it ends (kill -9 included), so a stale lock never needs cleaning up; the file holds the holder's
pid for the refusal's message. Under torchrun rank 0 holds it (fastsp.training.loop.train).
`RunLock.try_acquire` locks any file the same way without waiting (the regime map's workers
claim the rows they share with it: a dead worker's claim is free, whatever host it ran on).

`check_out_folder` and `check_output_file` say what is wrong with an output path (a file where a
folder belongs, a folder that cannot be written, a name longer than the file system allows) before
any work starts, as invalid input, rather than as a failed write after the work.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from fastsp.errors import ConfigError

LOCK_FILE = ".lock"


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "a process whose pid is not written yet"


class LockFileChanging(OSError):
    """A lock file removed and made again at every try (a file system that keeps no inode)."""


class RunLock:
    """The exclusive lock of one run folder, held until `release` or the process's end."""

    _held: set[int] = set()  # file descriptors of the locks this process holds

    def __init__(self, fd: int, path: Path):
        self.fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Lock the existing folder `run_dir`, or raise ConfigError naming the holder's pid. A
        refused caller changes nothing (the lock file exists already: its holder made it)."""
        path = Path(run_dir) / LOCK_FILE
        try:
            lock, holder = cls.try_acquire(path)
        except OSError as error:
            if error.errno == errno.ENOLCK or isinstance(error, LockFileChanging):
                raise ConfigError(
                    f"cannot lock the run folder {run_dir} ({error.strerror or error}); "
                    "pass an --out on a file system with file locks"
                ) from None
            raise ConfigError(
                f"cannot lock the run folder {run_dir}: {path} cannot be opened "
                f"({error.strerror or error}); pass an --out you can write in"
            ) from None
        if lock is None:
            raise ConfigError(
                f"the run folder {run_dir} is in use by another run ({holder} holds "
                f"{path}); wait for it to end or stop it, or pass another --out"
            )
        return lock

    @classmethod
    def try_acquire(cls, path: Path) -> tuple[RunLock | None, str]:
        """Lock the file `path` (made if missing) without waiting: (the lock, "") or, while
        another process holds it, (None, its holder: "pid N"). Raises OSError when the file
        cannot be opened or locked for another reason than a holder."""
        for _ in range(10):  # retried only when a holder removed the file as we locked it
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = _holder(fd)
                os.close(fd)
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                return None, holder
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # its holder removed the lock file (`claimed`): lock the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
            cls._held.add(fd)
            return cls(fd, path), ""
        raise LockFileChanging(f"the lock file {path} keeps changing")

    def release(self) -> None:
        if self.fd is not None:
            RunLock._held.discard(self.fd)
            os.close(self.fd)  # closing the last descriptor releases the lock
            self.fd = None

    @classmethod
    def close_in_child(cls) -> None:
        """In a forked child (a DataLoader worker): close the inherited descriptors without
        unlocking. A flock lasts while any descriptor of it is open, so a worker outliving a
        killed trainer would otherwise keep the folder locked for the restart."""
        for fd in cls._held:
            try:
                os.close(fd)
            except OSError:
                pass
        cls._held = set()


@contextlib.contextmanager
def claimed(
    run_dir: str | Path, is_main: bool = True, keep_lock_file: bool = True
) -> Iterator[RunLock | None]:
    """Own the run folder for the body: the path checked (`check_out_folder`), the folder made
    if it is new, locked. If the body ends having written nothing into a folder this call made
    (bad input, a signal during the start), the folder is removed again: a failed start leaves
    no half-made run folder. Other ranks (`is_main` False) take nothing. `keep_lock_file` False:
    the lock file goes too (a data folder, whose readers do not lock it, keeps no trace of the
    writer; a process waiting on the removed file locks a new one, see `RunLock.acquire`)."""
    if not is_main:
        yield None
        return
    run_dir = Path(run_dir)
    check_out_folder(run_dir)
    made = _make_folders(run_dir)
    try:
        lock = RunLock.acquire(run_dir)
    except BaseException:
        _remove_made(run_dir, made)
        raise
    try:
        yield lock
    finally:
        _remove_made(run_dir, made)  # before the release: still ours while it goes
        if not keep_lock_file:
            lock.path.unlink(missing_ok=True)
        lock.release()


def _make_folders(run_dir: Path) -> Path | None:
    """Make `run_dir` and its missing parents; the topmost folder made here, or None."""
    missing = []
    folder = run_dir
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    made = None
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:  # another process made it meanwhile
            continue
        except OSError as error:
            raise ConfigError(
                f"--out {run_dir}: cannot make {folder} ({error.strerror or error}); pass a "
                "path you can write in"
            ) from None
        made = made or folder
    return made


def _remove_made(run_dir: Path, made: Path | None) -> None:
    """Remove the folders `_make_folders` made, if nothing but the lock file was written."""
    if made is None:
        return
    try:
        if [p.name for p in run_dir.iterdir()] not in ([], [LOCK_FILE]):
            return
        (run_dir / LOCK_FILE).unlink(missing_ok=True)
        folder = run_dir
        while True:
            folder.rmdir()  # only empty folders: stops at anything else's
            if folder == made:
                return
            folder = folder.parent
    except OSError:
        return


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _check_path(path: Path, option: str, kind: str) -> Path:
    """The checks a folder and a file path share; returns the nearest existing ancestor."""
    existing = path.parent if kind == "file" else path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    # os.path's tests, not Path's: a name that is too long makes Path.exists raise
    limit = _name_max(existing if os.path.isdir(existing) else existing.parent)
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            shown = part if len(part) <= 40 else f"{part[:20]}...{part[-10:]}"
            raise ConfigError(
                f"{option} {path}: the name '{shown}' is {len(os.fsencode(part))} bytes long, "
                f"over the {limit} this file system allows; pass a shorter path"
            )
    if kind == "folder" and existing == path and not os.path.isdir(path):
        raise ConfigError(f"{option} {path} is a file, not a folder; pass a folder path")
    if not os.path.isdir(existing):
        raise ConfigError(
            f"{option} {path}: {existing} is a file, not a folder, so nothing can be made in it; "
            "pass another path"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{option} {path}: cannot write in {existing} (permission denied"
            f"{', a read-only file system' if _read_only(existing) else ''}); pass a path you "
            "can write in"
        )
    return existing


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_out_folder(path: str | Path, option: str = "--out") -> None:
    """Refuse (ConfigError) a folder path that cannot be made or written in, saying why."""
    path = Path(path)
    _check_path(path, option, "folder")


def check_output_file(path: str | Path, option: str = "--out") -> None:
    """Refuse (ConfigError) a file path that cannot be written, saying why: a folder, an existing
    file without write permission, or a parent that cannot be made or written in."""
    path = Path(path)
    _check_path(path, option, "file")
    if os.path.isdir(path):
        raise ConfigError(f"{option} {path} is a folder; pass a file path inside it")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ConfigError(f"{option} {path} cannot be overwritten (permission denied)")
