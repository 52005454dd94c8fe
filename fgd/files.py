"""How fgd touches a user's folders: every file it writes appears whole or not at all, finished work
is moved aside (never deleted or overwritten), cleanup touches only the temporary files fgd named,
and one run at a time works in a folder.

    write_atomic(path, text_or_bytes)       # or a function that writes to the open file
    moved = move_aside(path)                # path -> path.previous-<time>, said in one line
    with RunLock(folder, "fgd train"):     # a second run there stops at once, naming this one
        ...
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Union

log = logging.getLogger("fgd")


class RunError(RuntimeError):
    """A reason a run cannot go on that the user can act on; `fgd` prints it as one line."""


class FileError(RunError, OSError):
    """A file or folder fgd cannot use (a RunError: said in one line; an OSError to code that catches those)."""


# .<name>.tmp<pid>: the one name fgd gives its temporary files (and the one cleanup removes)
_TMP = ".{name}.tmp{pid}"
_TMP_NAME = re.compile(r"^\..+\.tmp\d+$")


def write_error(e: BaseException) -> str:
    """Why a write failed, in words a user acts on."""
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    if isinstance(e, OSError) and e.errno == errno.EFBIG:
        return f"{text} (larger than this process may write: ulimit -f)"
    return text


def write_atomic(path, data: Union[str, bytes, Callable]) -> Path:
    """Writes ``data`` (text, bytes, or a function given the open binary file) to a temporary file
    in ``path``'s folder, then renames it over ``path``: a reader, or a resume after a kill, sees the
    old file or the new one, never part of one. A failed write (disk full, file too large, a folder in
    the way) removes its temporary file, leaves the previous file as it was and raises FileError."""
    path = Path(path)
    tmp = path.with_name(_TMP.format(name=path.name, pid=os.getpid()))
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a short write as RuntimeError
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise FileError(f"could not write {path}: {write_error(e)}; nothing was replaced (the previous file, if "
                        "any, is intact)") from None
    return path


def remove_temp_files(folder) -> int:
    """Deletes the temporary files killed or failed writes left in ``folder`` (only names fgd gives
    them); returns how many."""
    removed = 0
    for tmp in Path(folder).glob(".*.tmp*"):
        if _TMP_NAME.match(tmp.name) and tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def aside_name(path, bare: bool = False) -> Path:
    """``path`` with ``.previous-<time>`` (and a counter when taken) before its suffix; ``bare``: a
    sibling named ``previous-<time>`` only."""
    path = Path(path)
    stamp = time.strftime("previous-%Y%m%d-%H%M%S")
    for n in range(1000):
        tail = f"{stamp}{'' if n == 0 else f'-{n}'}"
        name = tail if bare else f"{path.stem}.{tail}{path.suffix}"
        if not path.with_name(name).exists():
            return path.with_name(name)
    raise FileError(f"cannot move {path} aside: too many earlier copies beside it")


def move_aside(path, why: str = "") -> Path:
    """Renames ``path`` (a file or a folder) to ``aside_name(path)`` and says so in one line."""
    target = aside_name(path)
    try:
        os.replace(path, target)
    except OSError as e:
        raise FileError(f"cannot move {path} aside to {target.name}: {write_error(e)}") from None
    log.warning("moved %s aside to %s%s", path, target, f" ({why})" if why else "")
    return target


def check_output_folder(folder, flag: str, inside=()) -> Path:
    """FileError naming ``flag`` unless ``folder`` is (or can be made) a folder fgd can write in, and
    each of the names ``inside`` is a folder there or absent."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileError(f"{flag} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / _TMP.format(name="probe", pid=os.getpid())
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise FileError(f"cannot write in {flag} {folder}: {write_error(e)}") from None
    for name in inside:
        if (folder / name).exists() and not (folder / name).is_dir():
            raise FileError(f"{flag} {folder}: {folder / name} is a file where fgd keeps a folder")
    return folder


def same_file(a, b) -> bool:
    """Whether two paths name one file (through links, relative parts and case-insensitive disks)."""
    try:
        return Path(a).exists() and Path(b).exists() and os.path.samefile(a, b)
    except OSError:
        return False


# ---- one run per folder -----------------------------------------------------------------------

_LOCK = ".fgd-lock"
_held: dict = {}  # resolved folder -> [open lock file, how many holders in this process]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLock:
    """Holds ``folder/.fgd-lock`` (a kernel lock, flock, released even when the process is killed)
    while a run works there; the file notes the holder (pid, command, host, start) so a second run
    can name it. Taken again by the same process (a run inside a run, e.g. the teacher of `fgd
    train`), it is shared. A note left by a process that no longer runs is taken over, said in a
    line."""

    def __init__(self, folder, what: str = "fgd"):
        self.folder, self.what = Path(folder), what
        self.key = None

    def __enter__(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.folder)
        if key in _held:
            _held[key][1] += 1
            self.key = key
            return self
        path = self.folder / _LOCK
        try:
            f = open(path, "a+")
        except OSError as e:
            raise FileError(f"cannot lock {self.folder} for this run: {write_error(e)}") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            note = f.read().strip() or "another process"
            f.close()
            raise FileError(f"{self.folder} is in use by another run ({note}); wait for it to end or use "
                            "another output folder") from None
        f.seek(0)
        old = f.read().strip()
        pid = re.match(r"pid (\d+)", old)
        if pid and int(pid[1]) != os.getpid():
            log.warning("%s: taking over the lock of a run that ended without releasing it (%s%s)", self.folder,
                        old, "" if _alive(int(pid[1])) else "; that process no longer runs")
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}: {self.what}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        _held[key] = [f, 1]
        self.key = key
        return self

    def __exit__(self, *exc) -> None:
        held = _held.get(self.key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            f = held[0]
            del _held[self.key]
            f.seek(0)
            f.truncate()  # a clean end leaves no note to take over
            f.close()  # releases the flock


def command_line() -> str:
    """How this process was started, for the lock's note (the command, shortened)."""
    text = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
    return text if len(text) <= 120 else text[:117] + "..."
