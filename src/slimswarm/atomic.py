"""Crash-safe output (used by every writer, any layer): a folder or file is built under a temporary name beside its
target and renamed into place, so a process killed at any moment leaves the complete old output, the complete
new one, or nothing; temporary names of dead processes are removed by the next write to the same target.

Temporary names are ``.NAME.tmp-PID-RANDOM`` (being built) and ``.NAME.old-PID-RANDOM`` (the output being
replaced, kept until the new one is in place). A kill between those two renames leaves no NAME but an intact
``.old-`` folder: the next write (or ``recover``) puts it back before anything else.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[^.]*$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def leftovers(target: str | Path) -> list[Path]:
    """Temporary names beside ``target`` that belong to it (any process, alive or not)."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    out = []
    for p in target.parent.iterdir():
        m = _LEFTOVER.match(p.name)
        if m and m["name"] == target.name:
            out.append(p)
    return sorted(out)


def recover(target: str | Path) -> None:
    """Undo what dead writers of ``target`` left: restore an ``.old-`` folder when the target is missing (a kill
    between the two renames of a replacement), then delete their other temporary names."""
    target = Path(target)
    dead = [p for p in leftovers(target) if not _alive(int(_LEFTOVER.match(p.name)["pid"]))]
    if not target.exists():
        olds = [p for p in dead if ".old-" in p.name and p.is_dir() and any(p.iterdir())]
        if olds:
            os.replace(olds[-1], target)
            dead.remove(olds[-1])
    for p in dead:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def staging_dir(target: str | Path) -> Path:
    """A new empty folder beside ``target`` to build it in (after cleaning up dead writers' leftovers)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))


def publish_dir(staged: str | Path, target: str | Path) -> Path:
    """Move the finished ``staged`` folder to ``target``, replacing what is there without ever deleting it first."""
    staged, target = Path(staged), Path(target)
    _fsync_tree(staged)
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
        os.replace(target, old)  # an empty folder is replaced atomically by a rename onto it
        os.replace(staged, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, target)
    _fsync_dir(target.parent)
    return target


def write_file(target: str | Path, write) -> Path:
    """``write(f)`` into a temporary file beside ``target``, flushed and renamed over it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the permissions open() would give
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def _fsync_tree(folder: Path) -> None:
    """Flush a staged folder's files to disk, so a power cut after the rename cannot leave empty files in place."""
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
