"""Checksums of every checkpoint file: written at save, checked before anything is loaded.

A memory-mapped torch.load takes tensor bytes as they are on disk (the zip's CRCs are never read),
so a damaged sector inside a checkpoint loads and trains on, and surfaces, if at all, as NaN
iterations later. Each checkpoint directory therefore lists its files in `integrity.json`, with
each file's size and SHA-256 (the digest `sha256sum FILE` prints), and a checkpoint is read only
after every listed file matches.

The trainer's own files are hashed while torch.save writes them: a second thread hashes each chunk
while the main thread writes it (both release the GIL), so a save takes about as long as the slower
of the two. DeepSpeed's files, which its engine writes itself, are read back once after the save.
Checkpoints written before the manifest existed have none and load unverified.
"""

import hashlib
import itertools
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

MANIFEST = "integrity.json"
ALGORITHM = "sha256"
CHUNK = 16 * 2 ** 20  # bytes hashed per step; large enough that the thread hand-off costs nothing
_pool = None
_pool_lock = threading.Lock()


class Mismatch(Exception):
    """A checkpoint directory whose files are not those its manifest lists (the reason, in words)."""


def _hasher() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-sha256")
        return _pool


class HashingWriter:
    """A binary file that hashes the bytes written through it (torch.save writes through .write)."""

    def __init__(self, file):
        self.file, self.digest, self.nbytes = file, hashlib.sha256(), 0
        self.error = None  # the first OSError of a write: torch wraps it in a RuntimeError of its own

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), CHUNK):
            chunk = view[start:start + CHUNK]
            hashing = _hasher().submit(self.digest.update, chunk) if len(chunk) > 2 ** 20 else None
            try:
                self.file.write(chunk)
            except OSError as exc:
                self.error = self.error or exc
                raise
            finally:
                if hashing is not None:
                    hashing.result()
            if hashing is None:
                self.digest.update(chunk)
        self.nbytes += len(view)
        return len(view)

    def flush(self) -> None:
        self.file.flush()

    def entry(self) -> dict:
        return {"bytes": self.nbytes, ALGORITHM: self.digest.hexdigest()}


def torch_save(obj, path: str) -> dict:
    """torch.save(obj) to path, flushed to disk; returns the file's manifest entry. A failed write
    raises its OSError (ENOSPC, EFBIG, EIO, ...), not torch's wrapper of it."""
    import torch

    with open(path, "wb") as f:
        writer = HashingWriter(f)
        try:
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        except Exception:
            if writer.error is not None:
                raise writer.error from None
            raise
    return writer.entry()


def file_entry(path: str) -> dict:
    """The manifest entry of a file on disk: read once, the next chunk read while the last is hashed."""
    digest, nbytes, pending = hashlib.sha256(), 0, None
    buffers = (bytearray(CHUNK), bytearray(CHUNK))
    with open(path, "rb", buffering=0) as f:
        for turn in itertools.count():
            buffer = buffers[turn % 2]  # the other one may still be hashing
            got = f.readinto(buffer)
            if pending is not None:
                pending.result()
            if not got:
                break
            pending = _hasher().submit(digest.update, memoryview(buffer)[:got])
            nbytes += got
    return {"bytes": nbytes, ALGORITHM: digest.hexdigest()}


def write_manifest(directory: str, hashed: dict) -> None:
    """List every file of directory in its manifest: `hashed` holds the entries of the files hashed
    while they were written ({name relative to directory: entry}), the others are read now."""
    files = {}
    for folder, _, names in os.walk(directory):
        for name in names:
            relative = os.path.relpath(os.path.join(folder, name), directory)
            if relative != MANIFEST:
                files[relative] = hashed.get(relative) or file_entry(os.path.join(folder, name))
    path = os.path.join(directory, MANIFEST)
    with open(path, "w") as f:
        json.dump({"algorithm": ALGORITHM, "files": dict(sorted(files.items()))}, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True)
class Verified:
    files: int
    nbytes: int
    seconds: float


def verify(directory: str):
    """Verified when every file the manifest lists has its size and digest; None when there is no
    manifest (a checkpoint written before checkpoints carried checksums); Mismatch otherwise."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    start = time.perf_counter()
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest["algorithm"] != ALGORITHM or not isinstance(files, dict):
            raise ValueError
        expected = {name: (int(e["bytes"]), str(e[ALGORITHM])) for name, e in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise Mismatch(f"its {MANIFEST} is unreadable") from None
    for name, (nbytes, digest) in sorted(expected.items()):
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            raise Mismatch(f"{name} is missing")
        if os.path.getsize(file) != nbytes:
            raise Mismatch(f"{name} has {os.path.getsize(file)} bytes, {nbytes} were written")
        try:
            actual = file_entry(file)[ALGORITHM]
        except OSError as exc:
            raise Mismatch(f"{name} cannot be read ({exc.strerror})") from None
        if actual != digest:
            raise Mismatch(f"{name} does not match the SHA-256 in {MANIFEST}: its bytes changed after it was written")
    return Verified(len(expected), sum(n for n, _ in expected.values()), time.perf_counter() - start)
