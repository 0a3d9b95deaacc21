"""Atomic writes: an artefact is either complete or absent, never half-written after a crash."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mixtune.core.errors import ConfigError


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def follow_umask(root: str | os.PathLike) -> None:
    """Give every file and folder under ``root`` the mode the umask asks for (0644 / 0755 with the
    usual 022). Writers that go through a private temporary file (safetensors writes 0600) would
    otherwise leave outputs a colleague or a web server cannot read. Executable bits are kept."""
    mask = _umask()
    for top, _dirs, files in os.walk(root):
        os.chmod(top, 0o777 & ~mask)
        for name in files:
            p = os.path.join(top, name)
            if not os.path.islink(p):
                os.chmod(p, (0o777 if os.stat(p).st_mode & 0o111 else 0o666) & ~mask)


def output_folder(path: str | os.PathLike, *, what: str = "--out", create: bool = True) -> Path:
    """Make sure ``path`` is (or can become) a folder mixtune may write in, before any work starts.

    Raises:
        ConfigError: ``path`` is an existing file, or the folder cannot be created or written
            (one line naming the path and the operating system's reason).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path}: exists and is not a folder; give a folder (new or existing)")
    if not create:  # only check: the nearest existing parent must let us in
        parent = next(p for p in [path, *path.parents] if p.exists())
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"{what} {path}: cannot write in {parent} (permission denied)")
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(path))
    except OSError as e:
        where = e.filename or path
        raise ConfigError(f"{what} {path}: cannot create or write the folder {where} ({e.strerror})") from None
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600); outputs follow the umask
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` that becomes ``path`` only if the block succeeds.

    Args:
        path: the final folder.
        overwrite: replace an existing ``path``; otherwise an existing one is an error.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
    try:
        yield tmp
        follow_umask(tmp)  # mkdtemp makes it private (0700), safetensors writes 0600: outputs follow the umask
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        # Rename the old folder aside first so that a crash here leaves one of the two whole.
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
