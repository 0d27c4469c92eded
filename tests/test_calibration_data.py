"""load_calibration: JSONL, saved datasets directories and the bundled samples round-trip texts and pixels exactly;
every bad source, row or column fails with a CalibrationDataError that names the file, line/row and column."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from mode_hf.bench import tasks
from mode_hf.errors import CalibrationDataError
from mode_hf.calibrate.sources import load_calibration

RED, GREEN, BLUE, GRAY = (200, 30, 40), (20, 180, 60), (30, 50, 210), (90, 90, 90)


def write_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (5, 3), mode: str = "RGB") -> Path:
    value = colour[0] if mode == "L" else colour
    Image.new(mode, size, value).save(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def assert_solid(image: Image.Image, colour: tuple[int, int, int], size: tuple[int, int] = (5, 3)) -> None:
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == size
    assert image.tobytes() == Image.new("RGB", size, colour).tobytes()


# JSONL


def test_jsonl_round_trip(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    red, green, blue = (write_png(images / f"{name}.png", c) for name, c in (("red", RED), ("green", GREEN), ("blue", BLUE)))
    gray = write_png(images / "gray.png", GRAY, size=(2, 7), mode="L")
    source = write_jsonl(
        tmp_path / "calib.jsonl",
        [
            {"text": "relative", "image": "images/red.png"},
            "",
            {"text": "absolute", "image": str(green.resolve())},
            {"text": "two images", "image": ["images/blue.png", str(red)]},
            "   ",
            {"text": "text only"},
            {"text": "null image", "image": None},
            {"text": "grayscale", "image": "images/gray.png", "extra": 1},
        ],
    )
    samples = load_calibration(source)
    for path in (red, green, blue, gray):  # pixels were loaded eagerly: the files are no longer needed
        path.unlink()
    assert [s["text"] for s in samples] == ["relative", "absolute", "two images", "text only", "null image", "grayscale"]
    assert_solid(samples[0]["image"], RED)
    assert_solid(samples[1]["image"], GREEN)
    assert len(samples[2]["image"]) == 2
    assert_solid(samples[2]["image"][0], BLUE)
    assert_solid(samples[2]["image"][1], RED)
    assert samples[3]["image"] is None and samples[4]["image"] is None
    assert_solid(samples[5]["image"], (GRAY[0],) * 3, size=(2, 7))
    assert all(set(s) == {"image", "text"} for s in samples)


def test_jsonl_custom_columns_and_num_samples(tmp_path):
    write_png(tmp_path / "a.png", RED)
    write_png(tmp_path / "b.png", BLUE)
    rows = [{"caption": "one", "picture": "a.png"}, {"caption": "two", "picture": "b.png"}, "{not json"]
    source = write_jsonl(tmp_path / "calib.json", rows)
    samples = load_calibration(source, num_samples=2, image_column="picture", text_column="caption")
    assert [s["text"] for s in samples] == ["one", "two"]  # line 3 is beyond num_samples: never read
    assert_solid(samples[1]["image"], BLUE)
    with pytest.raises(CalibrationDataError, match=r"calib\.json:3: invalid JSON"):
        load_calibration(source, image_column="picture", text_column="caption")


@pytest.mark.parametrize(
    "rows, pattern",
    [
        ([{"text": "ok"}, {"text": "ok"}, '{"text": "unterminated'], r"bad\.jsonl:3: invalid JSON"),
        ([{"text": "ok"}, '["text", "a list"]'], r"bad\.jsonl:2: expected a JSON object.*got a list"),
        ([{"text": "ok"}, {"caption": "hi", "image": None}], r"bad\.jsonl:2: no text column 'text'.*\['caption', 'image'\].*text_column="),
        ([{"text": ""}], r"bad\.jsonl:1: 'text' must be a non-empty string, got ''"),
        ([{"text": "ok"}, {"text": 7}], r"bad\.jsonl:2: 'text' must be a non-empty string, got 7"),
        ([{"text": "ok", "image": 3}], r"bad\.jsonl:1, column 'image': expected an image path"),
    ],
)
def test_jsonl_bad_lines(tmp_path, rows, pattern):
    with pytest.raises(CalibrationDataError, match=pattern):
        load_calibration(write_jsonl(tmp_path / "bad.jsonl", rows))


def test_jsonl_missing_image_names_line_and_resolved_path(tmp_path):
    source = write_jsonl(tmp_path / "calib.jsonl", [{"text": "a"}, {"text": "b", "image": ["missing.png"]}])
    resolved = str(tmp_path / "missing.png")
    with pytest.raises(CalibrationDataError, match=r"calib\.jsonl:2, column 'image'\[0\]: image .* not found") as caught:
        load_calibration(source)
    assert resolved in str(caught.value)


def test_jsonl_unreadable_image_names_line_and_path(tmp_path):
    (tmp_path / "fake.png").write_text("not a png")
    source = write_jsonl(tmp_path / "calib.jsonl", [{"text": "a", "image": "fake.png"}])
    with pytest.raises(CalibrationDataError, match=r"calib\.jsonl:1, column 'image': cannot open .* as an image") as caught:
        load_calibration(source)
    assert str(tmp_path / "fake.png") in str(caught.value)


def test_jsonl_named_image_column_must_exist(tmp_path):
    write_png(tmp_path / "a.png", RED)
    source = write_jsonl(tmp_path / "calib.jsonl", [{"text": "a", "image": "a.png"}])
    with pytest.raises(CalibrationDataError, match=r"calib\.jsonl: no image column 'picture'.*\['image', 'text'\].*image_column="):
        load_calibration(source, image_column="picture")
    assert load_calibration(source)[0]["text"] == "a"


# source and count errors


def test_missing_source(tmp_path):
    with pytest.raises(CalibrationDataError, match=r"nowhere\.jsonl not found; give 'bundled', a \.jsonl file or a datasets directory"):
        load_calibration(tmp_path / "nowhere.jsonl")


def test_plain_directory_and_unknown_extension(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(CalibrationDataError, match=r"plain is a directory but not a datasets directory"):
        load_calibration(tmp_path / "plain")
    (tmp_path / "calib.txt").write_text('{"text": "a"}\n')
    with pytest.raises(CalibrationDataError, match=r"calib\.txt: unknown file extension '\.txt'"):
        load_calibration(tmp_path / "calib.txt")


def test_zero_samples(tmp_path):
    with pytest.raises(CalibrationDataError, match=r"empty\.jsonl holds no calibration samples"):
        load_calibration(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))


def test_bad_num_samples_and_split_on_jsonl(tmp_path):
    source = write_jsonl(tmp_path / "calib.jsonl", [{"text": "a"}])
    with pytest.raises(CalibrationDataError, match=r"num_samples=0"):
        load_calibration(source, num_samples=0)
    with pytest.raises(CalibrationDataError, match=r"split='train' given, but .*calib\.jsonl has no splits"):
        load_calibration(source, split="train")


# bundled


def test_bundled():
    samples = load_calibration("bundled", num_samples=6)
    expected = tasks.calibration_samples(6)
    assert [s["text"] for s in samples] == [s["text"] for s in expected]
    for sample, reference in zip(samples, expected):
        reference_image = reference.get("image")
        assert (sample["image"] is None) == (reference_image is None)
        if reference_image is not None:
            assert sample["image"].tobytes() == reference_image.tobytes()
    assert len(load_calibration("bundled")) == 32


# datasets directories


@pytest.fixture()
def datasets():
    return pytest.importorskip("datasets")


def image_dataset(datasets, texts, colours, text_column="text", image_column="image"):
    features = datasets.Features({text_column: datasets.Value("string"), image_column: datasets.Image()})
    images = [Image.new("RGB", (5, 3), c) if c is not None else None for c in colours]
    return datasets.Dataset.from_dict({text_column: texts, image_column: images}, features=features)


def test_dataset_round_trip(tmp_path, datasets):
    image_dataset(datasets, ["red", "none", "blue"], [RED, None, BLUE]).save_to_disk(tmp_path / "ds")
    samples = load_calibration(tmp_path / "ds")
    assert [s["text"] for s in samples] == ["red", "none", "blue"]
    assert_solid(samples[0]["image"], RED)
    assert samples[1]["image"] is None
    assert_solid(samples[2]["image"], BLUE)
    assert [s["text"] for s in load_calibration(str(tmp_path / "ds"), num_samples=2)] == ["red", "none"]


def test_dataset_custom_columns_lists_and_paths(tmp_path, datasets):
    green = write_png(tmp_path / "green.png", GREEN)
    features = datasets.Features(
        {"caption": datasets.Value("string"), "pictures": datasets.List(datasets.Image()), "files": datasets.Value("string")}
    )
    rows = {
        "caption": ["pair", "path only"],
        "pictures": [[Image.new("RGB", (5, 3), RED), Image.new("RGB", (5, 3), BLUE)], []],
        "files": [None, str(green)],
    }
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "ds")
    pairs = load_calibration(tmp_path / "ds", image_column="pictures", text_column="caption")
    assert [s["text"] for s in pairs] == ["pair", "path only"]
    assert_solid(pairs[0]["image"][0], RED)
    assert_solid(pairs[0]["image"][1], BLUE)
    assert pairs[1]["image"] is None
    paths = load_calibration(tmp_path / "ds", image_column="files", text_column="caption")
    assert paths[0]["image"] is None
    assert_solid(paths[1]["image"], GREEN)


def test_dataset_undecoded_image_dicts(tmp_path, datasets):
    write_png(tmp_path / "red.png", RED)
    features = datasets.Features({"text": datasets.Value("string"), "image": datasets.Image(decode=False)})
    rows = {"text": ["bytes"], "image": [{"bytes": (tmp_path / "red.png").read_bytes(), "path": None}]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "ds")
    assert_solid(load_calibration(tmp_path / "ds")[0]["image"], RED)


def test_dataset_dict_splits(tmp_path, datasets):
    splits = {"train": image_dataset(datasets, ["t0", "t1"], [RED, GREEN]), "validation": image_dataset(datasets, ["v0"], [BLUE])}
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "dd")
    assert [s["text"] for s in load_calibration(tmp_path / "dd")] == ["t0", "t1"]
    validation = load_calibration(tmp_path / "dd", split="validation")
    assert [s["text"] for s in validation] == ["v0"]
    assert_solid(validation[0]["image"], BLUE)
    with pytest.raises(CalibrationDataError, match=r"dd has no split 'test'; its splits are \['train', 'validation'\]: pass split="):
        load_calibration(tmp_path / "dd", split="test")


def test_dataset_dict_without_train(tmp_path, datasets):
    datasets.DatasetDict({"a": image_dataset(datasets, ["a0"], [RED]), "b": image_dataset(datasets, ["b0"], [RED])}).save_to_disk(tmp_path / "two")
    with pytest.raises(CalibrationDataError, match=r"two has no 'train' split; its splits are \['a', 'b'\]"):
        load_calibration(tmp_path / "two")
    datasets.DatasetDict({"only": image_dataset(datasets, ["o0"], [RED])}).save_to_disk(tmp_path / "one")
    assert [s["text"] for s in load_calibration(tmp_path / "one")] == ["o0"]


def test_dataset_split_on_single_dataset(tmp_path, datasets):
    image_dataset(datasets, ["a"], [RED]).save_to_disk(tmp_path / "ds")
    with pytest.raises(CalibrationDataError, match=r"split='train' given, but .*ds \(a single Dataset\) has no splits"):
        load_calibration(tmp_path / "ds", split="train")


def test_dataset_missing_columns(tmp_path, datasets):
    image_dataset(datasets, ["a"], [RED], text_column="caption", image_column="photo").save_to_disk(tmp_path / "ds")
    with pytest.raises(CalibrationDataError, match=r"no text column 'text'; the columns are \['caption', 'photo'\]: pass text_column= \(--text-column\)"):
        load_calibration(tmp_path / "ds")
    with pytest.raises(CalibrationDataError, match=r"no image column 'picture'; the columns are \['caption', 'photo'\]: pass image_column= \(--image-column\)"):
        load_calibration(tmp_path / "ds", text_column="caption", image_column="picture")
    text_only = load_calibration(tmp_path / "ds", text_column="caption")  # default image column absent: text only
    assert text_only == [{"image": None, "text": "a"}]


def test_dataset_bad_rows(tmp_path, datasets):
    image_dataset(datasets, ["fine", "", "fine"], [RED, RED, RED]).save_to_disk(tmp_path / "empty_text")
    with pytest.raises(CalibrationDataError, match=r"empty_text row 1: 'text' must be a non-empty string"):
        load_calibration(tmp_path / "empty_text")
    datasets.Dataset.from_dict({"text": ["a", "b"], "image": [None, "gone.png"]}).save_to_disk(tmp_path / "bad_path")
    with pytest.raises(CalibrationDataError, match=r"bad_path row 1, column 'image': image gone\.png not found"):
        load_calibration(tmp_path / "bad_path")
    features = datasets.Features({"text": datasets.Value("string"), "image": datasets.Image()})
    rows = {"text": ["a", "b", "c"], "image": [None, None, {"bytes": b"not an image", "path": None}]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "bad_bytes")
    with pytest.raises(CalibrationDataError, match=r"bad_bytes row 2, column 'image': cannot decode the image"):
        load_calibration(tmp_path / "bad_bytes")


def test_dataset_without_datasets_installed(tmp_path, datasets, monkeypatch):
    image_dataset(datasets, ["a"], [RED]).save_to_disk(tmp_path / "ds")
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install datasets"):
        load_calibration(tmp_path / "ds")
