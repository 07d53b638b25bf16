"""Write an output directory somewhere else first, then move it in whole; lock a work folder.

Nothing the user had is lost and no half-written directory is left behind: the work happens in
a fresh directory beside the target, which replaces the target in one rename on success and is
removed on any error. A work folder that outlives one run (``prune``'s partial folder, which
``--resume`` continues) is held by :class:`FolderLock`, so two runs never write it at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import socket
import time
from contextlib import contextmanager
from typing import Iterator

LOCK_NAME = ".lock"


@contextmanager
def staged_directory(out: str | os.PathLike, replace: bool = False) -> Iterator[str]:
    """Yields a fresh directory that becomes ``out`` when the block succeeds.

    ``out`` may be absent or empty; a non-empty ``out`` is replaced only with ``replace=True``
    (callers check and refuse first, so that an error comes before any work). The directory is
    created like a plain ``mkdir`` (its mode follows the umask), not private like ``mkdtemp``'s.
    """
    out = os.path.abspath(os.fspath(out))
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    stage = _fresh_directory(parent, f".{os.path.basename(out)}.")
    try:
        yield stage
        if os.path.isdir(out):
            if replace:
                shutil.rmtree(out)
            else:
                os.rmdir(out)  # empty: a non-empty one raises rather than being lost
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def remove_stale_stages(out: str | os.PathLike) -> list[str]:
    """Removes the staging directories ``.<name>.<8 hex>`` that ``staged_directory`` left beside
    ``out`` when its process was killed; returns them. Only for a caller that holds ``out``'s
    lock (no live writer can be using them)."""
    out = os.path.abspath(os.fspath(out))
    parent, name = os.path.dirname(out), os.path.basename(out)
    if not os.path.isdir(parent):
        return []
    stale = []
    for entry in sorted(os.listdir(parent)):
        hex_part = entry[len(name) + 2 :]
        if entry.startswith(f".{name}.") and len(hex_part) == 8 and all(c in "0123456789abcdef" for c in hex_part):
            path = os.path.join(parent, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
                stale.append(path)
    return stale


def _fresh_directory(parent: str, prefix: str) -> str:
    """A new directory ``parent/prefix<random>``, mode 0o777 less the umask."""
    while True:
        path = os.path.join(parent, prefix + secrets.token_hex(4))
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


class FolderBusy(RuntimeError):
    """Another live process holds the folder's lock; ``holder`` describes it (pid, host, start)."""

    def __init__(self, message: str, holder: str = "") -> None:
        super().__init__(message)
        self.holder = holder


class FolderLock:
    """An exclusive lock on a work folder, held from :meth:`acquire` to :meth:`release`.

    The lock is ``flock`` on ``<folder>/.lock``: the kernel drops it when its process dies,
    so a folder left by a killed run is taken over by the next one, while a second run next to
    a live one fails at once with :class:`FolderBusy` naming the holder (pid, host, start time,
    written into the lock file). The folder is created if needed.
    """

    def __init__(self, folder: str) -> None:
        self.folder = os.path.abspath(folder)
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.fd: int | None = None
        self.previous: dict | None = None  # the holder recorded by a run that died holding it

    def acquire(self) -> "FolderLock":
        while True:
            os.makedirs(self.folder, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the folder was just removed by a finishing holder
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = describe_holder(_wait_for_holder(fd))
                os.close(fd)
                raise FolderBusy(f"{self.folder} is in use by another run ({holder})", holder) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file a finishing holder unlinked between our open and flock
                break
            os.close(fd)
        self.fd = fd
        self.previous = _read_holder(fd) or None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        record = json.dumps(me).encode()
        os.pwrite(fd, record, 0)  # then cut: the file is never empty while we hold it
        os.ftruncate(fd, len(record))
        return self

    def release(self, remove: bool = False) -> None:
        """Unlocks; ``remove`` deletes the folder, else only the lock file (and the folder if empty)."""
        if self.fd is None:
            return
        try:
            if remove:
                for name in os.listdir(self.folder):
                    if name != LOCK_NAME:
                        target = os.path.join(self.folder, name)
                        if os.path.isdir(target) and not os.path.islink(target):
                            shutil.rmtree(target, ignore_errors=True)
                        else:
                            os.unlink(target)
            os.unlink(self.path)  # while still locked: a waiting run then sees a new file
            try:
                os.rmdir(self.folder)
            except OSError:
                pass  # not empty: progress kept for --resume
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(remove=exc_type is None)


def _read_holder(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _wait_for_holder(fd: int, seconds: float = 2.0) -> dict:
    """The holder's record; a holder that has just taken the lock writes it a moment later."""
    deadline = time.monotonic() + seconds
    holder = _read_holder(fd)
    while not holder and time.monotonic() < deadline:
        time.sleep(0.02)
        holder = _read_holder(fd)
    return holder


def describe_holder(holder: dict | None) -> str:
    """"pid P on host H, started T" from what a lock holder wrote into the lock file."""
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
