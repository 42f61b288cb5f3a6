"""Writing output files whole or not at all: `atomic_write`.

Everything vaezip writes (compressed files, decoded images, archives, heatmaps,
crop banks, registry entries) goes to a temporary name in the target's folder
and is moved into place only once it is complete, so a failure or Ctrl-C never
leaves a partial file under the real name.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from vaezip.errors import OutputExistsError


def check_output(path: Path, force: bool) -> None:
    """Raise OutputExistsError if `path` is a folder, or exists and `force` is off."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists (use --force to overwrite)")
    if path.is_dir():
        raise OutputExistsError(f"{path} is a directory")


@contextmanager
def atomic_write(path: str | os.PathLike, force: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it into place when the block succeeds.

    The temporary file exists (empty) and has the mode a new file would get; the
    caller writes it by name. If the block raises, it is removed and `path` is
    untouched.

    Args:
        path: The file to write; its folder must exist.
        force: Replace `path` if it exists (a rename: of several writers the last
            wins, whole). Without, the move is a hard link, which fails if `path`
            exists, even if it appeared while the block ran: another writer of
            the same name keeps its file and this one raises.

    Raises:
        OutputExistsError: `force` is off and `path` exists.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        yield Path(tmp)
        if force:
            os.replace(tmp, path)
        else:
            _move_no_replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _move_no_replace(tmp: str, path: Path) -> None:
    """Put `tmp` at `path` unless something is there already (the caller unlinks `tmp`)."""
    exists = OutputExistsError(f"{path} exists (use --force to overwrite)")
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise exists from None
    except OSError:
        pass  # no hard links on this file system (FAT, some network shares)
    try:
        # Claim the name, then rename over the claim: a reader may briefly see an empty file.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except FileExistsError:
        raise exists from None
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(path)
        raise
