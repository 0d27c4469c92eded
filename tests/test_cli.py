"""The mode-hf command line on a tiny Qwen3-VL-MoE: quantize from JSONL / datasets calibration, the summary table,
report pictures and card, eval into the card, push capture, export refusal and re-solve, early errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors import safe_open

import tiny
from mode_hf import cli
from mode_hf.hf import guard
from mode_hf.hf import card as card_module


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "base"
    tiny.tiny_model(num_layers=2, num_experts=4, hidden=64, moe_intermediate=32).save_pretrained(path)
    tiny.build_processor().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def jsonl(base) -> Path:
    """Calibration as a user writes it: images on disk, one JSON object per line (relative paths)."""
    folder = base.parent / "calib"
    folder.mkdir()
    lines = []
    for i, sample in enumerate(tiny.calibration_samples(8, seed=3)):
        row = {"text": sample["text"]}
        if sample.get("image") is not None:
            sample["image"].save(folder / f"{i}.png")
            row["image"] = f"{i}.png"
        lines.append(json.dumps(row))
    (folder / "data.jsonl").write_text("\n".join(lines))
    return folder / "data.jsonl"


@pytest.fixture(scope="module")
def quantized(base, jsonl, tmp_path_factory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("cli-out") / "q"
    argv = ["quantize", str(base), "--avg-bits", "3", "--calib", str(jsonl), "--out", str(out), "--group-size", "32",
            "--quantizer", "rtn", "--batch-size", "2"]
    return out, cli.run(argv), " ".join(argv)


def expert_tensor_bytes(checkpoint: Path, bit_map: dict) -> int:
    """Bytes of the packed expert tensors (the guard tensors left out)."""
    total = 0
    for key, file in guard.checkpoint_keys(checkpoint).items():
        if key.startswith(tuple(bit_map)) and file != guard.GUARD_FILE:
            with safe_open(checkpoint / file, "pt") as f:
                total += f.get_tensor(key).nbytes
    return total


def test_quantize_saves_checkpoint_report_and_card(quantized, capsys) -> None:
    out, summary, _ = quantized
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["summary"]["bits_histogram"] == summary["bits_histogram"]
    assert summary["expert_bytes"]["packed"] == expert_tensor_bytes(out, config["bit_map"])  # measured on disk
    widths = [b for w in config["bit_map"].values() for b in w]
    assert summary["bits_histogram"] == {str(b): widths.count(b) for b in sorted(set(widths))}
    assert (out / "processor_config.json").exists()
    assert sorted(p.name for p in (out / "report").iterdir()) == ["bits_heatmap.png", "bytes.png", "frequency.png"]
    card = (out / "README.md").read_text()
    assert "](report/bits_heatmap.png)" in card and "](report/frequency.png)" in card
    assert "calibration data" in summary["seconds"] and "save" in summary["seconds"]


def test_summary_table_lists_histogram_bytes_and_stages(quantized) -> None:
    _, summary, _ = quantized
    table = cli.summary_table(summary)
    packed, bf16 = summary["expert_bytes"]["packed"], summary["expert_bytes"]["bf16"]
    assert f"{100 * packed / bf16:.1f}%" in table
    for bits, count in summary["bits_histogram"].items():
        assert f"{bits}-bit: {count}" in table
    assert "time: quantization" in table and "effective bits" in table


def test_eval_writes_results_into_the_card(quantized) -> None:
    out, _, _ = quantized
    result = cli.run(["eval", str(out), "--per-family", "2", "--batch-size", "4"])
    saved = json.loads((out / card_module.EVAL_FILE).read_text())
    assert saved["families"] == result["families"]
    card = (out / "README.md").read_text()
    for family, r in result["families"].items():
        assert f"| {family} | {100 * r['accuracy']:.1f}% | {r['nll']:.3f} | {r['count']} |" in card


def test_push_to_hub_uploads_card_and_pictures(base, jsonl, tmp_path, monkeypatch) -> None:
    """`quantize --push-to-hub`: one commit with weights, processor, the card naming the repo, and the pictures."""
    uploaded: dict[str, bytes] = {}

    class Repo:
        repo_id = "someone/tiny-mode"

    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", lambda self, repo_id, **kw: Repo())

    def create_commit(self, repo_id, operations, **kwargs):
        uploaded.update({op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations})
        return "commit-url"

    monkeypatch.setattr("huggingface_hub.HfApi.create_commit", create_commit)
    out = tmp_path / "q"
    cli.run(["quantize", str(base), "--calib", str(jsonl), "--out", str(out), "--group-size", "32", "--quantizer",
             "rtn", "--push-to-hub", "someone/tiny-mode"])
    expected = {"config.json", guard.INDEX_FILE, guard.PACKED_FILE, guard.GUARD_FILE, "README.md", "tokenizer.json", "processor_config.json",
                "report/bits_heatmap.png", "report/frequency.png", "report/bytes.png"}
    assert expected <= set(uploaded)
    assert uploaded["report/bits_heatmap.png"] == (out / "report" / "bits_heatmap.png").read_bytes()
    card = uploaded["README.md"].decode()
    assert 'mode_hf.from_pretrained("someone/tiny-mode")' in card and "](report/bits_heatmap.png)" in card


def test_export_refuses_per_expert_then_requantizes(quantized, base, jsonl, tmp_path, capsys) -> None:
    pytest.importorskip("compressed_tensors")
    out, _, _ = quantized
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", str(out), "--out", str(tmp_path / "ct")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "layer_uniform" in error and "--requantize-from" in error
    assert not (tmp_path / "ct").exists()

    result = cli.run(["export", str(out), "--out", str(tmp_path / "ct"), "--requantize-from", str(base),
                      "--calib", str(jsonl)])
    requantized = json.loads((tmp_path / "ct.mode-layer-uniform" / "config.json").read_text())["quantization_config"]
    assert requantized["scope"] == "layer_uniform" and requantized["symmetric"] and requantized["avg_bits"] == 3.0
    assert result["layer_widths"] == sorted({w[0] for w in requantized["bit_map"].values()})
    exported = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert exported["format"] == "pack-quantized"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--calib", "missing.jsonl"], "missing.jsonl"),
        (["--avg-bits", "9"], "avg_bits"),
        (["--calib", "bad.jsonl"], "bad.jsonl:2"),
    ],
)
def test_bad_input_fails_before_the_model_loads(argv, message, base, tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    monkeypatch.chdir(tmp_path)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr("transformers.AutoModelForImageTextToText.from_pretrained", no_loading)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["quantize", str(base), "--out", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    executable = shutil.which("mode-hf")
    if executable is None:
        pytest.skip("mode-hf is not installed as a console script here (pip install -e . installs it)")
    result = subprocess.run([executable, "--help"], capture_output=True, text=True, check=True)
    for command in ("quantize", "eval", "report", "demo", "export"):
        assert command in result.stdout


def test_quantize_text_only_model_from_a_datasets_directory(tmp_path) -> None:
    """A text-only MoE with its tokenizer as processor; calibration from a saved `datasets` directory with a
    custom text column and a DatasetDict split."""
    datasets = pytest.importorskip("datasets")
    import families

    base = tmp_path / "base"
    families.FAMILIES["qwen3_moe"].make_model().save_pretrained(base)
    families.text_tokenizer().save_pretrained(base)
    texts = [sample["text"] for sample in families.text_calibration()]
    splits = {"train": datasets.Dataset.from_dict({"prompt": texts}), "test": datasets.Dataset.from_dict({"prompt": texts[:1]})}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "data"))
    summary = cli.run(["quantize", str(base), "--calib", str(tmp_path / "data"), "--text-column", "prompt",
                       "--out", str(tmp_path / "q"), "--group-size", "16", "--quantizer", "rtn", "--no-report"])
    assert summary["tokens"]["vision"] == 0 and summary["tokens"]["text"] > 0
    assert summary["text_only_statistics"]
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert sorted(config["bit_map"]) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert not (tmp_path / "q" / "report").exists()


def test_report_command_draws_into_a_chosen_folder(quantized, tmp_path) -> None:
    out, _, _ = quantized
    card = (out / "README.md").read_text()
    written = cli.run(["report", str(out), "--out", str(tmp_path / "pictures")])
    assert sorted(p.name for p in written) == ["bits_heatmap.png", "bytes.png", "frequency.png"]
    assert all(p.parent == tmp_path / "pictures" and p.stat().st_size > 0 for p in written)
    assert (out / "README.md").read_text() == card  # pictures elsewhere: the card is left as it was
