"""The quality table's arithmetic (mode_hf.bench.compare): paired differences with bootstrap intervals, answers
won and lost, relative drops, bits met per modality, and fingerprints of identical models."""

from __future__ import annotations

import pytest
import torch

from mode_hf.bench import compare, evaluation


def result(correct: list[bool], nll: list[float], kl: list[float], family: str = "text") -> dict:
    examples = [{"family": family, "task": "t", "correct": c, "nll": n, "kl": k} for c, n, k in zip(correct, nll, kl)]
    accuracy = sum(correct) / len(correct)
    return {"families": {family: {"accuracy": accuracy, "nll": sum(nll) / len(nll)}}, "examples": examples}


def test_paired_differences_and_answers():
    row = result([True, True, False, True], [0.1, 0.2, 0.9, 0.3], [0.01, 0.02, 0.10, 0.03])
    base = result([False, True, True, False], [0.5, 0.2, 0.4, 0.8], [0.05, 0.02, 0.08, 0.09])
    out = compare.paired(row, base, "text")
    assert out["won"] == 2 and out["lost"] == 1 and out["accuracy"] == pytest.approx(0.25)
    mean, low, high = out["kl"]
    assert mean == pytest.approx((-0.04 + 0 + 0.02 - 0.06) / 4) and low <= mean <= high
    assert out["nll"][0] == pytest.approx((-0.4 + 0 + 0.5 - 0.5) / 4)


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_data():
    generator = torch.Generator().manual_seed(1)
    small = (torch.randn(50, generator=generator) + 1).tolist()
    large = (torch.randn(2000, generator=generator) + 1).tolist()
    m1, lo1, hi1 = evaluation.mean_interval(small)
    m2, lo2, hi2 = evaluation.mean_interval(large)
    assert lo1 < m1 < hi1 and lo2 < m2 < hi2 and lo2 < 1.0 < hi2
    assert (hi2 - lo2) < (hi1 - lo1) / 4  # ~1/sqrt(40) of the width; measured 0.16 vs 0.58 here
    assert evaluation.mean_interval([0.5] * 10) == (0.5, 0.5, 0.5)


def test_relative_drop_and_bits_met():
    reference = {"families": {"text": {"accuracy": 0.8}, "vision": {"accuracy": 0.5}}}
    quantized = {"families": {"text": {"accuracy": 0.6}, "vision": {"accuracy": 0.5}}}
    assert compare.relative_drop(quantized, reference) == pytest.approx((0.25 + 0.0) / 2)
    bit_map = {"a": [2, 4], "b": [3, 3]}
    frequency = {"a": {"text": [0.0, 1.0], "vision": [1.0, 0.0]}, "b": {"text": [1.0, 1.0], "vision": [0.0, 0.0]}}
    met = compare.bits_met(bit_map, frequency)
    assert met["text"] == pytest.approx((4 + 3 + 3) / 3) and met["vision"] == pytest.approx(2.0)


def test_fingerprint_tells_models_apart():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with torch.no_grad():
        b.weight.copy_(a.weight)
        b.bias.copy_(a.bias)
    assert compare.fingerprint(a) == compare.fingerprint(b)
    with torch.no_grad():
        b.bias[0] += 1e-6
    assert compare.fingerprint(a) != compare.fingerprint(b)
    assert compare.fingerprint(a) != compare.fingerprint(a.to(torch.float64))


def test_quality_report_rewritten_from_its_json_pairs_each_method_against_mode(tmp_path):
    """`benchmarks/quality.py --report-only` rewrites quality.md from a committed quality.json, with a paired table
    against mode; its mean differences are the per-question differences averaged here independently."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    shutil.copy(root / "docs/results/bench_fisher/quality.json", tmp_path / "quality.json")
    subprocess.run([sys.executable, str(root / "benchmarks/quality.py"), "--out", str(tmp_path), "--report-only"],
                   check=True, capture_output=True)
    report = (tmp_path / "quality.md").read_text()
    assert (tmp_path / "quality.png").stat().st_size > 0
    against_mode = report[report.index("Paired against mode"):].split("\n\n")[1].splitlines()
    rows = json.loads((tmp_path / "quality.json").read_text())["rows"]
    pick = lambda method: next(r for r in rows if r["method"] == method and r["avg_bits"] == 2.5  # noqa: E731
                               and r["candidates"] == "{2,3,4}")
    fisher, mode = (pick(m) for m in ("mode-fisher", "mode"))
    differences = [a["kl"] - b["kl"] for a, b in zip(fisher["examples"], mode["examples"]) if a["family"] == "text"]
    line = next(x for x in against_mode if x.startswith("| 2.5 | {2,3,4} | mode-fisher |"))
    assert line.split("|")[5].split()[0] == f"{sum(differences) / len(differences):+.4f}"
    assert not any(x.startswith("| 2.5 | {2,3,4} | mode |") for x in against_mode)  # not against itself
