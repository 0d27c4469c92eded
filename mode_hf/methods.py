"""The method registry: one record per allocation method, per sensitivity and per quantizer.

Everything that differs between methods is data here, read by the config's validation, the calibration plan and
the pipeline; no other module compares method names. Adding a method is one `Method` entry in `METHODS`:

    Method(name="mine", description="...", cost=my_set_cost,       # (stats, weight_error [E, B], config) -> [E, B]
           sensitivities=("output",), scopes=SCOPES)

A method's cost reads the statistics the observation pass gathered (`mode_hf.calibrate.observe.Observation`,
derived here from the config by `observation`); `calibration_needs` says what that pass and the quantizer need.
No transformers import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from .algo import cost
from .algo.allocation import SCOPES
from .algo.statistics import SetStatistics
from .calibrate.observe import Observation


class Options(Protocol):
    """The options this registry reads (a `ModeConfig` has them all)."""

    method: str
    sensitivity: str
    quantizer: str
    scope: str
    bits: list[int]
    avg_bits: float
    group_size: int
    symmetric: bool
    redundancy_threshold: float | None
    modality_split: bool
    router_finetune: bool
    progressive: list[float] | None
    min_top_per_set: int
    text_weight: float
    vision_weight: float
    alpha: float


SetCost = Callable[[SetStatistics, torch.Tensor, Options], torch.Tensor]  # (stats, weight_error [E, B], options) -> [E, B]
Guards = Callable[[Sequence[int]], dict[int, int]]  # candidate widths, widest first -> {width: experts per set}


@dataclass(frozen=True)
class Sensitivity:
    """How the damage of an expert at a width is measured."""

    name: str
    description: str
    output_damage: bool  # the statistics pass measures every expert's output change at every candidate width
    gradients: bool  # ... weighted by the squared next-token-loss gradient (a backward pass per calibration batch)
    energy_normalized: bool  # costs are divided by each set's mean output energy so that sets compare globally
    ablation: bool = False  # an ablation of the methods that accept it, not a method's own sensitivity


@dataclass(frozen=True)
class Quantizer:
    """How the chosen width is applied to an expert's weights."""

    name: str
    description: str
    hessians: bool  # needs each expert's calibration inputs (GPTQ Hessians); experts with too few fall back to RTN


def _no_guards(widths: Sequence[int]) -> dict[int, int]:
    return {}


def _top_two_guards(widths: Sequence[int]) -> dict[int, int]:
    """PMQ: at least one expert per set at the top width and one at the second."""
    return {width: 1 for width in widths[:2]}


@dataclass(frozen=True)
class Method:
    """One allocation method: its cost, its defaults and what it accepts.

    cost: one set's cost [E, B] (float64) from its statistics, its relative RTN weight errors [E, B] and the config;
        None for a method that allocates nothing (every expert at avg_bits).
    scope, sensitivity: the defaults when the user names none. scopes, sensitivities: what the method accepts.
    output_damage: whether the cost reads the measured output damage (False: only routing and weight errors).
    modality_ablation: whether `modality_split=False` applies (the method splits by modality).
    guards: experts per set the method requires at given widths (merged with the user's `min_top_per_set`).
    """

    name: str
    description: str
    cost: SetCost | None
    scope: str = "global"
    sensitivity: str = "output"
    scopes: tuple[str, ...] = SCOPES
    sensitivities: tuple[str, ...] = ("output",)
    output_damage: bool = True
    modality_ablation: bool = False
    guards: Guards = _no_guards

    @property
    def allocates(self) -> bool:
        """Whether the method solves an allocation (every method but `uniform`)."""
        return self.cost is not None


def _mode_cost(stats: SetStatistics, weight_error: torch.Tensor, config: Options) -> torch.Tensor:
    sensitivity = SENSITIVITIES[config.sensitivity]
    return cost.mode_cost(
        stats, config.text_weight, config.vision_weight, config.alpha, relative=sensitivity.energy_normalized,
        modality_split=config.modality_split, weight_error=None if sensitivity.output_damage else weight_error,
    )


def _frequency_cost(stats: SetStatistics, weight_error: torch.Tensor, config: Options) -> torch.Tensor:
    return cost.frequency_cost(stats, weight_error, config.alpha)


def _pmq_cost(stats: SetStatistics, weight_error: torch.Tensor, config: Options) -> torch.Tensor:
    return cost.pmq_cost(stats)


def _gemq_cost(stats: SetStatistics, weight_error: torch.Tensor, config: Options) -> torch.Tensor:
    return cost.gemq_cost(stats)


SENSITIVITIES: dict[str, Sensitivity] = {
    s.name: s
    for s in (
        Sensitivity("output", "squared MoE-output change of the expert at each width, per use", True, False, True),
        Sensitivity("fisher", "the squared output change weighted by the squared next-token-loss gradient (loss units)",
                    True, True, False),
        Sensitivity("weight", "the relative RTN weight error in place of the output damage", False, False, False, ablation=True),
    )
}

QUANTIZERS: dict[str, Quantizer] = {
    q.name: q
    for q in (
        Quantizer("gptq", "GPTQ on per-expert Hessians of the routed calibration tokens", hessians=True),
        Quantizer("rtn", "round to nearest", hessians=False),
    )
}

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("mode", "modality-decomposed frequency x per-use damage (text and kept vision tokens)", _mode_cost,
               sensitivities=("output", "fisher", "weight"), modality_ablation=True),
        Method("uniform", "every expert at avg_bits", None),
        Method("frequency", "total routing frequency x relative weight error (no split, no filter)", _frequency_cost,
               output_damage=False),
        Method("pmq", "MC-MoE: frequency x routing weight^1.5 x ||Z - Z_q||_F, per-layer budget, top-two guards",
               _pmq_cost, scope="layer", scopes=("layer",), guards=_top_two_guards),
        Method("gemq", "GEMQ: squared loss gradient x squared output error, global", _gemq_cost,
               sensitivity="fisher", sensitivities=("fisher",)),
    )
}


@dataclass(frozen=True)
class CalibrationNeeds:
    """What quantizing with a config needs from calibration."""

    data: bool  # any calibration data at all (everything but uniform RTN without router fine-tuning)
    statistics: bool  # a statistics pass (methods that allocate)
    gradients: bool  # backward passes of the next-token loss (fisher sensitivity)
    hessians: bool  # per-expert inputs for GPTQ
    text_loss: bool  # calibration text tokens that carry a next-token loss (fisher, router fine-tuning)


def calibration_needs(config: Options) -> CalibrationNeeds:
    """What `config` needs from calibration, from its method, sensitivity and quantizer records."""
    method, sensitivity = METHODS[config.method], SENSITIVITIES[config.sensitivity]
    hessians = QUANTIZERS[config.quantizer].hessians
    return CalibrationNeeds(
        data=method.allocates or hessians or config.router_finetune,
        statistics=method.allocates,
        gradients=sensitivity.gradients,
        hessians=hessians,
        text_loss=sensitivity.gradients or config.router_finetune,
    )


def observation(config: Options) -> Observation:
    """What the statistics pass of `config` measures."""
    method, sensitivity = METHODS[config.method], SENSITIVITIES[config.sensitivity]
    return Observation(
        bits=tuple(config.bits), group_size=config.group_size, symmetric=config.symmetric,
        redundancy_threshold=config.redundancy_threshold, output_damage=method.output_damage and sensitivity.output_damage,
        gradients=sensitivity.gradients,
    )


def guards(config: Options) -> dict[int, int]:
    """Minimum experts per set at given widths: the user's top-width guard merged with the method's own (none under
    layer_uniform, where every set has one width)."""
    if config.scope == "layer_uniform":
        return {}
    widths = sorted(config.bits, reverse=True)
    required = {widths[0]: config.min_top_per_set} if config.min_top_per_set else {}
    for width, count in METHODS[config.method].guards(widths).items():
        required[width] = max(required.get(width, 0), count)
    return required


def option_errors(config: Options) -> list[str]:
    """What is wrong with the method, scope, sensitivity and ablation options of `config` (names valid), as
    messages that say what to change; empty when they go together."""
    method, errors = METHODS[config.method], []
    if config.scope not in method.scopes:
        allowed = " or ".join(f"scope={s!r}" for s in method.scopes)
        errors.append(f"method={method.name!r} allocates with {allowed} (or leave scope unset), not {config.scope!r}.")
    if config.sensitivity not in method.sensitivities:
        users = " or ".join(repr(m.name) for m in METHODS.values() if config.sensitivity in m.sensitivities)
        kind = "is an ablation of" if SENSITIVITIES[config.sensitivity].ablation else "applies to"
        errors.append(
            f"sensitivity={config.sensitivity!r} does not go with method={method.name!r}, which takes "
            f"{' or '.join(f'sensitivity={s!r}' for s in method.sensitivities)} (leave sensitivity unset for its "
            f"default); {config.sensitivity!r} {kind} method={users}."
        )
    if not config.modality_split and not method.modality_ablation:
        users = " or ".join(repr(m.name) for m in METHODS.values() if m.modality_ablation)
        errors.append(f"modality_split=False is an ablation of method={users}; {method.name!r} has no modality split to drop.")
    if not method.allocates:
        if not (int(config.avg_bits) == config.avg_bits and int(config.avg_bits) in config.bits):
            errors.append(
                f"method={method.name!r} puts every expert at avg_bits, so avg_bits must be one of bits={config.bits} "
                f"(got {config.avg_bits})."
            )
        if config.progressive is not None:
            errors.append(f"method={method.name!r} has no costs to re-estimate: drop progressive.")
    return errors


def set_costs(stats: SetStatistics, weight_error: torch.Tensor, config: Options) -> torch.Tensor:
    """One set's cost [E, B] for the configured method (which must allocate)."""
    return METHODS[config.method].cost(stats, weight_error, config)  # type: ignore[misc]
