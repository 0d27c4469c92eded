"""Calibration samples from a user-given source: the bundled task samples, a JSON Lines file of texts and image
paths, or a `datasets` directory saved with `save_to_disk`.

Every sample is `{"image": PIL.Image.Image | list[PIL.Image.Image] | None, "text": str}` (RGB images, fully loaded,
their files closed); `calibration.build_batches` turns samples into model inputs. Rows are validated as they are
read, so a bad row fails here, naming its file and line (or row index) and column, before any calibration runs.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from PIL import Image

from ..errors import CalibrationDataError

logger = logging.getLogger(__name__)

BUNDLED = "bundled"
BUNDLED_DEFAULT_COUNT = 32
DEFAULT_IMAGE_COLUMN = "image"
JSONL_SUFFIXES = (".jsonl", ".json")
DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # written by save_to_disk
SOURCE_HINT = "give 'bundled', a .jsonl file or a datasets directory saved with save_to_disk"

Sample = dict[str, Any]


def load_calibration(
    source: str | os.PathLike,
    *,
    num_samples: int | None = None,
    image_column: str = DEFAULT_IMAGE_COLUMN,
    text_column: str = "text",
    split: str | None = None,
) -> list[Sample]:
    """Calibration samples `{"image": PIL image | list of them | None, "text": str}` from `source`.

    Sources:
        - the string `"bundled"`: `tasks.calibration_samples(num_samples or 32)`, the samples shipped with mode-hf.
        - a `.jsonl` / `.json` file, one JSON object per line (blank lines skipped): `text_column` holds the text;
          `image_column` holds an image path (relative paths resolve against the file's directory), a list of
          paths, or null / nothing for a text-only sample.
        - a directory saved with `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (needs `datasets`). Of a
          DatasetDict, `split` is used: by default "train", or the only split. The image column may hold decoded
          images (the `datasets.Image` feature), `{"bytes", "path"}` dicts, paths (relative to the working
          directory), lists of these, or None.

    A source without `image_column` gives text-only samples when `image_column` is left at "image"; a column named
    explicitly must exist. Images are converted to RGB.

    Args:
        source: "bundled", or the path of a JSONL file or a saved datasets directory.
        num_samples: take the first `num_samples` rows, in file/dataset order; only those rows are read and
            validated. None takes every row (32 samples for "bundled"). Fewer rows than asked for is not an error.
        image_column: the key/column holding images.
        text_column: the key/column holding texts (non-empty strings).
        split: the split of a DatasetDict directory; only valid for one.

    Raises:
        CalibrationDataError: a missing or unrecognised source, a missing column, a bad row or image, an unknown
            or ambiguous split, `num_samples` < 1, or no samples at all.
        ImportError: a datasets directory while `datasets` is not installed.
    """
    if num_samples is not None and num_samples < 1:
        raise CalibrationDataError(f"num_samples={num_samples}: give a positive count, or None for every row.")
    if isinstance(source, str) and source == BUNDLED:
        samples = _bundled(num_samples, split)
    else:
        samples = _from_path(Path(source), num_samples, image_column, text_column, split)
    if not samples:
        raise CalibrationDataError(f"{source} holds no calibration samples: add rows to it, or {SOURCE_HINT}.")
    if num_samples is not None and len(samples) < num_samples:
        logger.warning("%s has %d calibration samples, fewer than num_samples=%d; using all of them.", source, len(samples), num_samples)
    if all(sample["image"] is None for sample in samples):
        logger.warning("%s: no sample has an image in column %r; calibrating on text only.", source, image_column)
    return samples


def _bundled(num_samples: int | None, split: str | None) -> list[Sample]:
    from ..bench import tasks  # renders images: only when asked for

    _no_split(split, BUNDLED)
    return [{"image": s.get("image"), "text": s["text"]} for s in tasks.calibration_samples(num_samples or BUNDLED_DEFAULT_COUNT)]


def _from_path(path: Path, num_samples: int | None, image_column: str, text_column: str, split: str | None) -> list[Sample]:
    if not path.exists():
        raise CalibrationDataError(f"calibration source {path} not found; {SOURCE_HINT}.")
    if path.is_dir():
        if not any((path / marker).is_file() for marker in DATASET_MARKERS):
            raise CalibrationDataError(
                f"{path} is a directory but not a datasets directory (it has none of {', '.join(DATASET_MARKERS)}); {SOURCE_HINT}."
            )
        return _load_saved_dataset(path, num_samples, image_column, text_column, split)
    if path.suffix.lower() not in JSONL_SUFFIXES:
        raise CalibrationDataError(f"{path}: unknown file extension {path.suffix!r} (expected .jsonl or .json lines); {SOURCE_HINT}.")
    _no_split(split, path)
    return _load_jsonl(path, num_samples, image_column, text_column)


def _no_split(split: str | None, source: Any) -> None:
    if split is not None:
        raise CalibrationDataError(f"split={split!r} given, but {source} has no splits: only a DatasetDict directory has; leave split unset.")


def _load_jsonl(path: Path, num_samples: int | None, image_column: str, text_column: str) -> list[Sample]:
    samples: list[Sample] = []
    keys_seen: set[str] = set()
    with path.open("rb") as lines:  # bytes: json.loads detects the encoding (and a BOM) line by line
        for line_number, line in enumerate(lines, start=1):
            if num_samples is not None and len(samples) >= num_samples:
                break
            if line.strip():
                where = f"{path}:{line_number}"
                row = _json_object(line, where)
                keys_seen.update(row)
                samples.append(_sample(row, where, text_column, image_column, base_dir=path.absolute().parent))
    if samples and image_column != DEFAULT_IMAGE_COLUMN and image_column not in keys_seen:
        raise _missing_column(str(path), "image", image_column, sorted(keys_seen), "keys on its lines")
    return samples


def _json_object(line: bytes, where: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise CalibrationDataError(f"{where}: invalid JSON: {error}; write one JSON object per line.") from error
    if not isinstance(row, dict):
        raise CalibrationDataError(
            f'{where}: expected a JSON object like {{"text": ..., "image": ...}}, got a {type(row).__name__}; write one object per line.'
        )
    return row


def _load_saved_dataset(path: Path, num_samples: int | None, image_column: str, text_column: str, split: str | None) -> list[Sample]:
    datasets = _import_datasets()
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        split = _choose_split(path, list(loaded), split)
        dataset, name = loaded[split], f"{path} (split {split!r})"
    else:
        _no_split(split, f"{path} (a single Dataset)")
        dataset, name = loaded, str(path)
    if text_column not in dataset.column_names:
        raise _missing_column(name, "text", text_column, dataset.column_names, "columns")
    if image_column not in dataset.column_names and image_column != DEFAULT_IMAGE_COLUMN:
        raise _missing_column(name, "image", image_column, dataset.column_names, "columns")
    dataset = dataset.select_columns([c for c in (text_column, image_column) if c in dataset.column_names])
    count = len(dataset) if num_samples is None else min(num_samples, len(dataset))
    return [_sample(_dataset_row(dataset, index, name, image_column), f"{name} row {index}", text_column, image_column) for index in range(count)]


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as error:
        raise ImportError("loading a saved datasets directory needs the `datasets` package: pip install datasets") from error
    return datasets


def _choose_split(path: Path, splits: list[str], split: str | None) -> str:
    if split is None and "train" in splits:
        return "train"
    if split is None and len(splits) == 1:
        return splits[0]
    if split is None or split not in splits:
        wanted = "has no 'train' split" if split is None else f"has no split {split!r}"
        raise CalibrationDataError(f"{path} {wanted}; its splits are {splits}: pass split= (--split) with one of them.")
    return split


def _dataset_row(dataset: Any, index: int, name: str, image_column: str) -> Mapping[str, Any]:
    try:
        return dataset[index]  # decodes `datasets.Image` features
    except (OSError, ValueError) as error:  # unreadable image bytes, or a path that is gone
        raise CalibrationDataError(f"{name} row {index}, column {image_column!r}: cannot decode the image: {error}") from error


def _missing_column(where: str, kind: str, column: str, available: list[str], noun: str) -> CalibrationDataError:
    return CalibrationDataError(
        f"{where}: no {kind} column {column!r}; the {noun} are {available}: pass {kind}_column= (--{kind}-column) with one of them."
    )


def _sample(row: Mapping[str, Any], where: str, text_column: str, image_column: str, base_dir: Path | None = None) -> Sample:
    """A validated sample from a row; `where` names the row in errors (file:line, or dataset row index)."""
    if text_column not in row:
        raise _missing_column(where, "text", text_column, sorted(row), "keys on this line")
    text = row[text_column]
    if not isinstance(text, str) or not text.strip():
        raise CalibrationDataError(f"{where}: {text_column!r} must be a non-empty string, got {text!r:.80}.")
    return {"image": _images(row.get(image_column), f"{where}, column {image_column!r}", base_dir), "text": text}


def _images(value: Any, where: str, base_dir: Path | None) -> Image.Image | list[Image.Image] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [_open_image(item, f"{where}[{i}]", base_dir) for i, item in enumerate(value)] or None
    return _open_image(value, where, base_dir)


def _open_image(reference: Any, where: str, base_dir: Path | None) -> Image.Image:
    """An RGB image, fully loaded, from a PIL image, a path (relative to `base_dir`, else the working directory),
    or a `{"bytes", "path"}` dict as `datasets` stores images."""
    if isinstance(reference, Image.Image):
        return reference.convert("RGB")  # convert loads the pixels, leaving no open file behind
    if isinstance(reference, dict) and reference.get("bytes") is not None:
        return _decode(io.BytesIO(reference["bytes"]), where, "its image bytes")
    path = reference.get("path") if isinstance(reference, dict) else reference
    if not isinstance(path, (str, os.PathLike)):
        raise CalibrationDataError(
            f"{where}: expected an image path, a list of paths or null, got {type(reference).__name__} {reference!r:.80}."
        )
    resolved = Path(path).expanduser() if base_dir is None else base_dir / Path(path).expanduser()
    if not resolved.is_file():
        raise CalibrationDataError(f"{where}: image {resolved} not found; fix the path (relative paths resolve against {base_dir or Path.cwd()}).")
    return _decode(resolved, where, str(resolved))


def _decode(file: Path | io.BytesIO, where: str, what: str) -> Image.Image:
    try:
        with Image.open(file) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise CalibrationDataError(f"{where}: cannot open {what} as an image: {error}") from error
