"""Writing files so that readers never see half of one: `atomic_path` (a file), `atomic_folder`
(a folder), `write_json`. Checkpoints, exports, caches, overlays and hub-layout folders all
write through these; nothing here knows what it writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Union


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _give_umask_mode(path: Path, mask: int) -> None:
    """Set a written file's mode to what a plain `open()` gives (0o666 less the umask, execute
    bits kept): writers that go through a temporary file (safetensors' `save_file`) leave 0600."""
    mode = path.stat().st_mode
    os.chmod(path, ((mode & 0o111) | 0o666) & ~mask)


@contextlib.contextmanager
def atomic_path(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """A temporary path beside `path` to write to; when the block ends without an exception
    the file is fsynced and renamed onto `path` (atomic on POSIX: readers see the old file or
    the new one, never a part of it), otherwise it is deleted and `path` is left as it was.
    The file gets the user's umask, as a plain `open()` would."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        _give_umask_mode(tmp, _umask())
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_folder(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """A temporary folder beside `path` to fill; when the block ends without an exception it
    replaces `path` (a folder there before is removed), otherwise it is deleted and `path` is
    left as it was: readers never see a half-written folder. Its files get the user's umask."""
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.{os.getpid()}.tmp"), path.with_name(f".{path.name}.{os.getpid()}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        mask = _umask()
        for file in (p for p in tmp.rglob("*") if p.is_file() and not p.is_symlink()):
            _give_umask_mode(file, mask)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Union[str, os.PathLike], value: dict) -> None:
    """`value` as indented JSON at `path`, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2) + "\n")
