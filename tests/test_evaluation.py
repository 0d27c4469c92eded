"""The evaluation harness: batched greedy answers equal one-at-a-time generation, answer NLL equals a float64
per-example computation, and grouping counts what it should. Uses the tiny random model (no training needed)."""

from __future__ import annotations

import math

import pytest
import torch

import tiny
from mode_hf.bench import evaluation, tasks
from mode_hf.bench.processor import IMAGE_PLACEHOLDER  # noqa: E402


@pytest.fixture(scope="module")
def model_and_processor():
    return tiny.tiny_model(seed=5), tiny.build_processor()


@pytest.fixture(scope="module")
def mixed_examples():
    return tasks.make_examples("vision", 3, seed=7) + tasks.make_examples("text", 3, seed=8)


def test_batched_answers_equal_single_generation(model_and_processor, mixed_examples):
    model, processor = model_and_processor
    batched = evaluation.generate_answers(model, processor, mixed_examples, max_new_tokens=5)
    single = [evaluation.generate_answers(model, processor, [e], max_new_tokens=5)[0] for e in mixed_examples]
    assert batched == single


def test_answer_nll_matches_float64_reference(model_and_processor, mixed_examples):
    model, processor = model_and_processor
    got = evaluation.answer_nll(model, processor, mixed_examples)
    eos = processor.tokenizer.eos_token
    for example, value in zip(mixed_examples, got):
        prompt = tasks.model_text(example, IMAGE_PLACEHOLDER)
        images = [example.image] if example.image is not None else None
        full = processor(text=[prompt + example.answer + eos], images=images, return_tensors="pt")
        prompt_len = processor(text=[prompt], images=images, return_tensors="pt")["input_ids"].shape[1]
        with torch.no_grad():
            logits = model(**full, use_cache=False).logits[0].double()  # [S, V]
        ids = full["input_ids"][0]
        log_probs = torch.log_softmax(logits, dim=-1)
        nll = [-float(log_probs[t - 1, ids[t]]) for t in range(prompt_len, ids.shape[0])]
        assert value == pytest.approx(sum(nll) / len(nll), rel=1e-4)


def test_grouping_counts_and_accuracy(model_and_processor, mixed_examples, monkeypatch):
    model, processor = model_and_processor
    truth = {e.prompt: e.answer for e in mixed_examples}
    # a stand-in generator that answers every text example right and every vision example wrong
    monkeypatch.setattr(
        evaluation, "generate_answers",
        lambda m, p, chunk, n: [truth[e.prompt] if e.family == "text" else "?" for e in chunk],
    )
    result = evaluation.evaluate(model, processor, mixed_examples, batch_size=4)
    assert result["families"]["text"]["accuracy"] == 1.0 and result["families"]["vision"]["accuracy"] == 0.0
    assert result["families"]["text"]["count"] == 3 and result["families"]["vision"]["count"] == 3
    assert sum(r["count"] for r in result["tasks"].values()) == 6
    assert "| text |" in evaluation.format_table(result)


def test_generation_budget_covers_the_longest_answer(model_and_processor):
    processor = model_and_processor[1]
    longest = max((e for e in evaluation.held_out(40)), key=lambda e: len(e.answer))

    class Echo:
        """Stands in for a model that always produces exactly the reference answer + eos."""

        device = torch.device("cpu")

        def eval(self):
            return self

        def generate(self, input_ids, max_new_tokens, **kwargs):
            answer = processor.tokenizer(longest.answer + processor.tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            new = torch.tensor(answer[:max_new_tokens])[None].expand(input_ids.shape[0], -1)
            return torch.cat([input_ids, new], dim=1)

        def __call__(self, input_ids, **kwargs):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, len(processor.tokenizer))})()

    result = evaluation.evaluate(Echo(), processor, [longest])
    assert len(longest.answer) >= 11 and result["families"][longest.family]["accuracy"] == 1.0


def float64_log_probs(model, processor, example) -> tuple[torch.Tensor, int]:
    """log-softmax [S, V] of the full sequence (prompt + answer + eos) in float64, and the prompt length."""
    prompt = tasks.model_text(example, IMAGE_PLACEHOLDER)
    images = [example.image] if example.image is not None else None
    full = processor(text=[prompt + example.answer + processor.tokenizer.eos_token], images=images, return_tensors="pt")
    prompt_len = processor(text=[prompt], images=images, return_tensors="pt")["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**full, use_cache=False).logits[0].double()  # [S, V]
    return torch.log_softmax(logits, dim=-1), prompt_len


def test_kl_to_a_reference_matches_float64(model_and_processor, mixed_examples):
    """KL(reference || model) per example, over the answer positions and (text-only) over every position, against
    the float64 sum p_ref (log p_ref - log p) on the same sequences; 0 against itself."""
    model, processor = model_and_processor
    other = tiny.tiny_model(seed=5)
    with torch.no_grad():
        for name, parameter in other.named_parameters():
            if "experts" in name:
                parameter.mul_(-2.0)  # the same model with its experts flipped and doubled: another distribution
    reference = evaluation.evaluate(model, processor, mixed_examples, batch_size=4, keep_distributions=True)
    again = evaluation.evaluate(model, processor, mixed_examples, batch_size=4, reference=reference["distributions"])
    assert all(e["kl"] == 0.0 for e in again["examples"]) and again["families"]["text"]["kl_text"] == 0.0
    damaged = evaluation.evaluate(other, processor, mixed_examples, batch_size=4, reference=reference["distributions"])
    for example, scored in zip(mixed_examples, damaged["examples"]):
        ref, prompt_len = float64_log_probs(model, processor, example)
        got, _ = float64_log_probs(other, processor, example)
        per_position = (ref.exp() * (ref - got)).sum(dim=-1)  # [S]: position t predicts token t + 1
        assert scored["kl"] == pytest.approx(float(per_position[prompt_len - 1 : -1].mean()), rel=1e-3)
        if example.image is None:
            assert scored["kl_text"] == pytest.approx(float(per_position[:-1].mean()), rel=1e-3)
        else:
            assert scored["kl_text"] is None
    kls = [e["kl"] for e in damaged["examples"] if e["family"] == "text"]
    assert min(kls) > 0 and damaged["families"]["text"]["kl"] == pytest.approx(sum(kls) / len(kls))


def test_margins_of_a_handmade_distribution():
    log_probs = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.4, 0.4, 0.2]]))
    got = evaluation.margins(log_probs, torch.tensor([0, 2, 1]))
    expected = [math.log(0.5 / 0.3), math.log(0.3 / 0.6), 0.0]  # right, wrong by a factor 2, a tie
    assert got.tolist() == pytest.approx(expected, abs=1e-6)


def test_answer_margins_match_float64_and_say_whether_the_answer_is_right(mixed_examples):
    """Each example's margin: min over its answer positions (answer + eos) of log p(right token) - max log p(other),
    against float64 on the same sequence; positive exactly where greedy decoding gives the answer."""
    from transformers import AutoModelForImageTextToText

    from mode_hf.hf.checkpoint import load_processor

    trained = AutoModelForImageTextToText.from_pretrained(evaluation.BUNDLED_MODEL, dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if "experts" in name:
                parameter.mul_(0.6)  # a damaged copy of the bundled model: half of these answers right, half wrong
    processor = load_processor(evaluation.BUNDLED_MODEL)
    result = evaluation.evaluate(trained, processor, mixed_examples, batch_size=4)
    assert 0 < sum(e["correct"] for e in result["examples"]) < len(mixed_examples)
    eos = processor.tokenizer.eos_token_id
    for example, scored in zip(mixed_examples, result["examples"]):
        log_probs, prompt_len = float64_log_probs(trained, processor, example)
        ids = processor(text=[tasks.model_text(example, IMAGE_PLACEHOLDER) + example.answer + processor.tokenizer.eos_token],
                        images=[example.image] if example.image is not None else None, return_tensors="pt")["input_ids"][0]
        assert int(ids[-1]) == eos
        answer = log_probs[prompt_len - 1 : -1]  # the positions predicting the answer tokens and eos
        targets = ids[prompt_len:]
        right = answer.gather(1, targets[:, None])[:, 0]
        other = torch.stack([torch.cat([row[:t], row[t + 1 :]]).max() for row, t in zip(answer, targets.tolist())])
        assert scored["margin"] == pytest.approx(float((right - other).min()), abs=1e-4)
        assert (scored["margin"] > 0) == scored["correct"]
