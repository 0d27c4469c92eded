"""One atomic way to write a directory: build it in a staging directory beside the target, then swap it in.

Used by `save_pretrained` of mode models and by the compressed-tensors export, so that a failed or interrupted
write never leaves a half-written directory where a good one was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, purpose: str = "saving") -> Iterator[Path]:
    """A fresh staging directory beside `target` for the block to fill; on success it replaces `target` (the old
    directory, if any, is kept until the new one is in place), on any failure it is removed and `target` is left
    as it was.

    Raises:
        NotADirectoryError: `target` exists and is not a directory.
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory.")
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{purpose}-", dir=target.parent))
    try:
        yield staging
        _replace_directory(staging, target)
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
