"""Shared fixtures: a tiny Qwen3-VL-MoE saved offline, its processor, and calibration samples."""

from __future__ import annotations

import os

# Triton reads this when it is imported, and torch or transformers may import it before any test module runs:
# without a GPU, tests/test_triton.py runs the kernels on CPU tensors through the interpreter. On a CUDA machine
# set TRITON_INTERPRET=0 to run them compiled (benchmarks/gpu_check.py does).
os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import mode_hf  # noqa: F401  (registers the "mode" quantization method)
import tiny


@pytest.fixture(scope="session")
def processor():
    return tiny.build_processor()


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-base")
    tiny.tiny_model(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def samples():
    return tiny.calibration_samples(12, seed=3)


@pytest.fixture(scope="session")
def eval_batch(processor):
    rng = random.Random(11)
    images = [tiny.draw_scene(rng)[0] for _ in range(2)]
    texts = ["<|vision_start|><|image_pad|><|vision_end|>what is here?", "<|vision_start|><|image_pad|><|vision_end|>and here, which colour?"]
    return dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())
