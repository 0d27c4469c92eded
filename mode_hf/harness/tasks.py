"""The bundled tasks as local task definitions for lm-evaluation-harness and lmms-eval (YAML beside their data; no
Hub), so that the harnesses themselves score the bundled models and their quantized versions.

    mode-hf tasks --out DIR [--suite bench|finegrained] [--per-family 200]

writes, for the held-out questions `mode-hf eval` uses (`mode_hf.bench.evaluation.held_out`, same seeds):

    DIR/data/text.jsonl, DIR/data/vision.jsonl, DIR/data/images/*.png      {"question", "answer", "task", "image"}
    DIR/lm_eval/modehf_text_<task>.yaml + modehf_text.yaml (group)          lm_eval --include_path DIR/lm_eval
    DIR/lmms_eval/modehf_{text,vision}.yaml                                 lmms-eval --include_path DIR/lmms_eval

Greedy generation until the end-of-text token, exact match against the answer: what `mode-hf eval` scores. Data
paths in the YAML are absolute (the harnesses resolve relative `data_files` against the working directory).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..bench import evaluation, tasks

EOS = "<|endoftext|>"
MAX_NEW_TOKENS = 16  # the longest bundled answer ("bottom right") is 12 characters, one token each


def _yaml(fields: dict) -> str:
    """A flat YAML document of strings, numbers, lists and dicts (json is valid YAML flow style)."""
    return "".join(f"{key}: {json.dumps(value)}\n" for key, value in fields.items())


def write(out: Path, suite: str = tasks.DEFAULT_SUITE, per_family: int = 200) -> dict[str, list[str]]:
    """Write the task folders; returns {"lm_eval": task names, "lmms_eval": task names}."""
    out = Path(out).resolve()
    data = out / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    examples = evaluation.held_out(per_family, suite_name=suite)
    rows = {"text": [], "vision": []}
    for i, example in enumerate(examples):
        row = {"question": example.prompt, "answer": example.answer, "task": example.task, "id": i}
        if example.image is not None:
            path = data / "images" / f"{i}.png"
            example.image.save(path)
            row["image"] = str(path)
        rows[example.family].append(row)
    for family, items in rows.items():
        (data / f"{family}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    metric = [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]
    written = {"lm_eval": [], "lmms_eval": []}

    # lm-eval: text tasks (its `hf` model feeds input_ids; the vision family needs lmms-eval here)
    lm_eval = out / "lm_eval"
    lm_eval.mkdir(exist_ok=True)
    names = []
    for task in sorted({r["task"] for r in rows["text"]}):
        (data / f"text_{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows["text"] if r["task"] == task))
        name = f"modehf_text_{task}"
        (lm_eval / f"{name}.yaml").write_text(_yaml({
            "task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data / f"text_{task}.jsonl")}}, "test_split": "test",
            "output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": [EOS], "max_gen_toks": MAX_NEW_TOKENS, "do_sample": False},
            "metric_list": metric, "metadata": {"version": 1.0, "suite": suite},
        }))
        names.append(name)
    (lm_eval / "modehf_text.yaml").write_text(_yaml({
        "group": "modehf_text", "task": names,
        "aggregate_metric_list": [{"metric": "exact_match", "aggregation": "mean", "weight_by_size": True}],
        "metadata": {"version": 1.0},
    }))
    written["lm_eval"] = ["modehf_text", *names]

    # lmms-eval: both families, the image as a column it hands to the model
    lmms = out / "lmms_eval"
    lmms.mkdir(exist_ok=True)
    for family in ("text", "vision"):
        fields = {
            "task": f"modehf_{family}", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data / f"{family}.jsonl")}}, "test_split": "test",
            "output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
            "generation_kwargs": {"max_new_tokens": MAX_NEW_TOKENS, "until": [EOS], "do_sample": False, "temperature": 0},
            "metric_list": metric, "metadata": {"version": 1.0, "suite": suite},
        }
        if family == "vision":
            fields["doc_to_visual"] = "!function utils.image"
        (lmms / f"modehf_{family}.yaml").write_text(_yaml(fields).replace('"!function utils.image"', "!function utils.image"))
        written["lmms_eval"].append(f"modehf_{family}")
    (lmms / "utils.py").write_text(
        '"""Written by `mode-hf tasks`: the image of a bundled vision question, for lmms-eval."""\n\n'
        "from PIL import Image\n\n\n"
        "def image(doc):\n"
        '    return [Image.open(doc["image"]).convert("RGB")]\n'
    )
    return written
