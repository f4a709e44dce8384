"""Atomic file writes shared by checkpoints, exported weights and reports.

Everything robustft writes goes to a temporary sibling file first, is flushed to disk, and is then
renamed over the target with ``os.replace`` (atomic on POSIX and Windows): a process killed mid-write
never leaves a truncated checkpoint or report behind. The file gets the permissions the user's umask
gives any new file (``tempfile.mkstemp`` alone would leave it readable by its owner only).

A write that fails for lack of room (a full disk ``ENOSPC``, a quota ``EDQUOT``, a file-size limit
``EFBIG``) or any other OS error raises :class:`AtomicWriteError` naming the target path and the cause;
the temporary file is removed and the previous file at the target, if any, is left untouched. (``torch.save``
reports such a failure as an opaque ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``,
with the real ``OSError`` only in its context.)
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


class AtomicWriteError(OSError):
    """Writing a file failed (full disk, quota, file-size limit, I/O error); names the path and the cause.
    The target was not replaced: its previous content, if any, is intact."""


def _os_error_in(exc: BaseException) -> OSError | None:
    """The first ``OSError`` in ``exc``'s chain (itself, its cause or context)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        if isinstance(current, OSError):
            return current
        seen.append(current)
        current = current.__cause__ or current.__context__
    return None


def _write_error(target: Path, exc: BaseException) -> AtomicWriteError | None:
    cause = _os_error_in(exc)
    if cause is None:
        return None
    code = cause.errno
    name = errno.errorcode.get(code, "") if code is not None else ""
    reason = f"{cause.strerror or cause} ({name})" if name else str(cause)
    hint = ""
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        try:
            free = shutil.disk_usage(target.parent).free
            hint = f"; {free / 2**20:.1f} MiB free on that filesystem"
        except OSError:
            pass
        hint += " (free space, raise the quota or the file-size limit `ulimit -f`, or write elsewhere)"
    previous = f"the previous {target.name} is unchanged" if target.exists() else f"no {target.name} was written"
    return AtomicWriteError(code, f"could not write '{target}': {reason}{hint}; {previous}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[Any]], None], binary: bool = True) -> Path:
    """Call ``write(handle)`` on a temporary file next to ``path``, fsync it, then move it into place."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        mode = "wb" if binary else "w"
        kwargs = {} if binary else {"encoding": "utf-8", "newline": ""}
        with os.fdopen(fd, mode, **kwargs) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        error = _write_error(target, exc) if isinstance(exc, Exception) else None
        if error is not None:
            raise error from exc
        raise
    return target


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` with :func:`atomic_write` semantics."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text), binary=False)
