"""Guards of a `dgfast sample` folder: one writer at a time, files checked against what was written,
and a memory of batches that diverged.

- Every file (samples, manifest.json, the .npz, records) is written atomically (`write_atomic`): a
  reader or a resumed run sees no file or the whole file.
- The lock (`dgfast.lock`, held by rank 0 for the whole run) holds the owner's host and pid. It is a
  POSIX record lock (fcntl.lockf), so the kernel drops it when the owner dies, however it dies: a
  lock file left by a crashed run is taken over (with a note naming the old owner), one whose owner
  still runs stops the second writer with one line. Without fcntl (Windows) there is no lock.
- Checksums: every sample file's sha256 is appended to a per-process log (`.checksums/`) before the
  file is renamed into place, so a finished file always has one. At the end of a run the logs are
  merged into manifest.json ("files"). On --resume each rank re-reads its finished files: a file
  whose bytes match no recorded checksum (edited, replaced, truncated, 0 bytes) is deleted and drawn
  again, with a message. Folders from before checksums (no "files" in the manifest) are only checked
  for readability. The .npz is built only from files that match.
- Divergence records (`diverged-*.json`): a batch that diverged stops the run; its samples are
  recorded, so that a resume in which the same samples diverge again says so (with the same settings
  they always will).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import os
import socket
import sys

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows): no lock
    fcntl = None

LOCK_NAME = "dgfast.lock"
CHECKSUM_DIR = ".checksums"
DIVERGED_PREFIX = "diverged-"


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------

def write_atomic(path: str, write) -> None:
    """write(fileobj) into a hidden temp file in the same directory, then os.replace: a reader
    (or a resumed run) sees either no file or the whole file, even after SIGKILL."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise



# ----------------------------------------------------------------------------------------------
# The lock
# ----------------------------------------------------------------------------------------------

class FolderLocked(OSError):
    """Another live process is writing the folder."""


class FolderLock:
    """`with FolderLock(folder):` holds the folder's lock (see the module doc); raises FolderLocked."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, LOCK_NAME)
        self.fd = None
        self.note = None  # set when a lock left by a crashed run was taken over

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self) -> None:
        if fcntl is None:
            return
        for _ in range(5):  # the file can be removed between our open and our lock: retry on a new one
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = _read_owner(fd)
                os.close(fd)
                raise FolderLocked(self._held_message(owner)) from None
            if _same_file(fd, self.path):
                previous = _read_owner(fd)
                if previous:
                    self.note = (f"{self.path} was left by pid {previous.get('pid')} on {previous.get('host')} "
                                 f"(started {previous.get('started')}), which ended without releasing it: taken over")
                _write_owner(fd)
                self.fd = fd
                return
            os.close(fd)
        raise FolderLocked(f"{self.path}: could not take the lock (the file keeps being replaced)")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.remove(self.path)  # before unlocking: a waiting writer then locks a new file
        os.close(self.fd)
        self.fd = None

    def _held_message(self, owner: dict | None) -> str:
        who = (f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}" if owner
               else "another process")
        return (f"{os.path.dirname(self.path)} is being written by another dgfast run ({who}): two writers would "
                f"delete each other's files; wait for it to end (a resume then continues it)")


def _read_owner(fd) -> dict | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        owner = json.loads(os.read(fd, 4096).decode() or "null")
        return owner if isinstance(owner, dict) else None
    except (OSError, ValueError):
        return None


def _write_owner(fd) -> None:
    owner = dict(host=socket.gethostname(), pid=os.getpid(),
                 started=datetime.datetime.now().isoformat(timespec="seconds"), command=sys.argv)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(owner).encode())


def _same_file(fd, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def lock_holder(folder: str) -> str | None:
    """The message FolderLock would raise if a live process holds folder's lock now, else None
    (a read-only check, for argument validation before any model is loaded)."""
    path = os.path.join(folder, LOCK_NAME)
    if fcntl is None or not os.path.exists(path):
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a shared lock conflicts with the owner's exclusive one
        return None
    except OSError:
        return FolderLock(folder)._held_message(_read_owner(fd))
    finally:
        os.close(fd)  # also drops our shared lock


# ----------------------------------------------------------------------------------------------
# Checksums
# ----------------------------------------------------------------------------------------------

def file_checksum(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


class ChecksumLog:
    """This process's log of written files: one 'NAME CHECKSUM' line per file, appended (and flushed
    to the OS, which keeps it if the process is killed) before the file is renamed into place."""

    def __init__(self, folder: str):
        self.dir = os.path.join(folder, CHECKSUM_DIR)
        self.path = os.path.join(self.dir, f"{socket.gethostname()}-{os.getpid()}.log")
        self.file = None

    def record(self, name: str, data: bytes) -> None:
        if self.file is None:
            os.makedirs(self.dir, exist_ok=True)
            self.file = open(self.path, "a")
        self.file.write(f"{name} {file_checksum(data)}\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def known_checksums(folder: str, manifest_files: dict | None) -> dict[str, set]:
    """name -> every checksum recorded for it (manifest.json's "files" and the logs of runs since).
    A file may legitimately have had several (redrawn with another batch size): any one matches."""
    known: dict[str, set] = {}
    for name, value in (manifest_files or {}).items():
        known.setdefault(name, set()).add(value)
    log_dir = os.path.join(folder, CHECKSUM_DIR)
    for log in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
        with open(os.path.join(log_dir, log), errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2:  # a line cut short by a kill has one part: its file was never renamed in
                    known.setdefault(parts[0], set()).add(parts[1])
    return known


def check_file(path: str, known: dict[str, set], strict: bool) -> tuple[str | None, str | None]:
    """check_bytes on the file's content; also (None, why) when it cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        return None, f"cannot be read ({err.strerror})"
    return check_bytes(os.path.basename(path), data, known, strict)


def check_bytes(name: str, data: bytes, known: dict[str, set], strict: bool) -> tuple[str | None, str | None]:
    """(checksum, None) for a good sample file, (None, why) for a damaged one. A file with recorded
    checksums must match one; without any, it is damaged if strict (a folder with checksums: it was
    not written by its runs), else (a folder from before checksums) good if it can be decoded."""
    if not data:
        return None, "is empty (0 bytes)"
    checksum = file_checksum(data)
    if name in known:
        if checksum in known[name]:
            return checksum, None
        return None, "does not match the checksum recorded when it was written (changed since)"
    if strict:
        return None, "has no recorded checksum (it was not written by this folder's runs)"
    try:
        read_sample_bytes(data, name)
    except (OSError, ValueError, EOFError) as err:
        return None, f"cannot be decoded ({type(err).__name__}: {err})"
    return checksum, None


def read_sample_bytes(data: bytes, name: str, resize: int | None = None):
    """The array a sample file's bytes hold: float32 latents (.npy) or uint8 RGB (.png, optionally resized
    with PIL BILINEAR as the DoG scripts do)."""
    import numpy as np
    if name.endswith(".npy"):
        return np.load(io.BytesIO(data), allow_pickle=False)
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if resize:
            im = im.resize((resize, resize), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def redraw_damaged(folder: str, names: list[str], known: dict[str, set], strict: bool) -> list[str]:
    """Delete the damaged ones among `names` (they are then drawn again as missing); 'NAME why' for each."""
    out = []
    for name in names:
        _, why = check_file(os.path.join(folder, name), known, strict)
        if why is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
            out.append(f"{name} {why}")
    return out


def remove_checksum_logs(folder: str) -> None:
    log_dir = os.path.join(folder, CHECKSUM_DIR)
    if os.path.isdir(log_dir):
        for log in os.listdir(log_dir):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(log_dir, log))
        with contextlib.suppress(OSError):
            os.rmdir(log_dir)


# ----------------------------------------------------------------------------------------------
# Divergence records
# ----------------------------------------------------------------------------------------------

def record_divergence(folder: str, indices: list[int], labels: list[int], what: str, write) -> list[int]:
    """Record that `indices` diverged (write(path, bytes): an atomic writer); returns those that a
    previous run recorded too."""
    before = set()
    for name in os.listdir(folder):
        if name.startswith(DIVERGED_PREFIX) and name.endswith(".json"):
            with contextlib.suppress(OSError, ValueError, TypeError):
                with open(os.path.join(folder, name)) as f:
                    before |= set(json.load(f)["indices"])
    entry = dict(indices=indices, labels=labels, what=what, when=datetime.datetime.now().isoformat(timespec="seconds"))
    write(os.path.join(folder, f"{DIVERGED_PREFIX}{indices[0]:06d}.json"), json.dumps(entry).encode())
    return sorted(before & set(indices))


def remove_divergence_records(folder: str) -> None:
    for name in os.listdir(folder):
        if name.startswith(DIVERGED_PREFIX) and name.endswith(".json"):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))
