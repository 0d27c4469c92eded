"""The evaluation harnesses themselves score mode checkpoints: lm-evaluation-harness (through `mode-hf-lm-eval`) and
lmms-eval (through mode-hf's `lmms_eval.models` entry point), each in its own environment, on the bundled tasks
written by `mode-hf tasks`, item by item equal to `mode-hf eval` (mode_hf.bench.evaluation) on the same questions,
for the bundled model and a 3-bit mode checkpoint of it. And the plain `lm_eval` command, which cannot import
mode-hf, refuses a mode checkpoint loudly.

Needs MODE_HF_LMEVAL_PYTHON / MODE_HF_LMMS_PYTHON (the harness environments' pythons): `bash scripts/harness_test.sh`
builds them and runs this file; without them those tests are skipped, saying why. The task export is tested always.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from mode_hf.bench import evaluation, tasks
from mode_hf.harness import tasks as harness_tasks

LMEVAL_PYTHON = os.environ.get("MODE_HF_LMEVAL_PYTHON")
LMMS_PYTHON = os.environ.get("MODE_HF_LMMS_PYTHON")
PER_FAMILY = 10
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("harness_tasks")
    harness_tasks.write(out, per_family=PER_FAMILY)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    import mode_hf
    from transformers import AutoModelForImageTextToText

    from mode_hf.hf.checkpoint import load_processor

    out = tmp_path_factory.mktemp("harness_models") / "mode3"
    processor = load_processor(evaluation.BUNDLED_MODEL)
    config = mode_hf.ModeConfig(avg_bits=3.0, group_size=32, calibration=tasks.calibration_samples(16), processor=processor)
    AutoModelForImageTextToText.from_pretrained(evaluation.BUNDLED_MODEL, quantization_config=config).save_pretrained(out)
    processor.save_pretrained(out)
    return {"bf16": evaluation.BUNDLED_MODEL, "mode3": out}


def ours(checkpoint: Path) -> dict[str, list[bool]]:
    """`mode-hf eval`'s per-question correctness on the held-out questions the task folders hold, float32."""
    from transformers import AutoModelForImageTextToText

    import mode_hf  # noqa: F401
    from mode_hf.hf.checkpoint import load_processor

    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    examples = evaluation.held_out(PER_FAMILY)
    result = evaluation.evaluate(model, load_processor(checkpoint), examples)
    return {family: [s["correct"] for s in result["examples"] if s["family"] == family] for family in ("text", "vision")}


def test_the_task_folders_hold_mode_hf_evals_questions(task_dir):
    examples = evaluation.held_out(PER_FAMILY)
    for family in ("text", "vision"):
        rows = [json.loads(line) for line in (task_dir / "data" / f"{family}.jsonl").read_text().splitlines()]
        expected = [e for e in examples if e.family == family]
        assert [(r["question"], r["answer"], r["task"]) for r in rows] == [(e.prompt, e.answer, e.task) for e in expected]
        assert all(Path(r["image"]).is_file() for r in rows) if family == "vision" else not any("image" in r for r in rows)
    for name in ("modehf_text", "modehf_text_add"):
        assert (task_dir / "lm_eval" / f"{name}.yaml").is_file()
    vision = (task_dir / "lmms_eval" / "modehf_vision.yaml").read_text()
    assert "doc_to_visual: !function utils.image" in vision and str(task_dir.resolve() / "data" / "vision.jsonl") in vision


def run(python: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([python, *args], cwd=cwd, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=900)


def samples(output: Path, task: str) -> list[dict]:
    """The harness's per-document records of `task` (one --output_path run), in document order."""
    path = next(output.rglob(f"*samples_{task}*.jsonl"))
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted(records, key=lambda r: r["doc_id"])


@pytest.mark.skipif(not LMEVAL_PYTHON, reason="lm-eval tests need MODE_HF_LMEVAL_PYTHON: run `bash scripts/harness_test.sh`")
@pytest.mark.parametrize("name", ["bf16", "mode3"])
def test_lm_eval_scores_the_bundled_tasks_as_mode_hf_eval_does(task_dir, checkpoints, tmp_path, name):
    output = tmp_path / "lm_eval"
    done = run(LMEVAL_PYTHON, ["-m", "mode_hf.harness.lm_eval", "--model", "mode-hf", "--model_args",
                               f"pretrained={checkpoints[name]},dtype=float32", "--device", "cpu", "--batch_size", "8",
                               "--include_path", str(task_dir / "lm_eval"), "--tasks", "modehf_text",
                               "--output_path", str(output), "--log_samples"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (task_dir / "data" / "text.jsonl").read_text().splitlines()]
    got = {}
    for task in sorted({r["task"] for r in rows}):
        for record in samples(output, f"modehf_text_{task}"):
            got[record["doc"]["id"]] = record["exact_match"] == 1.0
    expected = ours(checkpoints[name])["text"]
    assert [got[r["id"]] for r in rows] == expected
    results = json.loads(next(output.rglob("results_*.json")).read_text())["results"]
    assert results["modehf_text"]["exact_match,none"] == pytest.approx(sum(expected) / len(expected))


@pytest.mark.skipif(not LMEVAL_PYTHON, reason="lm-eval tests need MODE_HF_LMEVAL_PYTHON: run `bash scripts/harness_test.sh`")
def test_plain_lm_eval_refuses_a_mode_checkpoint_loudly(task_dir, checkpoints, tmp_path):
    done = run(LMEVAL_PYTHON, ["-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={checkpoints['mode3']}",
                               "--device", "cpu", "--include_path", str(task_dir / "lm_eval"), "--tasks", "modehf_text_add",
                               "--limit", "1"], tmp_path)
    assert done.returncode != 0 and "quantization" in done.stderr.lower(), done.stderr[-2000:]


@pytest.mark.skipif(not LMMS_PYTHON, reason="lmms-eval tests need MODE_HF_LMMS_PYTHON: run `bash scripts/harness_test.sh`")
@pytest.mark.parametrize("name", ["bf16", "mode3"])
def test_lmms_eval_scores_the_bundled_tasks_as_mode_hf_eval_does(task_dir, checkpoints, tmp_path, name):
    output = tmp_path / "lmms_eval"
    lmms = str(Path(LMMS_PYTHON).with_name("lmms-eval"))
    # --verbosity DEBUG: lmms-eval exits 0 after a failed evaluation otherwise
    done = subprocess.run([lmms, "eval", "--model", "mode_qwen3_vl", "--model_args",
                           f"pretrained={checkpoints[name]},min_pixels=25600,max_pixels=25600", "--include_path",
                           str(task_dir / "lmms_eval"), "--tasks", "modehf_text,modehf_vision", "--batch_size", "1",
                           "--output_path", str(output), "--log_samples", "--verbosity", "DEBUG"],
                          cwd=tmp_path, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = ours(checkpoints[name])
    for family in ("text", "vision"):
        got = [record["exact_match"] == 1.0 for record in samples(output, f"modehf_{family}")]
        assert got == expected[family], family
