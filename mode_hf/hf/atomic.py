"""One atomic way to write a directory: build it in a staging directory beside the target, then swap it in.

Used by `save_pretrained` of mode models and by the compressed-tensors export, so that a failed or interrupted
write never leaves a half-written directory where a good one was. The swap is two renames (target -> a backup
beside it, staging -> target); a process killed between them leaves the target missing. `recover` repairs that
(every write starts with it): a complete staging directory (marked COMPLETE just before the swap) takes the
target's place, else the backup goes back; leftovers of interrupted writes are removed. `interrupted_copy` tells a
reader where the previous copy of a missing target is. Directories get the permissions of the process's umask
(a staging directory from mkdtemp would be private to its owner).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

COMPLETE = ".mode-hf-complete"  # in a staging directory: fully written, ready to be swapped in
PURPOSES = ("saving", "exporting")


def _leftovers(target: Path, kind: str) -> list[Path]:
    return sorted(p for p in target.parent.glob(f".{target.name}.{kind}-*") if p.is_dir())


def interrupted_copy(target: str | os.PathLike) -> Path | None:
    """For a `target` directory that does not exist: the previous copy an interrupted swap left beside it, or None."""
    target = Path(target).absolute()
    if target.exists():
        return None
    copies = [b / target.name for b in _leftovers(target, "old") if (b / target.name).is_dir()]
    return copies[-1] if copies else None


def recover(target: str | os.PathLike) -> str | None:
    """Repair what an interrupted write left around `target`: with the target missing, a complete staging directory
    is swapped in, else the backup of the previous copy is moved back; then the remaining staging and backup
    directories are removed. Returns what was restored (None when nothing was)."""
    target = Path(target).absolute()
    restored = None
    if not target.exists():
        complete = [s for kind in PURPOSES for s in _leftovers(target, kind) if (s / COMPLETE).exists()]
        previous = interrupted_copy(target)
        if complete:
            (complete[-1] / COMPLETE).unlink()
            os.replace(complete[-1], target)
            restored = f"the complete new copy from {complete[-1].name}"
        elif previous is not None:
            os.replace(previous, target)
            restored = f"the previous copy from {previous.parent.name}"
    for leftover in [*_leftovers(target, "old"), *(s for kind in PURPOSES for s in _leftovers(target, kind))]:
        shutil.rmtree(leftover, ignore_errors=True)
    return restored


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, purpose: str = "saving") -> Iterator[Path]:
    """A fresh staging directory beside `target` for the block to fill; on success it replaces `target` (the old
    directory, if any, is kept until the new one is in place), on any failure it is removed and `target` is left
    as it was. What an earlier interrupted write left is repaired first (`recover`).

    Raises:
        NotADirectoryError: `target` exists and is not a directory.
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory.")
    recover(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{purpose}-", dir=target.parent))
    try:
        yield staging
        os.chmod(staging, _umask_mode())
        (staging / COMPLETE).touch()
        _replace_directory(staging, target)
        (target / COMPLETE).unlink()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_directory(staging: Path, target: Path) -> None:
    if not target.exists():
        os.replace(staging, target)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, backup / target.name)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(backup / target.name, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)
