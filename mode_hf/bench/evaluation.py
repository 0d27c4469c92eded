"""Evaluation harness: exact-match accuracy of generated answers and mean answer NLL on the bundled held-out
tasks, per task type and per family (vision, text).

    python -m mode_hf.bench.evaluation CHECKPOINT_DIR [--per-family 200] [--json out.json]

Works on any checkpoint directory the bundled tasks fit: the 16-bit benchmark model or a mode-quantized one
(this module imports mode_hf, which registers the method). The processor is read from the checkpoint directory,
else from `--processor` (default: the bundled benchmark model).
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..hf.checkpoint import from_pretrained, load_processor
from . import tasks
from .processor import IMAGE_PLACEHOLDER, ImageOnlyQwen3VLProcessor, build_processor

BUNDLED_MODEL = Path(__file__).resolve().parent / "assets" / "bench_model"


@dataclass(frozen=True)
class Scored:
    """One example's outcome."""

    family: str
    task: str
    correct: bool
    nll: float  # mean negative log-likelihood per answer token (answer + eos)
    generated: str
    kl: float | None = None  # mean KL(reference || model) over the answer positions, with a reference
    kl_text: float | None = None  # the same over every text position of a text-only (language-modelling) example
    margin: float | None = None  # `Forced.margin`: how far the teacher-forced answer is from flipping


@dataclass(frozen=True)
class Forced:
    """One example's teacher-forced next-token distributions, where damage is measured (float32 log-probs)."""

    nll: float  # mean NLL per answer token (answer + eos)
    answer: torch.Tensor  # [A, V] at the positions that predict the answer tokens
    text: torch.Tensor | None  # [L - 1, V] at every position that predicts a token, for text-only examples
    margin: float = float("nan")  # min over the answer positions of `margins`: > 0 iff every answer token is the strict argmax


def build_bench_processor() -> ImageOnlyQwen3VLProcessor:
    """The benchmark model's processor: character tokenizer, 160 x 160 images -> 100 vision tokens."""
    return build_processor(tasks.IMAGE_SIZE, tasks.IMAGE_SIZE)


def processor_inputs(processor: Any, examples: Sequence[tasks.Example], texts: Sequence[str], padding_side: str) -> dict:
    """Model inputs of `texts` (one per example) with the examples' images, padded on `padding_side`."""
    images = [e.image for e in examples if e.image is not None]
    processor.tokenizer.padding_side = padding_side
    return dict(processor(text=list(texts), images=images or None, padding=True, return_tensors="pt"))


@torch.no_grad()
def generate_answers(model: Any, processor: Any, examples: Sequence[tasks.Example], max_new_tokens: int) -> list[str]:
    """Greedy completions of a batch (left padding), decoded up to the first eos."""
    batch = processor_inputs(processor, examples, [tasks.model_text(e, IMAGE_PLACEHOLDER) for e in examples], "left")
    batch = {k: v.to(model.device) for k, v in batch.items()}
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = out[:, batch["input_ids"].shape[1] :]
    return [processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new_tokens]


@torch.no_grad()
def teacher_forced(model: Any, processor: Any, examples: Sequence[tasks.Example]) -> list[Forced]:
    """Teacher-forced distributions of a batch (prompt + answer + eos, right padding): each example's mean answer
    NLL, its log-probs at the answer positions, and, for text-only examples, at every position."""
    eos = processor.tokenizer.eos_token
    prompts = [tasks.model_text(e, IMAGE_PLACEHOLDER) for e in examples]
    batch = processor_inputs(processor, examples, [p + e.answer + eos for p, e in zip(prompts, examples)], "right")
    prompt_lengths = processor_inputs(processor, examples, prompts, "right")["attention_mask"].sum(dim=1)  # [B]
    full_lengths = batch["attention_mask"].sum(dim=1)  # [B]
    logits = model(**{k: v.to(model.device) for k, v in batch.items()}, use_cache=False).logits.float().cpu()
    log_probs = F.log_softmax(logits[:, :-1], dim=-1)  # [B, S-1, V]: position t predicts token t+1
    token_nll = -log_probs.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]  # [B, S-1]
    forced = []
    for row, example in enumerate(examples):
        first, end = int(prompt_lengths[row]) - 1, int(full_lengths[row]) - 1  # predicting tokens first+1 .. end
        text = log_probs[row, :end].clone() if example.image is None else None
        answer = log_probs[row, first:end].clone()
        margin = float(margins(answer, batch["input_ids"][row, first + 1 : end + 1]).min())
        forced.append(Forced(float(token_nll[row, first:end].mean()), answer, text, margin))
    return forced


def margins(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per position, log p(target) minus the largest log-prob of any other token, from log-probs [P, V] and target
    ids [P]: positive where the target is the argmax, and how far (in nats) a perturbation must move the logits to
    change that answer token."""
    right = log_probs.gather(-1, targets[:, None])[:, 0]
    others = log_probs.scatter(-1, targets[:, None], float("-inf"))
    return right - others.amax(dim=-1)


def answer_nll(model: Any, processor: Any, examples: Sequence[tasks.Example]) -> list[float]:
    """Teacher-forced mean NLL per answer token (answer + eos) of each example (right padding)."""
    return [f.nll for f in teacher_forced(model, processor, examples)]


def kl_divergence(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Mean over positions of KL(reference || candidate) = sum_v p_ref (log p_ref - log p_cand), in float64, from
    log-probs [P, V] of the same positions."""
    reference, candidate = reference.double(), candidate.double()
    return float((reference.exp() * (reference - candidate)).sum(dim=-1).mean())


def evaluate(
    model: Any,
    processor: Any,
    examples: Sequence[tasks.Example],
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    reference: Sequence[Forced] | None = None,
    keep_distributions: bool = False,
) -> dict[str, Any]:
    """Score examples; returns {"families": {...}, "tasks": {...}, "examples": [...]}, each group with
    `accuracy`, `nll` (mean over examples) and `count`; with `reference` (the `distributions` of another model on
    the same examples, e.g. the 16-bit one) also `kl` (mean KL(reference || model) over answer positions) and, for
    groups of text-only examples, `kl_text` (over every position). `keep_distributions` adds "distributions" (one
    `Forced` per example, in order; not JSON), the reference for later calls.

    `max_new_tokens` None: the longest answer's token count + 2, so that no answer can be cut short.

    Examples of the knowledge tasks (`tasks.KNOWLEDGE_TASKS`) are left out, with a warning, for a model whose config
    does not carry this code's `tasks.KNOWLEDGE_FINGERPRINT` (`bench_knowledge`): its answers come from other tables.
    """
    examples = knowledge_checked(model, examples)
    if max_new_tokens is None:
        max_new_tokens = max(len(processor.tokenizer(e.answer, add_special_tokens=False)["input_ids"]) for e in examples) + 2
    scored: list[Scored] = []
    kept: list[Forced] = []
    model.eval()
    for start in tqdm(range(0, len(examples), batch_size), desc="mode-hf eval", unit="batch"):
        chunk = examples[start : start + batch_size]
        answers = generate_answers(model, processor, chunk, max_new_tokens)
        forced = teacher_forced(model, processor, chunk)
        references = reference[start : start + len(chunk)] if reference is not None else [None] * len(chunk)
        for example, answer, got, ref in zip(chunk, answers, forced, references):
            kl = None if ref is None else kl_divergence(ref.answer, got.answer)
            kl_text = None if ref is None or ref.text is None else kl_divergence(ref.text, got.text)
            scored.append(Scored(example.family, example.task, answer == example.answer, got.nll, answer, kl, kl_text, got.margin))
        if keep_distributions:
            kept += forced
    result = {
        "families": _group(scored, lambda s: s.family),
        "tasks": _group(scored, lambda s: f"{s.family}/{s.task}"),
        "examples": [s.__dict__ for s in scored],
    }
    if keep_distributions:
        result["distributions"] = kept
    return result


def knows_the_tables(model_or_config: Any) -> bool:
    """Whether a bundled model was trained on this code's fact and glyph tables (its config's `bench_knowledge`)."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "bench_knowledge", None) == tasks.KNOWLEDGE_FINGERPRINT


def knowledge_checked(model: Any, examples: Sequence[tasks.Example]) -> list[tasks.Example]:
    """`examples` without the knowledge tasks' when the model does not know this code's tables (warned, loudly)."""
    memorised = [e for e in examples if e.task in tasks.KNOWLEDGE_TASKS]
    if not memorised or knows_the_tables(model):
        return list(examples)
    warnings.warn(
        f"mode-hf eval: the model's config has no bench_knowledge {tasks.KNOWLEDGE_FINGERPRINT!r} (it was trained on "
        f"other fact/glyph tables, e.g. before they were the same in every process): its {len(memorised)} "
        f"{'/'.join(tasks.KNOWLEDGE_TASKS)} examples cannot be scored and are left out. Retrain it with "
        "benchmarks/train_model.py to score them.", stacklevel=3)
    return [e for e in examples if e.task not in tasks.KNOWLEDGE_TASKS]


def _group(scored: Sequence[Scored], key: Any) -> dict[str, dict[str, float]]:
    groups: dict[str, list[Scored]] = {}
    for s in scored:
        groups.setdefault(key(s), []).append(s)
    summary = {}
    for name, items in sorted(groups.items()):
        summary[name] = {
            "accuracy": sum(s.correct for s in items) / len(items),
            "nll": sum(s.nll for s in items) / len(items),
            "count": len(items),
        }
        for metric in ("kl", "kl_text"):
            values = [getattr(s, metric) for s in items if getattr(s, metric) is not None]
            if values:
                summary[name][metric] = sum(values) / len(values)
    return summary


def held_out(per_family: int, seed: int = tasks.EVAL_SEED, suite_name: str = tasks.DEFAULT_SUITE) -> list[tasks.Example]:
    """The fixed held-out sets of a suite: `per_family` examples of each family, balanced over task types."""
    return (tasks.make_examples("vision", per_family, seed, suite_name=suite_name)
            + tasks.make_examples("text", per_family, seed + 1, suite_name=suite_name))


def suite_of(model_or_config: Any) -> str:
    """The task suite a bundled model (or its config, or a mode checkpoint of it) was trained on: its config's
    `bench_suite` ("bench" for the first bundled model, which predates the attribute)."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "bench_suite", None) or tasks.DEFAULT_SUITE


def evaluate_checkpoint(path: str | Path, processor_path: str | Path | None = None, per_family: int = 200, **options: Any) -> dict:
    """Load a checkpoint (16-bit or mode-quantized) and evaluate it on the held-out sets."""
    from transformers import AutoModelForImageTextToText

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    quantized = config.get("quantization_config", {}).get("quant_method") == "mode"
    model = from_pretrained(path) if quantized else AutoModelForImageTextToText.from_pretrained(path)
    has_processor = (path / "processor_config.json").exists() or (path / "preprocessor_config.json").exists()
    processor = load_processor(processor_path or (path if has_processor else BUNDLED_MODEL))
    result = evaluate(model, processor, held_out(per_family, suite_name=suite_of(model)), **options)
    result["checkpoint"], result["quantized"] = str(path), quantized
    return result


def format_table(result: dict) -> str:
    """Markdown table of a result: one row per task and per family."""
    rows = ["| group | accuracy | answer NLL | n |", "|---|---|---|---|"]
    for section in ("tasks", "families"):
        for name, r in result[section].items():
            nll = "nan" if math.isnan(r["nll"]) else f"{r['nll']:.3f}"
            rows.append(f"| {name} | {100 * r['accuracy']:.1f}% | {nll} | {r['count']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", default=str(BUNDLED_MODEL), help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--processor", default=None, help="processor directory if the checkpoint has none")
    parser.add_argument("--per-family", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None, help="also write the full result (every example) here")
    args = parser.parse_args(argv)
    result = evaluate_checkpoint(args.checkpoint, args.processor, args.per_family, batch_size=args.batch_size)
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()


def mean_interval(values: Sequence[float], resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """The mean of `values` and its `level` bootstrap interval (percentiles of `resamples` resampled means); for
    per-question differences of two models on the same questions this is the paired interval."""
    data = torch.tensor(list(values), dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    means = data[torch.randint(len(data), (resamples, len(data)), generator=generator)].mean(dim=1)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return float(data.mean()), low, high
