"""Procedurally generated benchmark tasks: questions about rendered images, and text-only tasks that need
computation or memorised knowledge in the language model. Deterministic per seed; training, evaluation and
calibration use distinct seeds.

Two suites, one per bundled model (`SUITES`): "bench" (the first bundled model) and "finegrained" (the fine-grained
MoE), which adds memorised knowledge on both sides: `fact` (a fixed table of FACT_COUNT made-up names, each with a
two-digit value the model can only know by heart) and `glyph` (GLYPH_COUNT fixed 5 x 5 block patterns, each with a
made-up two-letter name). Images are 160 x 160 (100 vision tokens with patch 8, merge 2) with large uniform regions,
so many vision tokens are redundant; prompts are a few characters, so vision tokens outnumber text tokens 5-10x in a
vision sample. No transformers import.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Callable

from PIL import Image, ImageDraw, ImageFont

TRAIN_SEED, EVAL_SEED, CALIBRATION_SEED = 1000, 2000, 3000
VISION_TASKS: tuple[str, ...] = ("color", "shape", "count", "position", "digit")
TEXT_TASKS: tuple[str, ...] = ("add", "sort", "lookup", "sequence")
IMAGE_SIZE = 160
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("square", "circle", "triangle")
CORNERS = ("top left", "top right", "bottom left", "bottom right")
SHAPE_SIZES = (64, 96)  # side of the square box a shape is drawn in: 4 to 6 vision tokens across
KNOWLEDGE_SEED = 4000  # the fixed "world" of the knowledge tasks: the same table for training and evaluation
FACT_COUNT = 2048  # made-up names with a FACT_DIGITS-digit value each: more than a small model holds with a wide margin
FACT_DIGITS = 2
GLYPH_COUNT = 48  # 5 x 5 block patterns with a two-letter name each
GLYPH_CELLS = 5
GLYPH_CELL_SIZES = (12, 17)  # pixels per glyph cell: the glyph spans 60-80 px, 4-5 vision tokens across
HUES = ("red", "orange", "yellow", "lime", "green", "spring", "cyan", "azure", "blue", "violet", "magenta", "rose")
HUE_JITTER = 6  # degrees either way around each hue's centre (30 degrees apart)
MAX_COUNT = 6  # squares the fine-grained suite's count task draws at most


@dataclass(frozen=True)
class Example:
    """One question: `prompt` (no image placeholder), expected `answer` (no eos), and the image for vision tasks."""

    family: str
    task: str
    prompt: str
    answer: str
    image: Image.Image | None


def _canvas(rng: random.Random) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[rng.choice(sorted(BACKGROUNDS))])
    return image, ImageDraw.Draw(image)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]) -> None:
    left, top, right, bottom = box
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([((left + right) // 2, top), (left, bottom), (right, bottom)], fill=fill)


def _box(rng: random.Random, size: int, region: tuple[int, int, int, int] = (0, 0, IMAGE_SIZE, IMAGE_SIZE)) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = region
    left, top = rng.randrange(x0, x1 - size + 1), rng.randrange(y0, y1 - size + 1)
    return left, top, left + size, top + size


def _color(rng: random.Random) -> Example:
    image, draw = _canvas(rng)
    colour = rng.choice(sorted(COLOURS))
    _draw_shape(draw, rng.choice(SHAPES), _box(rng, rng.randrange(32, 64)), COLOURS[colour])
    return Example("vision", "color", "color?", colour, image)


def _shape(rng: random.Random) -> Example:
    image, draw = _canvas(rng)
    shape = rng.choice(SHAPES)
    _draw_shape(draw, shape, _box(rng, rng.randrange(*SHAPE_SIZES)), COLOURS[rng.choice(sorted(COLOURS))])
    return Example("vision", "shape", "shape?", shape, image)


def _count(rng: random.Random) -> Example:
    image, draw = _canvas(rng)
    count = rng.randrange(1, 5)
    fill = COLOURS[rng.choice(sorted(COLOURS))]
    cell = IMAGE_SIZE // 4
    for index in rng.sample(range(16), count):  # a 4 x 4 grid of cells, one square in each chosen cell
        row, col = divmod(index, 4)
        _draw_shape(draw, "square", _box(rng, cell * 5 // 8, (col * cell, row * cell, (col + 1) * cell, (row + 1) * cell)), fill)
    return Example("vision", "count", "count?", str(count), image)


def _position(rng: random.Random) -> Example:
    image, draw = _canvas(rng)
    corner = rng.randrange(4)
    row, col = divmod(corner, 2)
    half = IMAGE_SIZE // 2
    region = (col * half, row * half, col * half + half, row * half + half)
    _draw_shape(draw, rng.choice(SHAPES), _box(rng, rng.randrange(24, 48), region), COLOURS[rng.choice(sorted(COLOURS))])
    return Example("vision", "position", "where?", CORNERS[corner], image)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _digit(rng: random.Random) -> Example:
    image, draw = _canvas(rng)
    digit = rng.randrange(10)
    background = image.getpixel((0, 0))
    ink = (245, 245, 245) if sum(background) < 300 else (15, 15, 15)
    draw.text((rng.randrange(20, 90), rng.randrange(10, 60)), str(digit), fill=ink, font=_font(72))
    return Example("vision", "digit", "digit?", str(digit), image)


def _add(rng: random.Random) -> Example:
    a, b = rng.randrange(50), rng.randrange(50)
    return Example("text", "add", f"{a}+{b}=", str(a + b), None)


def _sort(rng: random.Random) -> Example:
    digits = [rng.randrange(10) for _ in range(4)]
    return Example("text", "sort", f"sort {''.join(map(str, digits))}:", "".join(map(str, sorted(digits))), None)


def _lookup(rng: random.Random) -> Example:
    keys = rng.sample("abcdefgh", rng.randrange(2, 5))  # 2 to 4 pairs: a model learns the retrieval on short tables first
    values = [rng.randrange(10) for _ in keys]
    asked = rng.randrange(len(keys))
    table = ",".join(f"{k}{v}" for k, v in zip(keys, values))
    return Example("text", "lookup", f"{table};{keys[asked]}?", str(values[asked]), None)


def _made_up_words(rng: random.Random, count: int, length: int) -> list[str]:
    """`count` distinct lowercase words of `length` letters, in a random order."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(letters) for _ in range(length)))
    # sorted first: a set of strings iterates in an order that depends on the process's hash seed (PYTHONHASHSEED),
    # so shuffling the set itself gave every process its own table (a model trained in one process was scored
    # against another table in the next)
    return sorted(sorted(words), key=lambda _: rng.random())


def _fact_table() -> dict[str, str]:
    """The fixed fact table: FACT_COUNT three-letter names -> FACT_DIGITS-digit values."""
    rng = random.Random(f"facts-{KNOWLEDGE_SEED}")
    return {name: f"{rng.randrange(10 ** FACT_DIGITS):0{FACT_DIGITS}d}" for name in _made_up_words(rng, FACT_COUNT, 3)}


def _glyph_table() -> dict[str, tuple[tuple[bool, ...], ...]]:
    """The fixed glyphs: GLYPH_COUNT two-letter names -> distinct 5 x 5 patterns with 8 to 16 filled cells."""
    rng = random.Random(f"glyphs-{KNOWLEDGE_SEED}")
    patterns: set[tuple[tuple[bool, ...], ...]] = set()
    while len(patterns) < GLYPH_COUNT:
        filled = set(rng.sample(range(GLYPH_CELLS * GLYPH_CELLS), rng.randrange(8, 17)))
        patterns.add(tuple(tuple(r * GLYPH_CELLS + c in filled for c in range(GLYPH_CELLS)) for r in range(GLYPH_CELLS)))
    names = _made_up_words(rng, GLYPH_COUNT, 2)
    return dict(zip(names, sorted(sorted(patterns), key=lambda _: rng.random())))


FACTS = _fact_table()
GLYPHS = _glyph_table()
KNOWLEDGE_TASKS = ("fact", "glyph")  # answers a model can only know from its training's tables
# written into a trained model's config (`bench_knowledge`) by benchmarks/train_model.py; the evaluation scores the
# knowledge tasks only for a model whose fingerprint matches these tables
KNOWLEDGE_FINGERPRINT = hashlib.sha256(json.dumps([sorted(FACTS.items()), sorted(GLYPHS.items())]).encode()).hexdigest()[:16]


def _fact(rng: random.Random) -> Example:
    name = rng.choice(list(FACTS))
    return Example("text", "fact", f"{name}:", FACTS[name], None)


def _glyph(rng: random.Random) -> Example:
    image, draw = _canvas(rng)
    name = rng.choice(list(GLYPHS))
    cell = rng.randrange(*GLYPH_CELL_SIZES)
    left, top = rng.randrange(0, IMAGE_SIZE - GLYPH_CELLS * cell + 1), rng.randrange(0, IMAGE_SIZE - GLYPH_CELLS * cell + 1)
    ink = COLOURS[rng.choice(sorted(COLOURS))]
    for r, row in enumerate(GLYPHS[name]):
        for c, filled in enumerate(row):
            if filled:
                draw.rectangle((left + c * cell, top + r * cell, left + (c + 1) * cell - 1, top + (r + 1) * cell - 1), fill=ink)
    return Example("vision", "glyph", "glyph?", name, image)


def _hue(rng: random.Random) -> Example:
    """A shape in one of 12 hues, 30 degrees apart on the colour wheel (jittered): fine colour discrimination."""
    import colorsys

    image, draw = _canvas(rng)
    index = rng.randrange(len(HUES))
    hue = (index * 30 + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 360 / 360
    fill = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.85, 0.9))
    _draw_shape(draw, rng.choice(SHAPES), _box(rng, rng.randrange(40, 72)), fill)
    return Example("vision", "hue", "hue?", HUES[index], image)


def _count_many(rng: random.Random) -> Example:
    """1 to MAX_COUNT squares, one per cell of a 4 x 4 grid."""
    image, draw = _canvas(rng)
    count = rng.randrange(1, MAX_COUNT + 1)
    fill = COLOURS[rng.choice(sorted(COLOURS))]
    cell = IMAGE_SIZE // 4
    for index in rng.sample(range(16), count):
        row, col = divmod(index, 4)
        _draw_shape(draw, "square", _box(rng, cell * 5 // 8, (col * cell, row * cell, (col + 1) * cell, (row + 1) * cell)), fill)
    return Example("vision", "count6", "how many?", str(count), image)


def _sequence(rng: random.Random) -> Example:
    start, step = rng.randrange(10), rng.randrange(1, 6)
    terms = [start + i * step for i in range(3)]
    return Example("text", "sequence", ",".join(map(str, terms)) + ",?", str(start + 3 * step), None)


GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    "color": _color, "shape": _shape, "count": _count, "position": _position, "digit": _digit, "glyph": _glyph,
    "hue": _hue, "count6": _count_many,
    "add": _add, "sort": _sort, "lookup": _lookup, "sequence": _sequence, "fact": _fact,
}


@dataclass(frozen=True)
class Suite:
    """The tasks of one bundled model, per family."""

    name: str
    vision: tuple[str, ...]
    text: tuple[str, ...]

    def tasks(self, family: str) -> tuple[str, ...]:
        """The task types of `family` ("vision" or "text").

        Raises:
            ValueError: an unknown family.
        """
        if family not in ("vision", "text"):
            raise ValueError(f"family={family!r} is unknown: choose one of ['text', 'vision']")
        return self.vision if family == "vision" else self.text


SUITES = {
    "bench": Suite("bench", VISION_TASKS, TEXT_TASKS),
    "finegrained": Suite("finegrained", ("hue", "shape", "count6", "position", "glyph"), ("add", "lookup", "sequence", "fact")),
}
DEFAULT_SUITE = "bench"


def suite(name: str) -> Suite:
    """The suite called `name`.

    Raises:
        ValueError: an unknown suite.
    """
    if name not in SUITES:
        raise ValueError(f"suite={name!r} is unknown: choose one of {sorted(SUITES)}")
    return SUITES[name]


def make_examples(family: str, count: int, seed: int, weights: dict[str, float] | None = None, suite_name: str = DEFAULT_SUITE) -> list[Example]:
    """`count` examples of `family` ("vision" or "text") of a suite, cycling over its task types, or with `weights`
    ({task: weight}, 1 for a task not named; tasks of the other family are ignored) drawn at random in those
    proportions (training's emphasis on hard tasks); deterministic in `seed`.

    Raises:
        ValueError: an unknown family or suite.
    """
    names = suite(suite_name).tasks(family)
    rng = random.Random(f"{family}-{seed}")
    if weights:
        return [GENERATORS[n](rng) for n in rng.choices(names, weights=[weights.get(n, 1.0) for n in names], k=count)]
    return [GENERATORS[names[i % len(names)]](rng) for i in range(count)]


def model_text(example: Example, image_placeholder: str) -> str:
    """The text the model sees before its answer: the image placeholder then the prompt for vision examples."""
    return (image_placeholder if example.image is not None else "") + example.prompt


def calibration_samples(count: int, seed: int = CALIBRATION_SEED, suite_name: str = DEFAULT_SUITE) -> list[dict]:
    """Raw calibration samples (~3 vision : 1 text), `{"image", "text": prompt + answer}` or `{"text"}`."""
    vision = make_examples("vision", count - count // 4, seed, suite_name=suite_name)
    text = make_examples("text", count // 4, seed, suite_name=suite_name)
    samples = [{"image": e.image, "text": e.prompt + e.answer} for e in vision] + [{"text": e.prompt + e.answer} for e in text]
    random.Random(seed).shuffle(samples)
    return samples
