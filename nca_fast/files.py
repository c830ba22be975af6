"""Files written safely: atomic replacement, writable folders, JSON read with one-line errors.

Every file a user keeps (models, checkpoints, images, videos, benchmark CSVs) is written through
``atomic_write``, so an interrupted save never leaves a half-written file behind.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import secrets
import sys
import tempfile
from typing import Callable, List, Union

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write_fn: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Create or replace ``path`` so that readers see either the old file or the complete new one.

    ``write_fn(tmp)`` must write the whole content to ``tmp``, a fresh empty file in the same
    folder whose name ends with the same extension as ``path`` (so writers that pick a format by
    extension, like imageio, still work). It may reopen or truncate ``tmp`` freely. The new file is
    then flushed to disk (fsync) and renamed over ``path`` (``os.replace``, atomic on POSIX and
    Windows). If ``write_fn`` raises, the temporary file is removed, ``path`` is left untouched
    and the exception propagates. Returns ``path`` as a ``pathlib.Path``.

    Example: ``atomic_write("log.json", lambda tmp: tmp.write_text(json.dumps(d)))``.
    """
    path = pathlib.Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"{path}: the folder {folder} does not exist")
    # O_EXCL on a random name: never clobbers another writer's temporary file; mode 0o666 lets
    # the umask decide the final permissions, as for a file created with open().
    while True:
        tmp = folder / f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        break
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(folder)
    return path


# atomic_write's temporary files: ".NAME.<8 hex digits>.tmp<NAME's extension>".
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.tmp(?P<suffix>\.[^.]*)?$")


def remove_stale_temporaries(folder: PathLike) -> List[pathlib.Path]:
    """Delete the temporary files that ``atomic_write`` leaves behind when its process is
    killed mid-write (SIGKILL, power loss), e.g. ``.checkpoint.safetensors.1a2b3c4d.tmp
    .safetensors``. Only call it while no other process writes to ``folder`` (a run folder
    whose lock is held). Returns the files removed."""
    removed = []
    for p in pathlib.Path(folder).iterdir():
        m = _TEMP_NAME.match(p.name)
        if m is None or (m.group("suffix") or "") != pathlib.PurePath(m.group("name")).suffix:
            continue
        if p.is_file() and not p.is_symlink():
            try:
                p.unlink()
            except FileNotFoundError:
                continue
            removed.append(p)
    return removed


def writable_folder(folder: PathLike) -> pathlib.Path:
    """Create ``folder`` (with its parents) if needed and check that files can be created in it.

    Raises OSError with a one-line message naming the folder and the reason (permission denied,
    a file in the way, read-only file system, ...). Returns the folder as a ``pathlib.Path``.
    """
    folder = pathlib.Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the folder {folder}: {e.strerror or e}") from None
    try:
        fd, name = tempfile.mkstemp(prefix=".nca_fast-write-check.", dir=folder)
    except OSError as e:
        raise OSError(f"cannot write in the folder {folder}: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(name)
    return folder


def parse_json(text: Union[str, bytes], where: str):
    """``json.loads`` with every failure as a one-line ValueError naming ``where``: syntax
    errors, bytes that are not UTF-8, and nesting too deep for Python's recursion limit."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError:
        raise ValueError(f"{where}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply to be a model or config "
                         f"(deeper than Python's recursion limit, "
                         f"{sys.getrecursionlimit()})") from None


def _fsync_folder(folder: pathlib.Path) -> None:
    # Makes the rename itself durable; not possible on every platform (Windows), hence best effort.
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
