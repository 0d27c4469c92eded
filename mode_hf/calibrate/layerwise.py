"""Layer-at-a-time passes over the calibration data: observing decoder layer l costs one layer, not l + 1.

Every pass runs the model's own forward (embeddings, vision tower, masks, rotary embeddings, and whatever the model
does between layers, such as Qwen3-VL's deepstack additions), but the decoder layers before layer l are stood in
for by `_Replay` modules that return, for the batch at hand, the output layer l - 1 gave in the previous step
(recorded by `LayerwiseRunner.advance`). The model then adds what it adds between layers l - 1 and l itself, so
layer l sees exactly the input a full forward would give it. Layers replayed before l - 1 return the same recorded
output; nothing reads it but the next replayed layer. Memory: the recorded outputs of one layer for all batches
(two while a pass records the next); time: linear in depth. The model's own code never changes. No transformers import.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..model.offload import input_device
from .hooks import StopForward, pre_hooks
from .inputs import to_device


class _Replay(nn.Module):
    """Stands in for one decoder layer: returns the recorded output of the layer before the observed one; other
    attributes (`attention_type`, ...) are the original layer's, for model code that reads them."""

    def __init__(self, original: nn.Module, runner: "LayerwiseRunner") -> None:
        super().__init__()
        object.__setattr__(self, "_original", original)
        object.__setattr__(self, "_runner", runner)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._original, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._runner.previous_output()


class LayerwiseRunner:
    """Runs calibration passes that start at decoder layer `index` of one ModuleList of layers.

    Args:
        model: the model (its forward is called with each batch, no cache).
        layers_name: name of the ModuleList of decoder layers, or None to run every pass from the first layer
            (full forwards: the runner then only counts).
        batches: the calibration batches, in the order every pass uses.
    """

    def __init__(self, model: nn.Module, layers_name: str | None, batches: Sequence[dict]) -> None:
        self.model, self.batches, self.layers_name = model, batches, layers_name
        self.layers = model.get_submodule(layers_name) if layers_name else None
        self.index = 0  # the next layer to observe; layers before it are replayed
        self._outputs: list[Any] | None = None  # outputs of layer index - 1, one per batch
        self._recorded: list[Any] = []  # outputs of layer index being recorded by the current pass
        self._current = 0

    def previous_output(self) -> Any:
        return self._outputs[self._current]

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """Layers before `index` replaced by replays for the duration of the block; always restored."""
        replaced = list(range(self.index)) if self.layers is not None else []
        originals = {j: self.layers[j] for j in replaced}
        try:
            for j in replaced:
                self.layers[j] = _Replay(originals[j], self)
            yield
        finally:
            for j, module in originals.items():
                self.layers[j] = module

    def forward(self, position: int, batch: dict) -> None:
        """One pass on batch number `position` (inside `replaying()`); a hook may end it early with StopForward."""
        self._current = position
        try:
            self.model(**to_device(batch, input_device(self.model)), use_cache=False)
        except StopForward:
            pass

    def layer_index(self, module_name: str) -> int | None:
        """Index of the decoder layer holding `module_name`, or None when the runner does not replay layers."""
        if self.layers is None:
            return None
        return int(module_name[len(self.layers_name) + 1 :].split(".")[0])

    def record_outputs(self) -> tuple[nn.Module, Any] | None:
        """A (module, forward hook) that records the output of layer `index` for the batch at hand and ends the
        pass; `finish_layer()` then makes them the replayed outputs. None when the runner does not replay."""
        if self.layers is None:
            return None
        self._recorded = []

        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            self._recorded.append(_detach(output))
            raise StopForward

        return self.layers[self.index], record

    def finish_layer(self) -> None:
        """The outputs recorded during the last pass (one per batch) become the replayed ones; move on one layer."""
        if self.layers is None:
            return
        if len(self._recorded) != len(self.batches):
            raise RuntimeError(f"recorded {len(self._recorded)} outputs of layer {self.index} for {len(self.batches)} batches")
        self._outputs, self._recorded = self._recorded, []
        self.index += 1

    def advance(self) -> None:
        """Run layer `index` as it is now (e.g. just quantized) on every batch, record its outputs, move on."""
        if self.layers is None:
            return
        module, hook = self.record_outputs()
        with self.replaying(), pre_hooks([], [(module, hook)]), torch.no_grad():
            for position, batch in enumerate(self.batches):
                self.forward(position, batch)
        self.finish_layer()

    def advance_to(self, index: int | None) -> None:
        """Advance layer by layer until `index` is the next layer to observe (None: nothing to do)."""
        while self.layers is not None and index is not None and self.index < index:
            self.advance()


def _detach(output: Any) -> Any:
    """A layer's output (a tensor, or a tuple of them as older layers return) without autograd history."""
    if isinstance(output, tuple):
        return tuple(_detach(o) for o in output)
    return output.detach() if isinstance(output, torch.Tensor) else output
