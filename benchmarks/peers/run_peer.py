"""Quantize the routed experts of a Qwen3-VL-MoE with a peer library, through its own public API, and save the peer's
own packed checkpoint. Standalone: run it with the peer venv's python (benchmarks/peers/setup.sh); it never imports
mode_hf.

    VENV/bin/python benchmarks/peers/run_peer.py --peer {autoround,llmcompressor,gptqmodel,gptqconfig} \
        --model DIR --calibration FILE.jsonl --bits B --group-size G --out DIR [--iters N] [--threads 1]

Calibration: FILE.jsonl lines {"image": "/abs/path.png" or null, "text": "..."} (benchmarks/peers/write_calibration.py
writes mode-hf's own samples). Every peer gets these samples, as close to mode-hf's own model inputs as its API
allows: mode-hf feeds `<|vision_start|><|image_pad|><|vision_end|>` + text with the image (text alone for a text-only
sample), with no chat template; where a peer insists on a chat template, the template given renders exactly that.

What each peer does (symmetric int, B bits, group G, ONLY the routed experts unless said otherwise):
- autoround (AutoRound SignRound, `iters` steps): the model's fused experts are unfused by AutoRound itself into
  per-expert Linears; every other Linear of the decoder blocks is set to 16 bits in `layer_config`. Calibration
  (`--autoround-calib inputs`, the default): the processor outputs of the samples, one per batch, passed as
  `dataset` (a list of input dicts; AutoRound's MLLM calibrator runs `model(**batch)`), so images and text-only
  samples both go in; batch_size=1 (samples differ in length; AutoRound's collator cannot pad) with
  gradient_accumulate_steps 8 (`--autoround-accum`), i.e. its default batch of 8 samples per step.
  `--autoround-calib llava`: the offline LLaVA-json route of FINDINGS (images only: a LLaVA row needs an image, so
  text-only samples are dropped), via `dataset="liuhaotian/llava_conv_58k"` written in a temp dir (the cwd during
  quantize), `extra_data_dir`, a chat template and batch_size=1. Saved with `format="auto_round"` (GPTQ packing).
- llmcompressor (GPTQModifier, oneshot): the model is loaded in bfloat16 (the scales are stored in the model dtype:
  16-bit like the other peers'); `targets` = the per-expert Linears llm-compressor makes of the fused experts
  (`moe_calibrate_all_experts`, its default True, `--llmc-all-experts 0` to route); one image sample per batch as
  [1, seq] tensors: text-only samples are dropped (the traced sequential pipeline needs pixel_values in every
  batch: "TypeError: forward() missing 2 required positional arguments: 'pixel_values' and 'image_grid_thw'").
  Saved compressed (pack-quantized).
- gptqmodel (GPTQModel GPTQ): image conversations only (GPTQModel 7.6.0 fails on a set mixing text-only
  conversations, IndexError in forward_executor.run_single), `dynamic` excludes attention and any dense MLP;
  GPTQMODEL_CPU_WORKERS=2 and offload_to_disk=False. Saved in GPTQ v1 format.
- gptqconfig (transformers GPTQConfig, optimum + gptqmodel kernels): transformers' GPTQ quantizes nn.Linear only,
  so the fused 3-D experts CANNOT be reached: it quantizes the attention projections, as transformers does, and
  leaves the experts dense. Calibration: the samples' texts only (optimum keeps input_ids and attention_mask of any
  dataset, so images cannot reach the model). The composite Qwen3-VL-MoE config has no `use_cache`,
  which optimum reads: it is set to False on the config passed to from_pretrained.

Writes --out/peer_run.json: peer, its version, transformers and torch versions, the options passed, seconds, the
modules it quantized (read from the saved checkpoint: modules with packed weights) and their count, and the
calibration samples given / passed to the peer / seen by the model (distinct samples at the embedding, with and
without images, and vision-tower calls). On failure: the verbatim traceback on stderr, peer_run.json with
"error", exit status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as metadata
import json
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

PEERS = ("autoround", "llmcompressor", "gptqmodel", "gptqconfig")
DISTRIBUTION = {"autoround": "auto-round", "llmcompressor": "llmcompressor", "gptqmodel": "gptqmodel", "gptqconfig": "optimum"}
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"  # one image in a prompt (mode_hf.bench.processor)
# A chat template that renders a conversation exactly as mode-hf feeds a sample: image placeholders, then the text.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}" + IMAGE_PLACEHOLDER + "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
)
EXPERT_LINEAR = re.compile(r"\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)$")  # a routed expert, unfused
PACKED_SUFFIXES = (".qweight", ".weight_packed")  # GPTQ / compressed-tensors packed weights


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer", choices=PEERS, required=True)
    p.add_argument("--model", required=True, help="the 16-bit model directory")
    p.add_argument("--calibration", required=True, help='JSON Lines: {"image": path or null, "text": str}')
    p.add_argument("--bits", type=int, required=True, choices=(2, 3, 4, 8))
    p.add_argument("--group-size", type=int, required=True)
    p.add_argument("--out", required=True, help="directory for the peer's own checkpoint and peer_run.json")
    p.add_argument("--iters", type=int, default=200, help="AutoRound SignRound steps per block (its default 200; 0 = RTN)")
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads")
    p.add_argument("--autoround-calib", choices=("inputs", "llava"), default="inputs")
    p.add_argument("--autoround-accum", type=int, default=8,
                   help="AutoRound gradient_accumulate_steps over batches of 1 sample (8 = its default batch of 8)")
    p.add_argument("--llmc-all-experts", type=int, choices=(0, 1), default=1,
                   help="llm-compressor moe_calibrate_all_experts (its default 1: every token through every expert)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# shared: processor, calibration samples, model inputs, what the model saw


def processor_class() -> type:
    """mode_hf.bench.processor.ImageOnlyQwen3VLProcessor, copied (a peer venv has no mode_hf)."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        """Qwen3-VL's processor without the video processor (which needs torchvision)."""

        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kwargs: Any):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImageOnlyQwen3VLProcessor


def load_processor(model_dir: str) -> Any:
    processor = processor_class().from_pretrained(model_dir)
    processor.chat_template = CHAT_TEMPLATE
    return processor


def load_samples(path: str) -> list[dict]:
    """[{"image": PIL RGB image or None, "image_path": str or None, "text": str}] in file order."""
    from PIL import Image

    samples = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        image_path = row.get("image")
        image = None
        if image_path:
            with Image.open(image_path) as im:
                image = im.convert("RGB")
        if not isinstance(row.get("text"), str):
            raise ValueError(f"{path}:{number}: no text")
        samples.append({"image": image, "image_path": image_path, "text": row["text"]})
    if not samples:
        raise ValueError(f"{path}: no calibration samples")
    return samples


def prompt(sample: dict) -> str:
    """The text mode-hf feeds for a sample (mode_hf.calibrate.inputs._prompt)."""
    return (IMAGE_PLACEHOLDER if sample["image"] is not None else "") + sample["text"]


def encode(processor: Any, sample: dict) -> dict:
    """One sample's model inputs, [1, seq] (plus pixel_values / image_grid_thw with an image)."""
    images = [sample["image"]] if sample["image"] is not None else None
    return dict(processor(text=[prompt(sample)], images=images, return_tensors="pt"))


class Seen:
    """What calibration actually ran through the model: distinct samples at the text embedding (input ids plus the
    pixels the vision tower got in the same forward), and vision-tower calls. Peer-independent (forward hooks)."""

    def __init__(self, model: Any, image_token_id: int):
        self.image_token_id = image_token_id
        self.samples: dict[tuple, bool] = {}  # key -> has image tokens
        self.vision_calls = 0
        self.bad_vision_calls = 0
        self.forwards = 0  # embedding calls with real tensors (a pipeline may run a sample more than once)
        self._pending: list = []  # [ids key, has image] of the current forward, waiting for its pixels
        inner = model.model if hasattr(model, "model") else model
        self._handles = [
            inner.language_model.embed_tokens.register_forward_pre_hook(self._embed),
            inner.visual.register_forward_pre_hook(self._visual, with_kwargs=True),
        ]

    @staticmethod
    def _digest(t: Any) -> str | None:
        import torch

        if not isinstance(t, torch.Tensor) or t.device.type == "meta" or type(t) is not torch.Tensor:
            return None
        return hashlib.sha1(t.detach().cpu().contiguous().view(-1).to(torch.float32).numpy().tobytes()).hexdigest()

    def _flush(self) -> None:
        if self._pending:
            key, has_image, pixels = self._pending
            self.samples[(key, pixels)] = has_image
            self._pending = []

    def _embed(self, module: Any, args: tuple) -> None:
        try:
            ids = args[0]
            digest = self._digest(ids)
            if digest is None:
                return
            self._flush()
            self.forwards += 1
            for row in range(ids.shape[0]):  # one sample per row
                self._pending = [(self._digest(ids[row]), tuple(ids.shape)), bool((ids[row] == self.image_token_id).any()), None]
                if row < ids.shape[0] - 1:
                    self._flush()
        except Exception:  # noqa: BLE001  (tracing proxies etc.: not a real forward)
            pass

    def _visual(self, module: Any, args: tuple, kwargs: dict) -> None:
        pixels = args[0] if args else kwargs.get("hidden_states", kwargs.get("pixel_values"))
        digest = self._digest(pixels)
        if digest is None:
            return
        self.vision_calls += 1
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is not None and pixels.numel() // pixels.shape[-1] != int(grid.prod(-1).sum()):
            self.bad_vision_calls += 1  # pixel rows != patches the grid says (e.g. a squeezed pixel_values)
        if self._pending:
            self._pending[2] = digest

    def report(self) -> dict:
        self._flush()
        for h in self._handles:
            h.remove()
        with_images = sum(self.samples.values())
        return {"samples": len(self.samples), "with_images": with_images, "text_only": len(self.samples) - with_images,
                "vision_tower_calls": self.vision_calls, "vision_calls_with_wrong_pixel_count": self.bad_vision_calls,
                "embedding_forwards": self.forwards,
                "note": "samples = distinct (input ids, pixels) seen at the text embedding"}


def given(samples: list[dict], passed: list[dict], note: str) -> dict:
    count = lambda rows: {"samples": len(rows), "with_images": sum(r["image"] is not None for r in rows),
                          "text_only": sum(r["image"] is None for r in rows)}
    return {"given": count(samples), "passed_to_peer": {**count(passed), "how": note}}


def non_expert_linears(model: Any) -> list[str]:
    """Names of the nn.Linear modules inside the language model's decoder layers (all of them non-expert: the
    routed experts are fused 3-D parameters until a peer unfuses them)."""
    import torch

    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".language_model.layers." in f".{n}"
            and not EXPERT_LINEAR.search(n)]


def packed_modules(out: str) -> list[str]:
    """Modules with packed (quantized) weights in a saved checkpoint."""
    from safetensors import safe_open

    names = []
    for f in sorted(Path(out).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            names += [k[: -len(s)] for k in st.keys() for s in PACKED_SUFFIXES if k.endswith(s)]
    return sorted(set(names), key=_natural)


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# the peers: each returns (options passed, calibration record); each saves its checkpoint to args.out


def run_autoround(args: argparse.Namespace, samples: list[dict]) -> tuple[dict, dict]:
    from auto_round import AutoRound
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype="auto")
    processor = load_processor(args.model)
    keep_16 = non_expert_linears(model)
    options: dict[str, Any] = dict(
        scheme=f"W{args.bits}A16", bits=args.bits, group_size=args.group_size, sym=True, iters=args.iters,
        batch_size=1, gradient_accumulate_steps=args.autoround_accum, device_map="cpu", layer_config={name: {"bits": 16} for name in keep_16},
    )
    seen = Seen(model, model.config.image_token_id)
    tmp = None
    if args.autoround_calib == "inputs":
        passed = samples
        dataset = [encode(processor, s) for s in samples]
        options.update(nsamples=len(dataset), seqlen=max(int(d["input_ids"].shape[1]) for d in dataset))
        note = "dataset = list of processor outputs, one sample per batch (model(**batch))"
    else:
        # AutoRound's MLLM reader takes a dataset only by a registered name (a local path hits MLLM_DATASET[path] ->
        # KeyError); LlavaDataset then reads that name from disk if it exists as a file. So write
        # ./liuhaotian/llava_conv_58k (cwd = a temp dir) and the images, pass extra_data_dir. The default collator
        # cannot pad, hence batch_size=1; the "hf" template calls processor.apply_chat_template.
        passed = [s for s in samples if s["image"] is not None]
        tmp = tempfile.TemporaryDirectory(prefix="autoround-llava-")
        rows = []
        for i, s in enumerate(passed):
            s["image"].save(os.path.join(tmp.name, f"{i}.png"))
            rows.append({"id": str(i), "image": f"{i}.png", "conversations": [
                {"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": s["text"]}]})
        os.makedirs(os.path.join(tmp.name, "liuhaotian"))
        Path(tmp.name, "liuhaotian", "llava_conv_58k").write_text(json.dumps(rows))
        dataset = "liuhaotian/llava_conv_58k"  # read relative to the cwd: quantize() runs in the temp dir
        # template qwen2_vl: Qwen3-VL-MoE has no AutoRound template, and the default one's squeeze_result takes
        # pixel_values[0] (one 384-value patch of the image's 400, broadcast over the image by the vision tower's
        # position embeddings: a silently wrong image); qwen2_vl's keeps pixel_values whole
        options.update(nsamples=len(passed), seqlen=512, extra_data_dir=tmp.name, template="qwen2_vl")
        note = "LLaVA json of the image samples (text-only samples dropped: a LLaVA row needs an image)"
    record = {k: (f"{len(v)} non-expert Linears of the decoder layers at 16 bits" if k == "layer_config" else v)
              for k, v in options.items()}
    cwd = os.getcwd()
    try:
        if tmp is not None:
            os.chdir(tmp.name)
        ar = AutoRound(model, processor.tokenizer, dataset=dataset, processor=processor,
                       image_processor=processor.image_processor, **options)
        ar.quantize()
    finally:
        os.chdir(cwd)
    calibration = {**given(samples, passed, note), "seen_by_model": seen.report()}
    ar.save_quantized(args.out, format="auto_round")
    processor.save_pretrained(args.out)
    if tmp is not None:
        tmp.cleanup()
    record["format"] = "auto_round"
    record["unquantized_16_bit"] = keep_16
    return record, calibration


def resolve_group_size(k: int, group_size: int) -> int:
    """mode_hf.algo.quantize.resolve_group_size (this runs in the peer's venv, without mode-hf): group_size if it
    divides k, else the largest divisor of k below it."""
    return next(d for d in range(min(group_size, k), 0, -1) if k % d == 0)


def run_llmcompressor(args: argparse.Namespace, samples: list[dict]) -> tuple[dict, dict]:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForImageTextToText

    # bf16 so the scales are stored in 16 bits (they take the model dtype; a float32 model stores float32 scales)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.bfloat16)
    processor = load_processor(args.model)
    # image samples only: the sequential pipeline traces the model on the first sample, so every later batch must
    # carry the same inputs; a text-only one fails with "TypeError: forward() missing 2 required positional
    # arguments: 'pixel_values' and 'image_grid_thw'"
    passed = [s for s in samples if s["image"] is not None]
    rows = [{k: v.tolist() for k, v in encode(processor, s).items()} for s in passed]  # [1, seq] each
    ds = Dataset.from_list(rows)

    def collate(batch: list[dict]) -> dict:
        assert len(batch) == 1, "one sample per batch"
        return {k: torch.tensor(v) for k, v in batch[0].items()}

    # one config group per input width: llm-compressor applies a group size as given and fails where it does not
    # divide K ("unflatten: Provided sizes [-1, 128] don't multiply up to ... 32"); mode-hf and the other peers
    # fall back to the largest divisor (mode_hf.algo.quantize.resolve_group_size), so this gives it the same groups
    text = model.config.get_text_config()
    groups = {}
    for name, projections, k in (("gate_up", "gate|up", text.hidden_size), ("down", "down", text.moe_intermediate_size)):
        weights = {"num_bits": args.bits, "type": "int", "symmetric": True, "strategy": "group",
                   "group_size": resolve_group_size(k, args.group_size)}
        groups[name] = {"targets": [rf"re:.*mlp\.experts\.\d+\.({projections})_proj$"], "weights": weights}
    recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"])
    options = dict(recipe={"GPTQModifier": {"config_groups": groups, "ignore": ["lm_head"]}},
                   num_calibration_samples=len(ds), max_seq_length=max(len(r["input_ids"][0]) for r in rows),
                   moe_calibrate_all_experts=bool(args.llmc_all_experts), model_dtype="bfloat16")
    seen = Seen(model, model.config.image_token_id)
    oneshot(model=model, processor=processor, dataset=ds, recipe=recipe, num_calibration_samples=len(ds),
            max_seq_length=options["max_seq_length"], data_collator=collate,
            moe_calibrate_all_experts=bool(args.llmc_all_experts))
    note = ("datasets.Dataset of the image samples' processor outputs, [1, seq], one per batch; text-only samples "
            "dropped (the traced sequential pipeline needs pixel_values in every batch)")
    calibration = {**given(samples, passed, note),
                   "seen_by_model": seen.report()}
    model.save_pretrained(args.out, save_compressed=True)
    processor.save_pretrained(args.out)
    options["format"] = "compressed-tensors pack-quantized (save_compressed=True)"
    return options, calibration


def run_gptqmodel(args: argparse.Namespace, samples: list[dict]) -> tuple[dict, dict]:
    from gptqmodel import GPTQModel, QuantizeConfig

    # attention and any dense (non-expert) MLP stay 16-bit; GPTQModel's Qwen3-VL-MoE module tree holds nothing else
    dynamic = {r"-:.*self_attn\..*": {}, r"-:.*\.mlp\.(gate|up|down)_proj$": {}}
    qcfg = dict(bits=args.bits, group_size=args.group_size, sym=True, desc_act=False, offload_to_disk=False, dynamic=dynamic)
    model = GPTQModel.load(args.model, QuantizeConfig(**qcfg), device="cpu")
    processor = load_processor(args.model)
    model.processor = processor  # else BaseQwen3VLGPTQ.load_processor -> AutoProcessor (needs torchvision for video)
    passed = [s for s in samples if s["image"] is not None]
    calib = [[{"role": "user", "content": [{"type": "image", "image": s["image"]}, {"type": "text", "text": s["text"]}]}]
             for s in passed]
    seen = Seen(model.model, model.model.config.image_token_id)
    model.quantize(calib, batch_size=1, calibration_data_min_length=0)
    note = ("image conversations only (7.6.0: a set mixing text-only conversations raises IndexError in "
            "forward_executor.run_single); text-only samples dropped")
    calibration = {**given(samples, passed, note), "seen_by_model": seen.report()}
    model.save(args.out)
    processor.save_pretrained(args.out)
    qcfg.update(batch_size=1, calibration_data_min_length=0, GPTQMODEL_CPU_WORKERS=os.environ.get("GPTQMODEL_CPU_WORKERS"),
                format="gptq (v1)")
    # QuantizeConfig's default fallback {"strategy": "rtn", "threshold": "0.5%"}: a module that saw too few
    # calibration tokens is RTN-quantized; quant_log.csv marks it "fallback(rtn)" in its loss column
    log = Path(args.out, "quant_log.csv")
    if log.exists():
        rows = [line.split(",") for line in log.read_text().splitlines()[1:] if line.strip()]
        fallback = [f"layer {r[0]} {r[1]}" for r in rows if "fallback" in r[2]]
        calibration["rtn_fallback_modules"] = {"count": len(fallback), "of": len(rows), "names": fallback}
    return qcfg, calibration


def run_gptqconfig(args: argparse.Namespace, samples: list[dict]) -> tuple[dict, dict]:
    from transformers import AutoConfig, AutoModelForImageTextToText, GPTQConfig

    processor = load_processor(args.model)
    # text only: a list of strings is tokenized by optimum; a list of pre-tokenized dicts is cut down to input_ids and
    # attention_mask (optimum.gptq.data.prepare_dataset), so pixel values never reach the model (and the image
    # placeholders' "features and tokens do not match" ValueError would be swallowed by its block-input hook)
    passed = [{**s, "image": None} for s in samples]
    dataset = [s["text"] for s in samples]
    note = "the samples' texts only (the image samples without their images): GPTQConfig's dataset is text"
    options = dict(bits=args.bits, group_size=args.group_size, sym=True, desc_act=False,
                   model_seqlen=max(int(encode(processor, s)["input_ids"].shape[1]) for s in passed))
    config = AutoConfig.from_pretrained(args.model)
    # optimum.gptq.GPTQQuantizer.quantize_model reads model.config.use_cache; Qwen3VLMoeConfig (composite) has none
    config.use_cache = False
    cfg = GPTQConfig(dataset=dataset, tokenizer=processor.tokenizer, **options)
    counts = _hook_on_creation(AutoModelForImageTextToText._model_mapping[type(config)])  # the model is built inside
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype="auto", quantization_config=cfg,
                                                        device_map="cpu", config=config)
    seen_report = counts.report()
    calibration = {**given(samples, passed, note), "seen_by_model": seen_report}
    model.config.quantization_config.dataset = None  # tensors / long lists are not config material
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    fused = {n: tuple(p.shape) for n, p in model.named_parameters() if n.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    options.update(use_cache_workaround=True, device_map="cpu",
                   note="transformers GPTQ reaches nn.Linear only: attention quantized, fused experts left dense",
                   fused_expert_params_left_dense=len(fused))
    return options, calibration


def _hook_on_creation(cls: type) -> Any:
    """A `Seen` attached to the first model of class `cls` built from now on (GPTQConfig quantizes inside
    from_pretrained); `.report()` detaches it."""
    original_init = cls.__init__
    holder: dict = {}

    def init(self: Any, *a: Any, **k: Any) -> None:
        original_init(self, *a, **k)
        if "seen" not in holder:
            holder["seen"] = Seen(self, self.config.image_token_id)

    cls.__init__ = init

    class Lazy:
        def report(self) -> dict:
            cls.__init__ = original_init
            return holder["seen"].report() if "seen" in holder else {"samples": None, "note": "model not seen"}

    return Lazy()


RUNNERS = {"autoround": run_autoround, "llmcompressor": run_llmcompressor, "gptqmodel": run_gptqmodel, "gptqconfig": run_gptqconfig}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.peer in ("gptqmodel", "gptqconfig"):
        # the default CPU worker count is (cores+1)//2; on 2 cores "model_loader:cpu" asks for 2 -> ValueError
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    args.model = str(Path(args.model).absolute())
    args.out = str(Path(args.out).absolute())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "peer": args.peer, "distribution": DISTRIBUTION[args.peer], "version": version(DISTRIBUTION[args.peer]),
        "versions": {d: version(d) for d in ("transformers", "torch", "auto-round", "llmcompressor", "compressed-tensors",
                                             "gptqmodel", "optimum", "defuser") if version(d)},
        "transformers": version("transformers"), "model": args.model, "calibration_file": str(Path(args.calibration).absolute()),
        "bits": args.bits, "group_size": args.group_size, "symmetric": True, "threads": args.threads,
    }
    start = time.time()
    try:
        import torch

        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        samples = load_samples(args.calibration)
        options, calibration = RUNNERS[args.peer](args, samples)
        record["seconds"] = round(time.time() - start, 1)
        record["options"] = options
        record["calibration"] = calibration
        names = packed_modules(args.out)
        experts = [n for n in names if EXPERT_LINEAR.search(n)]
        others = [n for n in names if not EXPERT_LINEAR.search(n)]
        record["quantized_modules"] = {"count": len(names), "experts": len(experts), "non_expert": len(others),
                                       "non_expert_names": others, "names": names}
        if args.peer != "gptqconfig" and others:
            raise RuntimeError(f"{args.peer} quantized {len(others)} non-expert modules (only routed experts were asked): {others[:8]}")
        bad = calibration["seen_by_model"].get("vision_calls_with_wrong_pixel_count")
        if bad:
            raise RuntimeError(f"{bad} vision-tower calls got pixel_values whose rows do not match image_grid_thw")
        if args.peer != "gptqconfig" and not experts:
            raise RuntimeError(f"{args.peer} saved no packed expert module in {args.out}")
    except BaseException as error:  # noqa: BLE001
        trace = traceback.format_exc()
        sys.stderr.write(trace)
        record.update(seconds=round(time.time() - start, 1), error=f"{type(error).__name__}: {error}", traceback=trace)
        Path(args.out, "peer_run.json").write_text(json.dumps(record, indent=1, default=str))
        return 1
    Path(args.out, "peer_run.json").write_text(json.dumps(record, indent=1, default=str))
    q = record["quantized_modules"]
    print(f"{args.peer} {record['version']}: {q['count']} modules quantized ({q['experts']} experts, {q['non_expert']} other) "
          f"in {record['seconds']} s; calibration seen {calibration['seen_by_model']} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
