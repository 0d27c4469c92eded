"""`ModeConfig`: the one validated configuration object of mode-hf.

The config travels through `from_pretrained(..., quantization_config=ModeConfig(...))`. Options are validated on
construction, with errors that say what to change. Runtime objects (calibration samples, the processor) are held
on the instance but never serialized. After quantization the config also carries the result, as data: `bit_map`
(the width of every routed expert, keyed by expert-set module name) and `summary` (statistics of the run).
"""

from __future__ import annotations

import difflib
import inspect
import math
from typing import Any, Sequence

from transformers.utils.quantization_config import QuantizationConfigMixin

from . import methods
from .algo.allocation import SCOPES
from .algo.packing import SUPPORTED_BITS
from .errors import ModeConfigError

FORMAT_VERSION = 2  # 2: expert biases, transposed-layout families, dense_map (1 still loads)
DENSE_BITS = (None, 4, 8)
# Modules never quantized unless the user says otherwise: vision tower, routers, embeddings and the LM head.
DEFAULT_MODULES_TO_NOT_CONVERT = ("visual", "vision_tower", "vision_model", "router", "embed_tokens", "lm_head")
# Keys that hold runtime objects: accepted by the constructor, never written to config.json.
RUNTIME_KEYS = ("calibration", "processor")
QUANT_METHOD = "mode"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ModeConfigError(message)


class ModeConfig(QuantizationConfigMixin):
    """Configuration of MODE expert-level mixed-precision quantization.

    Args:
        avg_bits: average weight bit-width over all routed-expert weights (the budget), within [min(bits), max(bits)].
        bits: candidate widths, a subset of (2, 3, 4, 8).
        group_size: quantization group along the input dimension (a divisor fallback is used for small dims).
        symmetric: False (default) gives every group a min-max range with its own zero point; True a range
            symmetric about zero (zero point 2**(bits-1)), what compressed-tensors export and vLLM's WNA16 MoE
            kernels need. Same checkpoint format either way.
        method: "mode" (modality-decomposed cost, default), "uniform" (every expert at avg_bits), "frequency"
            (total routing frequency times relative weight error, no modality split, no redundancy filter), "pmq"
            (MC-MoE: frequency x routing weight^1.5 x ||Z - Z_q||_F, per-layer budget, top and second width guards)
            or "gemq" (sum of squared loss gradient x squared output error, global).
        quantizer: "gptq" (default) or "rtn".
        scope: "global" (one budget over all layers), "layer" (the budget holds in every expert set) or
            "layer_uniform" (all experts of a set share one width; the layout serving engines can run).
            None: the method's own ("layer" for pmq, "global" otherwise).
        sensitivity: "output" (squared MoE-output change) or "fisher" (weighted by the squared gradient of the
            next-token loss at the set's output; loss units, comparable across layers). None: "fisher" for gemq,
            "output" otherwise. "weight" (mode only, an ablation): the relative RTN weight error stands in for the
            per-modality output damage, so the cost is modality-split frequency x weight error.
        modality_split: mode only. False (an ablation) drops the text/vision split: frequency and per-use damage are
            taken over all text and kept vision tokens together.
        router_finetune: after quantization, train only the router weights (next-token loss on the calibration
            text tokens, AdamW with router_lr and router_weight_decay, router_epochs passes).
        progressive: strictly decreasing budgets ending at avg_bits, e.g. (3.0, 2.5, 2.0): quantize at the first,
            re-estimate costs on the quantized (and router-tuned) model, re-solve at the next.
        calibration: calibration samples: raw `{"image": PIL.Image | list | None, "text": str}` dicts (needs
            `processor`), or processor outputs (dicts of tensors with at least `input_ids`).
        processor: the model's processor, used to turn raw samples into inputs and to find the image-token ids.
        num_samples: use at most this many calibration samples (None: all).
        batch_size: calibration samples per forward pass.
        redundancy_threshold: cosine similarity at or above which a vision token counts as a duplicate of an
            already-kept token of the same image (tau); None disables the filter.
        text_weight, vision_weight: lambda_text and lambda_vision of the cost.
        alpha: exponent of the frequency in the cost.
        eta: weight of the relative weight-error tie-breaker, as a fraction of the mean cost.
        text_hessian_weight: gamma, the weight of text tokens in the GPTQ Hessian (1.0: plain GPTQ).
        damp: GPTQ dampening, as a fraction of the mean Hessian diagonal.
        gptq_min_tokens: experts reached by fewer calibration tokens fall back to RTN.
        min_top_per_set: guard: at least this many experts per set at the top width (global and layer scopes).
        seed: seed for anything random (sample order).
        modules_to_not_convert: module-name patterns whose expert sets stay 16-bit (default: vision tower,
            routers, embeddings, lm_head).
        dense_bits: None (default) keeps attention, shared experts and dense MLPs of the decoder layers in 16-bit;
            4 or 8 quantizes every such `nn.Linear` uniformly at that width (same quantizer and group size as the
            experts; routers, scalar gates, the vision tower and the LM head stay 16-bit).
        bit_map, dense_map, summary, format_version: written by the quantizer; present in a quantized checkpoint.

    Raises:
        ModeConfigError: for any invalid option, with the change to make.
    """

    def __init__(
        self,
        avg_bits: float = 3.0,
        bits: Sequence[int] = (2, 3, 4),
        group_size: int = 128,
        symmetric: bool = False,
        method: str = "mode",
        quantizer: str = "gptq",
        scope: str | None = None,
        sensitivity: str | None = None,
        modality_split: bool = True,
        router_finetune: bool = False,
        router_lr: float = 1e-4,
        router_weight_decay: float = 1e-4,
        router_epochs: int = 1,
        progressive: Sequence[float] | None = None,
        calibration: Sequence[Any] | None = None,
        processor: Any = None,
        num_samples: int | None = None,
        batch_size: int = 4,
        redundancy_threshold: float | None = 0.9,
        text_weight: float = 0.5,
        vision_weight: float = 0.5,
        alpha: float = 1.0,
        eta: float = 1e-3,  # small: only orders experts no calibration token reached
        text_hessian_weight: float = 1.0,
        damp: float = 0.01,
        gptq_min_tokens: int = 16,  # below this a per-expert Hessian is mostly dampening: use RTN
        min_top_per_set: int = 0,
        seed: int = 0,
        modules_to_not_convert: Sequence[str] | None = None,
        dense_bits: int | None = None,
        bit_map: dict[str, list[int]] | None = None,
        dense_map: dict[str, int] | None = None,
        summary: dict[str, Any] | None = None,
        format_version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        **unknown: Any,
    ) -> None:
        _reject_unknown(unknown)
        _require(quant_method == QUANT_METHOD, f"quant_method={quant_method!r}: a ModeConfig is quant_method='mode'.")
        self.quant_method = QUANT_METHOD
        self.avg_bits = float(avg_bits)
        self.bits = sorted(int(b) for b in bits)
        self.group_size = int(group_size)
        self.symmetric = bool(symmetric)
        self.method = method
        self.quantizer = quantizer
        defaults = methods.METHODS.get(method, methods.METHODS["mode"])  # an unknown method fails in post_init
        self.scope = defaults.scope if scope is None else scope
        self.sensitivity = defaults.sensitivity if sensitivity is None else sensitivity
        self.modality_split = bool(modality_split)
        self.router_finetune = bool(router_finetune)
        self.router_lr = float(router_lr)
        self.router_weight_decay = float(router_weight_decay)
        self.router_epochs = int(router_epochs)
        self.progressive = None if progressive is None else [float(b) for b in progressive]
        self.calibration = calibration
        self.processor = processor
        self.num_samples = num_samples
        self.batch_size = int(batch_size)
        self.redundancy_threshold = redundancy_threshold
        self.text_weight = float(text_weight)
        self.vision_weight = float(vision_weight)
        self.alpha = float(alpha)
        self.eta = float(eta)
        self.text_hessian_weight = float(text_hessian_weight)
        self.damp = float(damp)
        self.gptq_min_tokens = int(gptq_min_tokens)
        self.min_top_per_set = int(min_top_per_set)
        self.seed = int(seed)
        self.modules_to_not_convert = list(
            DEFAULT_MODULES_TO_NOT_CONVERT if modules_to_not_convert is None else modules_to_not_convert
        )
        self.dense_bits = None if dense_bits is None else int(dense_bits)
        self.bit_map = {str(k): [int(b) for b in v] for k, v in bit_map.items()} if bit_map else None
        self.dense_map = {str(k): int(v) for k, v in dense_map.items()} if dense_map else None
        self.summary = summary
        self.format_version = int(format_version)
        self.post_init()

    # ------------------------------------------------------------------ validation
    def post_init(self) -> None:
        """Validate every option; raises ModeConfigError naming the option and the fix."""
        self._validate_choices()
        self._validate_bits()
        self._validate_numbers()
        self._validate_method_options()
        if self.bit_map is None:
            self._validate_calibration()
        else:
            self._validate_bit_map()

    def _validate_bits(self) -> None:
        _require(len(self.bits) > 0, "bits is empty: pass candidate widths, e.g. bits=(2, 3, 4).")
        _require(len(set(self.bits)) == len(self.bits), f"bits={self.bits} has duplicates: list each width once.")
        unsupported = [b for b in self.bits if b not in SUPPORTED_BITS]
        _require(not unsupported, f"bits {unsupported} are not supported: choose widths from {SUPPORTED_BITS}.")
        low, high = min(self.bits), max(self.bits)
        _require(
            math.isfinite(self.avg_bits) and low <= self.avg_bits <= high,
            f"avg_bits={self.avg_bits} is outside [min(bits), max(bits)] = [{low}, {high}]: "
            f"choose avg_bits in that range or change bits.",
        )

    def _validate_choices(self) -> None:
        for option, registry in (("method", methods.METHODS), ("quantizer", methods.QUANTIZERS), ("scope", SCOPES),
                                 ("sensitivity", methods.SENSITIVITIES)):
            value, names = getattr(self, option), tuple(registry)
            _require(value in names, f"{option}={value!r} is unknown: choose one of {names}.")

    def _validate_method_options(self) -> None:
        errors = methods.option_errors(self)
        _require(not errors, " ".join(errors))
        _require(self.router_lr > 0, f"router_lr={self.router_lr} must be > 0, e.g. 1e-4.")
        _require(self.router_weight_decay >= 0, f"router_weight_decay={self.router_weight_decay} must be >= 0.")
        _require(self.router_epochs >= 1, f"router_epochs={self.router_epochs} must be >= 1.")
        if self.progressive is not None:
            self._validate_progressive()

    def _validate_progressive(self) -> None:
        budgets, low, high = self.progressive, min(self.bits), max(self.bits)
        _require(len(budgets) >= 2, f"progressive={budgets} needs at least two budgets, e.g. (3.0, 2.5, 2.0).")
        _require(
            all(a > b for a, b in zip(budgets, budgets[1:])),
            f"progressive={budgets} must be strictly decreasing, e.g. (3.0, 2.5, 2.0).",
        )
        _require(
            all(low <= b <= high for b in budgets),
            f"progressive={budgets} has budgets outside [min(bits), max(bits)] = [{low}, {high}].",
        )
        _require(
            budgets[-1] == self.avg_bits,
            f"progressive={budgets} must end at avg_bits={self.avg_bits}: set avg_bits={budgets[-1]}.",
        )

    def _validate_numbers(self) -> None:
        _require(self.group_size > 0, f"group_size={self.group_size} must be a positive integer, e.g. 128.")
        _require(self.batch_size > 0, f"batch_size={self.batch_size} must be a positive integer.")
        _require(
            self.num_samples is None or int(self.num_samples) > 0,
            f"num_samples={self.num_samples} must be a positive integer or None (all samples).",
        )
        tau = self.redundancy_threshold
        _require(
            tau is None or 0.0 < float(tau) <= 1.0,
            f"redundancy_threshold={tau} must be in (0, 1] (cosine similarity), or None to keep every vision token.",
        )
        _require(
            self.text_weight >= 0 and self.vision_weight >= 0 and self.text_weight + self.vision_weight > 0,
            "text_weight and vision_weight must be >= 0 and not both 0.",
        )
        _require(self.alpha >= 0, f"alpha={self.alpha} must be >= 0.")
        _require(self.eta >= 0, f"eta={self.eta} must be >= 0.")
        _require(self.text_hessian_weight > 0, f"text_hessian_weight={self.text_hessian_weight} must be > 0.")
        _require(self.damp > 0, f"damp={self.damp} must be > 0, e.g. 0.01.")
        _require(self.gptq_min_tokens >= 0, f"gptq_min_tokens={self.gptq_min_tokens} must be >= 0.")
        _require(self.min_top_per_set >= 0, f"min_top_per_set={self.min_top_per_set} must be >= 0.")
        _require(
            self.dense_bits in DENSE_BITS,
            f"dense_bits={self.dense_bits} is not supported: None keeps attention, shared experts and dense MLPs in "
            f"16-bit; 4 or 8 quantizes them.",
        )
        _require(
            self.format_version <= FORMAT_VERSION,
            f"this checkpoint has mode-hf format_version {self.format_version}, newer than this mode-hf "
            f"understands ({FORMAT_VERSION}): upgrade mode-hf.",
        )

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing needs calibration data (everything except uniform RTN does)."""
        return methods.calibration_needs(self).data

    def _validate_calibration(self) -> None:
        samples = self.calibration
        if samples is None:
            _require(
                not self.needs_calibration,
                f"method={self.method!r} with quantizer={self.quantizer!r} needs calibration data: pass "
                "calibration=[{'image': ..., 'text': ...}, ...] with processor=..., or processor outputs.",
            )
            return
        _require(
            not isinstance(samples, (str, bytes, dict)) and hasattr(samples, "__len__") and len(samples) > 0,
            "calibration must be a non-empty list of samples ({'image': ..., 'text': ...} dicts or processor "
            f"outputs), got {type(samples).__name__}.",
        )
        for index, sample in enumerate(samples):
            _require(hasattr(sample, "keys"), f"calibration[{index}] is a {type(sample).__name__}, not a dict.")
            is_raw = "text" in sample
            _require(
                is_raw or "input_ids" in sample,
                f"calibration[{index}] has neither 'text' (a raw sample) nor 'input_ids' (processor output).",
            )
            if is_raw:
                _require(
                    self.processor is not None,
                    f"calibration[{index}] is a raw sample: pass processor=AutoProcessor.from_pretrained(...) "
                    "so that mode-hf can turn it into model inputs.",
                )
                _require(isinstance(sample["text"], str), f"calibration[{index}]['text'] must be a string.")

    def _validate_bit_map(self) -> None:
        for name, widths in self.bit_map.items():
            bad = sorted({b for b in widths if b not in SUPPORTED_BITS})
            _require(not bad, f"bit_map[{name!r}] holds unsupported widths {bad}: the checkpoint is corrupt.")
        for name, width in (self.dense_map or {}).items():
            _require(width in SUPPORTED_BITS, f"dense_map[{name!r}] = {width} is not a supported width: the checkpoint is corrupt.")

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable options and results; runtime objects (calibration, processor) are left out."""
        return {key: _plain(value) for key, value in self.__dict__.items() if key not in RUNTIME_KEYS}

    def __iter__(self):
        yield from self.to_dict().items()

    def without_result(self) -> "ModeConfig":
        """A copy of the options with the runtime objects and no result (bit map, summary)."""
        options = {k: v for k, v in self.to_dict().items() if k not in ("bit_map", "dense_map", "summary")}
        return ModeConfig(**options, calibration=self.calibration, processor=self.processor)


class QuantizedModeConfig(ModeConfig):
    """The config of a saved mode checkpoint, as transformers reads it from config.json (the "mode" entry of its
    quantization-config registry). A class of its own so that passing new quantization options to a checkpoint
    that is already quantized fails instead of being ignored: transformers compares the two config classes, and
    `mode_hf.hf.quantizer.install_requantize_check` makes that refusal name the base model to quantize instead."""


OPTION_NAMES = tuple(name for name in inspect.signature(ModeConfig.__init__).parameters if name not in ("self", "unknown"))


def _reject_unknown(unknown: dict[str, Any]) -> None:
    """Raise ModeConfigError naming every unknown option, with the nearest known one where there is one."""
    if not unknown:
        return
    hints = []
    for key in sorted(unknown):
        close = difflib.get_close_matches(key, OPTION_NAMES, n=1, cutoff=0.6)
        hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    raise ModeConfigError(f"unknown ModeConfig option{'s' if len(hints) > 1 else ''} {', '.join(hints)}: the options are {', '.join(OPTION_NAMES)}.")


def _plain(value: Any) -> Any:
    """Deep copy into JSON types (tuples become lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
