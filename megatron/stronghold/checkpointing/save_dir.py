"""One writer per --save directory, and what dead writers leave behind.

A run with --save holds DIR/writer.lock from start to end: an exclusive flock(2) on the open file,
which the kernel drops when the process ends, however it ends (kill -9 included). A lock left by a
dead run is therefore stale by construction, and the next run takes it over; a live holder makes a
second run stop with a message before it builds anything. The file names its holder (host, pid,
start time, command) for that message. On a file system without flock (some parallel file systems
mounted without it) the holder's pid is checked instead, which works when both runs are on one host.

Only the process that publishes checkpoints (global rank 0) holds the lock; the other ranks of its
run write their part files under it.

With the lock held no other live run can be writing DIR, so every `iter_XXXXXXX.tmp` there is the
partial save of a dead run: the next save removes them.
"""

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time

from ..errors import ArgumentError
from ..distributed import is_first_rank

LOCK = "writer.lock"
_PARTIAL = re.compile(r"^iter_\d{7}\.tmp$")
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _inode(path: str):
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "a run that has not written its name yet"
    text = f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
    return text + (f": {holder['command']}" if holder.get("command") else "")


def _alive(holder: dict):
    """Whether the holder's process runs: True, False, or None where this host cannot tell."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return None
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _busy(root: str, holder: dict) -> ArgumentError:
    return ArgumentError(f"--save {root} is in use by another run ({_describe(holder)}); two runs writing one "
                         "directory would mix their checkpoints. Wait for it to end, stop it, or give this run "
                         "another --save directory")


class WriterLock:
    """DIR/writer.lock, held until release()."""

    def __init__(self, root: str):
        self.root, self.path = root, os.path.join(root, LOCK)
        self.fd = None
        while self.fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise ArgumentError(f"--save {root}: cannot create {self.path} ({exc.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise _busy(root, holder) from None
            except OSError as exc:
                if exc.errno not in _NO_FLOCK:
                    os.close(fd)
                    raise ArgumentError(f"--save {root}: cannot lock {self.path} ({exc.strerror})") from None
                holder = _holder(fd)
                alive = _alive(holder)
                if holder and alive is not False:  # a live holder, or one this host cannot check
                    os.close(fd)
                    if alive:
                        raise _busy(root, holder) from None
                    raise ArgumentError(f"--save {root}: {self.path} names a run on another host "
                                        f"({_describe(holder)}) and this file system cannot lock files; "
                                        "remove the file if that run has ended") from None
            # The previous holder removes the file as it lets go: a lock taken on a removed file
            # guards nothing, so take it again on the file now at the path.
            if os.fstat(fd).st_ino == _inode(self.path):
                self.fd = fd
            else:
                os.close(fd)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(me).encode(), 0)

    def release(self) -> None:
        if self.fd is None:
            return
        if os.fstat(self.fd).st_ino == _inode(self.path):
            os.unlink(self.path)  # while still locked, so nobody takes a lock on the file being removed
        os.close(self.fd)
        self.fd = None


@contextlib.contextmanager
def held(args):
    """The --save directory's writer lock for the body's duration (rank 0; nothing without --save)."""
    lock = None
    if args.save and is_first_rank():
        lock = WriterLock(args.save)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def remove_partial_saves(root: str, log) -> None:
    """Remove the iter_XXXXXXX.tmp directories of runs that died while saving. Call with the writer
    lock held: then none of them belongs to a live run."""
    for name in sorted(os.listdir(root)):
        if _PARTIAL.match(name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            log(f"removed {os.path.join(root, name)}: the partial checkpoint of a run that ended while saving")
