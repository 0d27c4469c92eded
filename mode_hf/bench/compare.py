"""Comparing quantized models on the same held-out questions: the rows of the quality table, paired comparisons
with bootstrap intervals, and the bits each modality meets. Works on `evaluation.evaluate` results (with `kl`
against the 16-bit reference); used by benchmarks/quality.py.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch
from torch import nn

from .evaluation import mean_interval

FAMILIES = ("text", "vision")


def relative_drop(result: dict, reference: dict) -> float:
    """Mean over families of (reference accuracy - accuracy) / reference accuracy."""
    drops = [
        (ref["accuracy"] - result["families"][family]["accuracy"]) / ref["accuracy"]
        for family, ref in reference["families"].items()
        if ref["accuracy"] > 0
    ]
    return sum(drops) / len(drops)


def per_question(result: dict, family: str, metric: str) -> list[float]:
    """One family's per-question values of `metric` ("kl", "nll", "correct")."""
    return [float(e[metric]) for e in result["examples"] if e["family"] == family]


def kl_cell(result: dict, family: str) -> str:
    """Mean KL(reference || model) over the family's answer positions with its 95% bootstrap interval."""
    if not result["examples"] or result["examples"][0].get("kl") is None:
        return "0"
    mean, low, high = mean_interval(per_question(result, family, "kl"))
    return f"{mean:.4f} [{low:.4f}, {high:.4f}]"


HEADER = (
    "| bits | candidates | method | text acc | vision acc | text NLL | vision NLL | text KL [95% CI] | vision KL [95% CI] "
    "| avg rel. drop | effective bits | expert bytes |"
)


def table(rows: Sequence[dict], reference: dict) -> str:
    """The quality table: one line per row (and the 16-bit reference first)."""

    def cells(r: dict) -> str:
        text, vision = r["families"]["text"], r["families"]["vision"]
        return (
            f"{100 * text['accuracy']:.1f}% | {100 * vision['accuracy']:.1f}% | {text['nll']:.3f} | {vision['nll']:.3f} | "
            f"{kl_cell(r, 'text')} | {kl_cell(r, 'vision')} | {100 * r['relative_drop']:.1f}% | "
            f"{r['effective_bits']:.3f} | {r['expert_bytes']:,} |"
        )

    lines = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    lines.append(f"| 16 | | {reference['method']} | " + cells(reference))
    lines += [f"| {r['avg_bits']:g} | {r['candidates']} | {r['method']} | " + cells(r) for r in rows]
    return "\n".join(lines)


def paired(row: dict, base: dict, family: str) -> dict[str, Any]:
    """`row` against `base` on one family's questions: mean differences (row - base) of KL and answer NLL with 95%
    paired bootstrap intervals, and the answers each gets right where the other is wrong."""
    a, b = ([e for e in r["examples"] if e["family"] == family] for r in (row, base))
    assert [x["task"] for x in a] == [y["task"] for y in b], "rows were scored on different questions"
    out: dict[str, Any] = {}
    for metric in ("kl", "nll"):
        if a[0].get(metric) is not None:
            out[metric] = mean_interval([x[metric] - y[metric] for x, y in zip(a, b)])
    out["won"] = sum(x["correct"] and not y["correct"] for x, y in zip(a, b))
    out["lost"] = sum(y["correct"] and not x["correct"] for x, y in zip(a, b))
    out["accuracy"] = (sum(x["correct"] for x in a) - sum(y["correct"] for y in b)) / len(a)
    return out


def paired_table(rows: Sequence[dict], baseline: str, methods: Sequence[str] | None = None) -> str:
    """Every allocation row against the `baseline` row of the same budget and candidates: per family the accuracy
    difference, the KL and NLL differences with 95% paired intervals (negative: closer to the 16-bit model than the
    baseline) and answers won / lost."""
    lines = [
        f"| bits | candidates | method | text acc - {baseline} | text KL - {baseline} [95% CI] | text NLL - {baseline} [95% CI] "
        f"| text won/lost | vision acc - {baseline} | vision KL - {baseline} [95% CI] | vision won/lost |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if methods is not None and row["method"] not in methods:
            continue
        base = next((b for b in rows if b["method"] == baseline and b["avg_bits"] == row["avg_bits"]
                     and b["candidates"] == row["candidates"]), None)
        if base is None or row is base:
            continue
        if row.get("fingerprint") and row["fingerprint"] == base.get("fingerprint"):
            lines.append(f"| {row['avg_bits']:g} | {row['candidates']} | {row['method']} | same model | | | | | | |")
            continue
        text, vision = paired(row, base, "text"), paired(row, base, "vision")
        interval = lambda v: "{:+.4f} [{:+.4f}, {:+.4f}]".format(*v) if v else ""  # noqa: E731
        lines.append(
            f"| {row['avg_bits']:g} | {row['candidates']} | {row['method']} | {100 * text['accuracy']:+.1f} | "
            f"{interval(text.get('kl'))} | {interval(text.get('nll'))} | {text['won']} / {text['lost']} | "
            f"{100 * vision['accuracy']:+.1f} | {interval(vision.get('kl'))} | {vision['won']} / {vision['lost']} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def bits_met(bit_map: dict[str, list[int]], frequency: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    """Per modality, the width its tokens meet on average: sum over experts of routing frequency x width / sum of
    frequencies (vision: the tokens the redundancy filter kept)."""
    met = {}
    for modality in FAMILIES:
        weights = torch.cat([torch.tensor(frequency[n][modality], dtype=torch.float64) for n in bit_map])
        widths = torch.cat([torch.tensor(bit_map[n], dtype=torch.float64) for n in bit_map])
        met[modality] = float((weights * widths).sum() / weights.sum().clamp(min=1e-30))
    return met


def fingerprint(model: nn.Module) -> str:
    """A digest of every parameter and buffer of `model` (names, dtypes, bytes): equal digests, equal models, so an
    allocation that comes out the same as an earlier row's is scored once."""
    digest = hashlib.sha256()
    for name, tensor in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
