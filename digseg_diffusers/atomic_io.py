"""Crash-safe file output: atomic files and folders, and a lock against a second writer.

A process can be killed at any instruction (SIGKILL, power loss, out of memory). Everything this project writes for
later use (checkpoints, adapters, summaries, the command line's results) goes through these helpers, so a reader
only ever sees the old complete file or folder or the new complete one: files and folders are written under a
hidden temporary name next to the target and renamed into place (`os.replace` is atomic on POSIX and Windows), and
folders are renamed out of the way before they are deleted.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
"""A full disk, or a full quota: what every writer of this package reports as "the disk is full"."""


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` is an `OSError` saying the disk (or the user's quota) is full."""
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's entries') data to disk; best effort where the OS cannot do it for folders."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open folders
        return
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file and folder under `folder` (so a rename that publishes it never exposes lost data)."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def temporary_sibling(path: str | os.PathLike, tag: str = "") -> Path:
    """A hidden, unique name next to `path` (same folder, so same file system: renames stay atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag or uuid.uuid4().hex[:12]}{TEMPORARY_SUFFIX}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` in one step, on error it is removed.

    Writers that pick a format from the file name (PIL) must be told the format: the temporary name ends in ".tmp".
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if is_disk_full(error) and not error.filename:
            # writers (PIL, json) report a full disk without a file name: say which file could not be written
            raise OSError(error.errno, os.strerror(error.errno), str(path)) from error
        raise
    fsync_path(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike, document) -> None:
    atomic_write_text(path, json.dumps(document, indent=2) + "\n")


def remove_directory(path: str | os.PathLike) -> None:
    """Delete a folder so that it disappears at once: renamed to a hidden name first, then deleted."""
    path = Path(path)
    if not path.exists():
        return
    doomed = temporary_sibling(path, "deleting")
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    fsync_path(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def publish_directory(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Make the complete folder `staging` appear as `final` (replacing an existing `final`), flushed to disk first.

    A folder cannot be renamed over a non-empty one, so an existing `final` is renamed aside and deleted after the
    swap; a kill between the two renames leaves no `final` (readers fall back to what else exists), never a mixed one.
    """
    staging, final = Path(staging), Path(final)
    fsync_tree(staging)
    replaced = temporary_sibling(final, "replaced") if final.exists() else None
    if replaced is not None:
        if replaced.exists():
            shutil.rmtree(replaced)
        os.rename(final, replaced)
    os.rename(staging, final)
    fsync_path(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty hidden folder next to `final`; when the block succeeds it is published as `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_sibling(final, "incomplete")
    if staging.exists():  # left by a killed earlier attempt
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_directory(staging, final)


class FolderLockedError(RuntimeError):
    """Another live process holds the lock of this folder."""


class DirectoryLock:
    """An exclusive, non-blocking lock on a folder, held through a lock file inside it.

    The OS releases the lock when its holder dies (`flock` on POSIX, `msvcrt.locking` on Windows), so a killed
    writer never leaves a stale lock; the file's text (process id, host, start time) names the holder in the error.
    """

    def __init__(self, folder: str | os.PathLike, name: str = ".digseg.lock"):
        self.path = Path(folder) / name
        self._fd: int | None = None

    def acquire(self) -> DirectoryLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                try:
                    os.lseek(fd, 0, os.SEEK_SET)
                    holder = os.read(fd, 200).decode("utf-8", "replace").strip()
                except OSError:  # Windows: the locked byte cannot be read
                    holder = ""
                os.close(fd)
                raise FolderLockedError(
                    f"{self.path.parent} is being written by another process ({holder or 'holder unknown'})"
                )
            try:  # the previous holder may have deleted the file between our open and our lock: lock the new one
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        except OSError:  # e.g. a full disk: leave no lock file behind
            self.release()
            raise
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # Windows cannot delete an open file; the lock file then stays
            os.remove(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _try_lock(fd: int) -> bool:
    """Take the OS lock without waiting; False when another process holds it."""
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
