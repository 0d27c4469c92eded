"""Train the bundled benchmark model: a small Qwen3-VL-MoE, from scratch, on CPU, on mode_hf.bench.tasks data.

    python benchmarks/train_model.py [--steps 3000] [--minutes 35] [--out mode_hf/bench/assets/bench_model]
    python benchmarks/train_model.py --init-from DIR --runner-up add=0.4 --lr 5e-4 --minutes 20 --out NEW_DIR

Mixed batches of vision questions and text-only tasks, built with the real processor; loss on answer tokens
(+ eos) plus the model's own load-balancing loss (router_aux_loss_coef). Nothing decides which expert serves what.
At the end: held-out exact-match accuracy (EVAL_SEED) per task and family, and the model, processor and a
training.json record saved to --out. `--init-from` continues training a saved model (its architecture, suite and
processor; the architecture options are then ignored) as a second stage with new options, on training batches
after the ones it has seen; its training.json keeps every stage's record, and the seconds add up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import Qwen3VLMoeForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mode_hf.bench import evaluation, tasks  # noqa: E402
from mode_hf.bench.models import EOS_ID, PAD_ID, qwen3_vl_moe_config  # noqa: E402
from mode_hf.bench.processor import IMAGE_PLACEHOLDER  # noqa: E402
from mode_hf.hf.checkpoint import load_processor  # noqa: E402

IGNORE = -100
PROCESSOR_FILES = ("chat_template.jinja", "processor_config.json", "tokenizer.json", "tokenizer_config.json")
ARCHITECTURE = ("layers", "experts", "top_k", "hidden", "moe_intermediate", "vision_hidden", "vision_depth", "aux_loss")  # build_model's options


def build_model(args: argparse.Namespace) -> Qwen3VLMoeForConditionalGeneration:
    torch.manual_seed(args.seed)
    config = qwen3_vl_moe_config(
        num_layers=args.layers, num_experts=args.experts, hidden=args.hidden, moe_intermediate=args.moe_intermediate,
        vision_hidden=args.vision_hidden, vision_depth=args.vision_depth, top_k=args.top_k,
    )
    config.bench_suite = args.suite  # which tasks the model knows (read back by the evaluation harness)
    config.bench_knowledge = tasks.KNOWLEDGE_FINGERPRINT  # the fact/glyph tables it learns (checked by the evaluation)
    config.text_config.output_router_logits = True
    config.text_config.router_aux_loss_coef = args.aux_loss
    config.vision_config.num_position_embeddings = (tasks.IMAGE_SIZE // 8) ** 2
    model = Qwen3VLMoeForConditionalGeneration(config)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = PAD_ID, EOS_ID
    return model


def training_batch(processor, examples: list[tasks.Example]) -> dict:
    """Inputs with labels on answer + eos tokens only (right padding)."""
    prompts = [tasks.model_text(e, IMAGE_PLACEHOLDER) for e in examples]
    batch = evaluation.processor_inputs(processor, examples, [p + e.answer + processor.tokenizer.eos_token for p, e in zip(prompts, examples)], "right")
    prompt_lengths = evaluation.processor_inputs(processor, examples, prompts, "right")["attention_mask"].sum(dim=1)
    positions = torch.arange(batch["input_ids"].shape[1])[None, :]
    answer = (positions >= prompt_lengths[:, None]) & batch["attention_mask"].bool()
    batch["labels"] = torch.where(answer, batch["input_ids"], torch.full_like(batch["input_ids"], IGNORE))
    return batch


def examples_for_step(step: int, args: argparse.Namespace) -> list[tasks.Example]:
    vision = round(args.batch_size * args.vision_share)
    seed = tasks.TRAIN_SEED * 1000 + args.first_step + step
    examples = (tasks.make_examples("vision", vision, seed, args.task_weights, args.suite)
                + tasks.make_examples("text", args.batch_size - vision, seed, args.task_weights, args.suite))
    if args.fact_noise:
        examples = noisy_facts(examples, args.fact_noise, random.Random(seed))
    if args.runner_up:
        examples = runner_up_answers(examples, args.runner_up, random.Random(f"runner-up-{seed}"))
    return examples


def noisy_facts(examples: list[tasks.Example], noise: float, rng: random.Random) -> list[tasks.Example]:
    """Training examples with each `fact` answer replaced, with probability `noise`, by another value of the same
    length: the true value stays the most frequent one, so the held-out answer is still right, but the best a model
    can do is p(true digit) = 1 - noise + noise / 10, which bounds its answer margins near log((1 - 0.9 noise) / (noise
    / 10)) nats (2.8 at 0.4) however long it trains (the clean table gives margins of 5-10 nats, which 2-bit rounding
    does not reach)."""
    out = []
    for example in examples:
        if example.task == "fact" and rng.random() < noise:
            wrong = example.answer
            while wrong == example.answer:
                wrong = "".join(rng.choice("0123456789") for _ in example.answer)
            example = dataclasses.replace(example, answer=wrong)
        out.append(example)
    return out


DIGIT_TASKS = ("add", "count", "count6", "digit", "fact", "lookup", "sequence", "sort")  # answers that end in a digit


def runner_up(answer: str) -> str:
    """The close second answer of a digit answer: its last digit one higher (9 -> 0)."""
    return answer[:-1] + str((int(answer[-1]) + 1) % 10)


def runner_up_answers(examples: list[tasks.Example], rates: dict[str, float], rng: random.Random) -> list[tasks.Example]:
    """Training examples whose answer, for a task in `rates`, is replaced by its runner-up with probability
    rates[task]. The best a model can learn is then p(answer) = 1 - Q, p(runner-up) = Q: an answer margin of
    log((1 - Q) / Q) nats (0.85 at Q = 0.3) however long it trains, like a hard question whose second answer is
    close. The held-out answers stay true, so an exact model's greedy answer is right; a rounding error that moves
    the margin by more than that flips it (the clean tasks learn margins of 4-10 nats, which 2-bit rounding does
    not reach)."""
    return [dataclasses.replace(e, answer=runner_up(e.answer)) if e.task in rates and rng.random() < rates[e.task] else e
            for e in examples]


def train(model, processor, args: argparse.Namespace) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    start, losses, step = time.perf_counter(), [], 0

    def progress_of(s: int) -> float:  # the cosine follows steps or time, whichever runs out first
        return min(max(s / args.steps, (time.perf_counter() - start) / (60 * args.minutes)), 1.0)

    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * progress_of(s)))
    )
    model.train()
    progress = tqdm(range(args.steps), desc="training", unit="step")
    for step in progress:
        batch = training_batch(processor, examples_for_step(step, args))
        loss = model(**batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        progress.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
        if time.perf_counter() - start > 60 * args.minutes:
            break
    model.eval()
    return {"steps": step + 1, "seconds": round(time.perf_counter() - start, 1), "final_loss": sum(losses[-50:]) / len(losses[-50:])}


def held_out(model, processor, per_family: int, suite: str) -> dict:
    """Held-out accuracy and answer NLL per family and task (EVAL_SEED), printed as a table."""
    result = evaluation.evaluate(model, processor, evaluation.held_out(per_family, suite_name=suite), batch_size=32)
    print(evaluation.format_table(result))
    return {"families": result["families"], "tasks": result["tasks"]}


def task_weights(text: str) -> dict[str, float]:
    weights = {}
    for item in text.split(","):
        name, _, weight = item.partition("=")
        try:
            value = float(weight)
        except ValueError:
            value = float("nan")  # refused below like a negative weight
        if name not in tasks.GENERATORS or not value >= 0:  # NaN fails `>= 0` too
            raise argparse.ArgumentTypeError(f"{item!r}: write TASK=WEIGHT, WEIGHT >= 0, TASK one of {sorted(tasks.GENERATORS)}")
        weights[name] = value
    return weights


def runner_up_rates(text: str) -> dict[str, float]:
    rates = task_weights(text)
    for name, rate in rates.items():
        if name not in DIGIT_TASKS or not rate < 0.5:
            raise argparse.ArgumentTypeError(
                f"{name}={rate}: write TASK=Q with 0 <= Q < 0.5 (at 0.5 or more the runner-up is the more frequent "
                f"answer) and TASK one of {list(DIGIT_TASKS)} (answers ending in a digit)")
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--minutes", type=float, default=35.0, help="stop training after this much time")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--vision-share", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2, help="experts per token")
    parser.add_argument("--suite", default=tasks.DEFAULT_SUITE, choices=sorted(tasks.SUITES), help="the tasks to learn")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--moe-intermediate", type=int, default=128)
    parser.add_argument("--vision-hidden", type=int, default=32)
    parser.add_argument("--vision-depth", type=int, default=2)
    parser.add_argument("--aux-loss", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-per-family", type=int, default=200)
    parser.add_argument("--fact-noise", type=float, default=0.0, metavar="Q",
                        help="replace each training fact's answer by a random other value with probability Q (the "
                             "held-out answers stay true): bounds the facts' answer margins")
    parser.add_argument("--runner-up", type=runner_up_rates, default=None, metavar="TASK=Q,...",
                        help="replace each training answer of TASK by its runner-up (last digit + 1) with probability "
                             "Q < 0.5 (held-out answers stay true): answer margins near log((1 - Q) / Q) nats")
    parser.add_argument("--task-weights", type=task_weights, default=None, metavar="TASK=W,...",
                        help="sample task types by these weights (default 1) instead of cycling through them, e.g. shape=2,lookup=2")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 to train two variants side by side)")
    parser.add_argument("--init-from", type=Path, default=None, metavar="DIR",
                        help="continue training the model saved in DIR (a second stage; architecture options ignored)")
    parser.add_argument("--out", type=Path, default=evaluation.BUNDLED_MODEL)
    parser.add_argument("--evaluate-only", action="store_true", help="re-evaluate the model saved in --out, update its record")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.evaluate_only:
        record = json.loads((args.out / "training.json").read_text())
        model = Qwen3VLMoeForConditionalGeneration.from_pretrained(args.out)
        record["held_out"] = held_out(model, load_processor(args.out), args.eval_per_family, evaluation.suite_of(model))
        record["evaluated_by"] = " ".join(sys.argv)
        (args.out / "training.json").write_text(json.dumps(record, indent=2))
        return
    stages, args.first_step = [], 0
    if args.init_from:
        previous = json.loads((args.init_from / "training.json").read_text())
        stages = previous.get("stages") or [{k: v for k, v in previous.items() if k != "held_out"}]
        args.first_step = sum(stage["steps"] for stage in stages)  # fresh batches: those it has not trained on
        model = Qwen3VLMoeForConditionalGeneration.from_pretrained(args.init_from, dtype=torch.float32)
        model.config.text_config.output_router_logits = True
        processor, args.suite = load_processor(args.init_from), evaluation.suite_of(model)
        known = tasks.suite(args.suite)
        if set(tasks.KNOWLEDGE_TASKS) & set(known.vision + known.text) and not evaluation.knows_the_tables(model):
            raise SystemExit(f"{args.init_from} learned other fact/glyph tables than tasks.py holds now (or predates "
                             f"their fingerprint): train it from scratch")
    else:
        processor, model = evaluation.build_bench_processor(), build_model(args)
    parameters = sum(p.numel() for p in model.parameters())
    record = train(model, processor, args)
    # the load-balancing loss is a training objective; left on, generate() would compute it on decode steps
    model.config.text_config.output_router_logits = False
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)  # saved before evaluation: a failed evaluation never loses the training
    options = vars(args) | {"out": str(args.out), "init_from": args.init_from and str(args.init_from)}
    if args.init_from:
        options = {k: v for k, v in options.items() if k not in ARCHITECTURE}  # ignored: the saved model's hold
        if args.init_from.resolve() != args.out.resolve():  # its processor's files as they were (a loaded processor saves extra loader keys)
            for name in PROCESSOR_FILES:
                if (args.init_from / name).exists():
                    shutil.copyfile(args.init_from / name, args.out / name)
    else:
        processor.save_pretrained(args.out)
    record.update(parameters=parameters, seed=args.seed, command=" ".join(sys.argv), options=options)
    if stages:  # the totals first, then every stage as it was recorded
        stages.append(dict(record))
        record.update(steps=sum(s["steps"] for s in stages), seconds=round(sum(s["seconds"] for s in stages), 1), stages=stages)
    record["held_out"] = held_out(model, processor, args.eval_per_family, args.suite)
    (args.out / "training.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
