"""Pushing mode checkpoints to the Hugging Face Hub: `push_to_hub` saves to a temporary directory, draws the report
pictures, writes the card showing them and uploads it all in one commit; `push_folder` uploads an already saved
directory the same way (the command line's `--push-to-hub`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from .card import REPORT_DIR, write_model_card


def push_folder(
    directory: str | os.PathLike,
    repo_id: str,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> Any:
    """Upload every file of a saved checkpoint directory (weights, config, processor, card, report pictures) to
    `repo_id` in one commit; hidden files are skipped."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(directory)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    operations = [
        CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]
    return api.create_commit(
        repo_id=repo_id,
        operations=operations,
        commit_message=commit_message or "Upload mode-hf quantized model",
        revision=revision,
        create_pr=create_pr,
    )


UPLOAD_OPTIONS = ("commit_message", "private", "token", "revision", "create_pr")  # push_folder's options


def push_to_hub(model: nn.Module, repo_id: str, **options: Any) -> Any:
    """Save `model` (weights, config with bit map), draw its report pictures, write the card showing them, and
    upload it all to `repo_id` in one commit. `options`: `push_folder`'s (UPLOAD_OPTIONS) and save_pretrained's
    `max_shard_size`; transformers' other push_to_hub options do not apply and are ignored."""
    from .report import write_report  # matplotlib: only when pushing

    upload = {k: v for k, v in options.items() if k in UPLOAD_OPTIONS}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoint"
        model.save_pretrained(folder, **{k: v for k, v in options.items() if k == "max_shard_size"})
        write_report(folder, folder / REPORT_DIR)
        write_model_card(folder, repo_id)
        return push_folder(folder, repo_id, **upload)
