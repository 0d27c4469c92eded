"""The benchmark tasks: deterministic, balanced, correct answers, calibration apart from evaluation, and vision
tokens dominating vision samples."""

from __future__ import annotations

import re

import pytest
from PIL import Image, ImageChops

from mode_hf.bench import evaluation, tasks
from mode_hf.bench.processor import IMAGE_PLACEHOLDER  # noqa: E402


def test_deterministic_per_seed():
    a, b = tasks.make_examples("vision", 10, 5), tasks.make_examples("vision", 10, 5)
    assert [(e.task, e.prompt, e.answer) for e in a] == [(e.task, e.prompt, e.answer) for e in b]
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b))
    assert [e.answer for e in tasks.make_examples("text", 20, 6)] != [e.answer for e in tasks.make_examples("text", 20, 7)]


@pytest.mark.parametrize("family, names", [("vision", tasks.VISION_TASKS), ("text", tasks.TEXT_TASKS)])
def test_balanced_over_task_types(family, names):
    examples = tasks.make_examples(family, 10 * len(names), 1)
    assert {n: sum(e.task == n for e in examples) for n in names} == {n: 10 for n in names}
    assert all(e.family == family and (e.image is not None) == (family == "vision") for e in examples)


def solve(example: tasks.Example) -> str:
    """Independent solver for the text tasks, from the prompt alone."""
    prompt = example.prompt
    if example.task == "add":
        a, b = re.fullmatch(r"(\d+)\+(\d+)=", prompt).groups()
        return str(int(a) + int(b))
    if example.task == "sort":
        return "".join(sorted(re.fullmatch(r"sort (\d+):", prompt).group(1)))
    if example.task == "lookup":
        table, key = prompt.rstrip("?").split(";")
        pairs = table.split(",")
        assert 2 <= len(pairs) <= 4 and len({pair[0] for pair in pairs}) == len(pairs)
        return {pair[0]: pair[1:] for pair in pairs}[key]
    terms = [int(t) for t in prompt.split(",")[:-1]]
    return str(terms[-1] + (terms[1] - terms[0]))


def test_weighted_sampling_follows_the_weights():
    examples = tasks.make_examples("vision", 2000, 1, weights={"shape": 3.0})
    share = sum(e.task == "shape" for e in examples) / len(examples)
    assert abs(share - 3 / 7) < 0.04, share  # shape weighs 3 against 1 for each of the other four
    assert {e.task for e in examples} == set(tasks.VISION_TASKS)
    again = tasks.make_examples("vision", 2000, 1, weights={"shape": 3.0})
    assert [(e.task, e.answer) for e in examples] == [(e.task, e.answer) for e in again]


def test_text_answers_are_right():
    for example in tasks.make_examples("text", 200, 3):
        assert solve(example) == example.answer, example


def test_vision_answers_follow_the_pixels():
    checked = 0
    for example in tasks.make_examples("vision", 100, 4):
        pixels = example.image.convert("RGB")
        colours = {c for _, c in pixels.getcolors(1 << 16)}
        if example.task == "color":
            assert tasks.COLOURS[example.answer] in colours
        if example.task == "shape":  # share of its bounding box the shape fills: 1 square, pi/4 circle, 1/2 triangle
            counts = sorted(pixels.getcolors(1 << 16))  # two colours: the shape's (fewer pixels) and the background's
            (count, _), background = counts[0], counts[-1][1]
            left, top, right, bottom = ImageChops.difference(pixels, Image.new("RGB", pixels.size, background)).getbbox()
            fill = count / ((right - left) * (bottom - top))
            assert {"square": 0.92 < fill, "circle": 0.7 < fill < 0.85, "triangle": 0.4 < fill < 0.62}[example.answer], (example.answer, fill)
            checked += 1
        if example.task == "position":
            vertical, horizontal = example.answer.split()
            background = pixels.getpixel((0, 0)) if example.answer != "top left" else pixels.getpixel((tasks.IMAGE_SIZE - 1, tasks.IMAGE_SIZE - 1))
            half = tasks.IMAGE_SIZE // 2
            x0 = 0 if horizontal == "left" else half
            y0 = 0 if vertical == "top" else half
            box = pixels.crop((x0, y0, x0 + half, y0 + half))
            assert any(c != background for _, c in box.getcolors(1 << 16))
    assert checked == 20


def test_calibration_apart_from_evaluation():
    held_out = {(e.prompt, e.answer, e.image.tobytes() if e.image else b"") for e in evaluation.held_out(50)}
    calibration = tasks.calibration_samples(64)
    assert sum("image" in s for s in calibration) == 48
    overlap = [s for s in calibration if "image" in s and any(s["image"].tobytes() == h[2] for h in held_out)]
    assert not overlap


def test_vision_tokens_dominate_vision_samples():
    processor = evaluation.build_bench_processor()
    for example in tasks.make_examples("vision", 5, 0):  # one of each task type
        text = tasks.model_text(example, IMAGE_PLACEHOLDER) + example.answer
        batch = processor(text=[text], images=[example.image], return_tensors="pt")
        vision = int((batch["input_ids"] == processor.image_token_id).sum())
        assert vision == (tasks.IMAGE_SIZE // 16) ** 2
        assert vision / (batch["input_ids"].shape[1] - vision) >= 5, example.task
    samples = tasks.calibration_samples(64)  # the mix MODE sees: vision 5-10x text over the whole set
    texts = [(IMAGE_PLACEHOLDER if "image" in s else "") + s["text"] for s in samples]
    ids = processor(text=texts, images=[s["image"] for s in samples if "image" in s], padding=True, return_tensors="pt")
    vision = int((ids["input_ids"] == processor.image_token_id).sum())
    ratio = vision / (int(ids["attention_mask"].sum()) - vision)
    assert 5 <= ratio <= 10, ratio


def test_finegrained_suite_cycles_its_tasks_and_knows_its_facts():
    suite = tasks.suite("finegrained")
    for family in ("vision", "text"):
        examples = tasks.make_examples(family, 10 * len(suite.tasks(family)), 2, suite_name="finegrained")
        assert {n: sum(e.task == n for e in examples) for n in suite.tasks(family)} == {n: 10 for n in suite.tasks(family)}
    facts = [e for e in tasks.make_examples("text", 400, 3, suite_name="finegrained") if e.task == "fact"]
    assert facts and all(tasks.FACTS[e.prompt[:-1]] == e.answer for e in facts)  # the one fixed table, any seed
    assert len(tasks.FACTS) == tasks.FACT_COUNT and all(len(v) == 2 and v.isdigit() for v in tasks.FACTS.values())
    with pytest.raises(ValueError, match="suite='other' is unknown"):
        tasks.make_examples("text", 1, 0, suite_name="other")


def test_glyphs_draw_their_pattern():
    """Each glyph image holds exactly its pattern: cropped to the ink and sampled at cell centres, the filled cells
    are the glyph's (independent of where and how large it is drawn)."""
    patterns = set(tasks.GLYPHS.values())
    assert len(patterns) == tasks.GLYPH_COUNT and all(len(name) == 2 for name in tasks.GLYPHS)
    for example in [e for e in tasks.make_examples("vision", 100, 9, suite_name="finegrained") if e.task == "glyph"]:
        pixels = example.image.convert("RGB")
        background = pixels.getpixel((0, 0)) if pixels.getpixel((0, 0)) == pixels.getpixel((159, 159)) else pixels.getpixel((159, 0))
        mask = ImageChops.difference(pixels, Image.new("RGB", pixels.size, background)).convert("L").point(lambda v: 255 if v else 0)
        pattern = tasks.GLYPHS[example.answer]
        rows = [r for r in range(tasks.GLYPH_CELLS) if any(pattern[r])]
        cols = [c for c in range(tasks.GLYPH_CELLS) if any(pattern[r][c] for r in range(tasks.GLYPH_CELLS))]
        left, top, right, bottom = mask.getbbox()
        cell = (right - left) / (cols[-1] - cols[0] + 1)
        drawn = tuple(
            tuple(bool(mask.getpixel((int(left + (c - cols[0] + 0.5) * cell), int(top + (r - rows[0] + 0.5) * cell)))) for c in range(cols[0], cols[-1] + 1))
            for r in range(rows[0], rows[-1] + 1)
        )
        assert drawn == tuple(tuple(pattern[r][c] for c in range(cols[0], cols[-1] + 1)) for r in range(rows[0], rows[-1] + 1))


def test_finegrained_calibration_is_mostly_vision():
    """The mix the fine-grained model is calibrated with: vision tokens at least 6x text tokens."""
    processor = evaluation.build_bench_processor()
    samples = tasks.calibration_samples(64, suite_name="finegrained")
    texts = [(IMAGE_PLACEHOLDER if "image" in s else "") + s["text"] for s in samples]
    ids = processor(text=texts, images=[s["image"] for s in samples if "image" in s], padding=True, return_tensors="pt")
    vision = int((ids["input_ids"] == processor.image_token_id).sum())
    assert vision / (int(ids["attention_mask"].sum()) - vision) >= 6


def test_the_knowledge_tables_are_the_same_in_every_process():
    """The fact and glyph tables must not depend on the process's hash seed: a model trained in one process is
    scored in another (they used to be shuffled from a set, whose order follows PYTHONHASHSEED)."""
    import os
    import subprocess
    import sys

    code = "from mode_hf.bench import tasks; print(tasks.KNOWLEDGE_FINGERPRINT, sorted(tasks.FACTS.items())[:3], list(tasks.GLYPHS)[:3])"
    outputs = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True,
                              text=True, check=True).stdout for seed in ("1", "2", "3")}
    assert len(outputs) == 1 and outputs.pop().startswith(tasks.KNOWLEDGE_FINGERPRINT)


def test_knowledge_tasks_are_scored_only_for_a_model_that_knows_these_tables():
    from types import SimpleNamespace

    from mode_hf.bench import evaluation

    examples = tasks.make_examples("text", 40, 3, suite_name="finegrained")
    assert any(e.task == "fact" for e in examples)
    trained = SimpleNamespace(config=SimpleNamespace(bench_knowledge=tasks.KNOWLEDGE_FINGERPRINT))
    assert evaluation.knowledge_checked(trained, examples) == examples
    older = SimpleNamespace(config=SimpleNamespace())
    with pytest.warns(UserWarning, match="cannot be scored and are left out"):
        kept = evaluation.knowledge_checked(older, examples)
    assert kept == [e for e in examples if e.task not in ("fact", "glyph")]


def _train_model():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("train_model", Path(__file__).parent.parent / "benchmarks" / "train_model.py")
    train_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_model)
    return train_model


def test_noisy_facts_replace_fact_answers_at_the_given_rate_and_nothing_else():
    """benchmarks/train_model.py --fact-noise: each fact answer replaced by another value of its length with
    probability Q; other tasks untouched; the true value stays the most frequent answer per digit."""
    import random

    train_model = _train_model()
    fact = tasks.Example("text", "fact", "abc:", "1234", None)
    other = tasks.Example("text", "add", "1+2=", "3", None)
    noisy = train_model.noisy_facts([fact] * 4000 + [other] * 100, 0.4, random.Random(0))
    facts, others = noisy[:4000], noisy[4000:]
    assert others == [other] * 100
    replaced = [e for e in facts if e.answer != fact.answer]
    assert len(replaced) == pytest.approx(1600, abs=100)  # 0.4 of 4000, binomial sd 31
    assert all(len(e.answer) == 4 and e.answer.isdigit() and e.prompt == fact.prompt for e in replaced)
    for position, digit in enumerate(fact.answer):  # p(true digit) = 1 - 0.4 + 0.4 / 10 = 0.64
        share = sum(e.answer[position] == digit for e in facts) / len(facts)
        assert share == pytest.approx(0.64, abs=0.03)
    assert train_model.noisy_facts([fact], 0.0, random.Random(0)) == [fact]


def test_runner_up_answers_replace_the_named_tasks_at_their_rates():
    """benchmarks/train_model.py --runner-up: a named task's answer becomes its last digit + 1 (9 -> 0) with
    probability Q, every other answer is untouched, and rates that would make the runner-up the majority are refused."""
    import argparse
    import random

    train_model = _train_model()
    add = tasks.Example("text", "add", "12+7=", "19", None)
    seq = tasks.Example("text", "sequence", "1,3,5,?", "7", None)
    hue = tasks.Example("vision", "hue", "hue?", "red", None)
    out = train_model.runner_up_answers([add] * 4000 + [seq] * 4000 + [hue] * 50, {"add": 0.3, "sequence": 0.1}, random.Random(0))
    adds, seqs = [e.answer for e in out[:4000]], [e.answer for e in out[4000:8000]]
    assert set(adds) == {"19", "10"} and set(seqs) == {"7", "8"}
    assert adds.count("10") == pytest.approx(1200, abs=90)  # 0.3 of 4000, binomial sd 29
    assert seqs.count("8") == pytest.approx(400, abs=60)  # 0.1 of 4000, sd 19
    assert out[8000:] == [hue] * 50 and all(e.prompt == add.prompt for e in out[:4000])
    assert train_model.runner_up_rates("add=0.3,fact=0.2") == {"add": 0.3, "fact": 0.2}
    for bad in ("add=0.5", "hue=0.2", "add=-1", "add=x"):
        with pytest.raises(argparse.ArgumentTypeError):
            train_model.runner_up_rates(bad)


def test_init_from_continues_a_saved_model_on_fresh_batches_and_keeps_every_stage(tmp_path, monkeypatch):
    """benchmarks/train_model.py --init-from: a second stage trains the saved model (its architecture and suite, not
    the command line's), on batches after the ones the first stage saw, and its record keeps both stages with the
    steps and seconds added up."""
    import json
    import sys

    import torch
    from safetensors.torch import load_file

    train_model = _train_model()
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--batch-size", "4", "--eval-per-family", "2", "--threads", "1", "--minutes", "5"]
    monkeypatch.setattr(sys, "argv", ["train_model.py", "--steps", "3", "--layers", "2", "--experts", "4", "--hidden", "64",
                                      "--moe-intermediate", "32", "--out", str(first), *common])
    train_model.main()
    seen, original = [], tasks.make_examples
    monkeypatch.setattr(tasks, "make_examples", lambda family, n, seed, *a, **k: seen.append(seed) or original(family, n, seed, *a, **k))
    monkeypatch.setattr(sys, "argv", ["train_model.py", "--init-from", str(first), "--steps", "2", "--layers", "9",
                                      "--runner-up", "add=0.3", "--out", str(second), *common])
    train_model.main()
    batches = [seed - tasks.TRAIN_SEED * 1000 for seed in seen if 0 <= seed - tasks.TRAIN_SEED * 1000 < 100]
    assert batches == [3, 3, 4, 4]  # vision and text of each step; the first stage trained on batches 0-2
    record = json.loads((second / "training.json").read_text())
    assert [s["steps"] for s in record["stages"]] == [3, 2] and record["steps"] == 5
    assert record["seconds"] == pytest.approx(sum(s["seconds"] for s in record["stages"]), abs=0.2)
    assert "--init-from" in record["stages"][1]["command"] and record["options"]["runner_up"] == {"add": 0.3}
    assert "layers" not in record["options"] and record["stages"][0]["options"]["layers"] == 2  # the ignored option is not recorded
    assert json.loads((second / "config.json").read_text())["text_config"]["num_hidden_layers"] == 2  # its own, not 9
    for name in train_model.PROCESSOR_FILES:  # the processor as it was saved, byte for byte
        assert (second / name).read_bytes() == (first / name).read_bytes(), name
    before, after = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


def test_init_from_refuses_a_model_that_learned_other_knowledge_tables(tmp_path, monkeypatch):
    """A second stage on a finegrained model trained on other fact/glyph tables would teach it new answers on top
    of old ones: train_model.py --init-from stops before training, naming the model."""
    import json
    import sys

    train_model = _train_model()
    first = tmp_path / "first"
    common = ["--batch-size", "4", "--eval-per-family", "2", "--threads", "1", "--minutes", "5"]
    monkeypatch.setattr(sys, "argv", ["train_model.py", "--suite", "finegrained", "--steps", "1", "--layers", "2", "--experts", "4",
                                      "--hidden", "64", "--moe-intermediate", "32", "--out", str(first), *common])
    train_model.main()
    config = json.loads((first / "config.json").read_text())
    config["bench_knowledge"] = "another table"
    (first / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(sys, "argv", ["train_model.py", "--init-from", str(first), "--steps", "1", "--out", str(tmp_path / "x"), *common])
    with pytest.raises(SystemExit, match="other fact/glyph tables"):
        train_model.main()
    assert not (tmp_path / "x").exists()
