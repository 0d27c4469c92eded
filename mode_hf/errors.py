"""The exceptions of mode-hf: one base, `ModeError`, and a typed subclass per kind of failure.

Every message says what to change. Each subclass also derives from the built-in exception it has always been
(ValueError for bad input, RuntimeError for a checkpoint that did not load), so `except ValueError` keeps working.
No transformers import.
"""

from __future__ import annotations


class ModeError(Exception):
    """Base of every error mode-hf raises on purpose."""


class ModeConfigError(ModeError, ValueError):
    """An invalid `ModeConfig` option; the message says what to change."""


class CalibrationDataError(ModeError, ValueError):
    """Calibration data mode-hf cannot use; the message names the sample and the fix."""


class UnsupportedModelError(ModeError, ValueError):
    """The model has no routed experts mode-hf can quantize, or a layout it does not know."""


class InfeasibleBudgetError(ModeError, ValueError):
    """The bit budget (or a guard together with it) admits no allocation; the message says what to change."""


class CheckpointError(ModeError, RuntimeError):
    """A mode checkpoint that is not one, or that did not load as one."""


class ExportError(ModeError, ValueError):
    """A checkpoint that cannot be exported as asked, with what to do instead."""


class UsageError(ModeError, ValueError):
    """A command, or a path given to one, that cannot be used as given; the message says what to change."""


class WeightsError(ModeError, ValueError):
    """Model weights mode-hf cannot quantize (NaN or inf); the message names the tensor and the expert."""
