"""Evaluation-harness glue: mode checkpoints in lm-evaluation-harness and lmms-eval without user code.

- lm-eval 0.4.13 discovers no plug-ins, so it gets a launcher that imports mode-hf first and then runs lm-eval's own
  command line unchanged: `mode-hf-lm-eval ARGS` (or `python -m mode_hf.harness.lm_eval ARGS`), with a model
  "mode-hf" added that also loads image-text-to-text checkpoints for text tasks (`lm_eval.py`).
- lmms-eval 0.7.3 loads the entry point group `lmms_eval.models` on import: mode-hf's entry point registers the
  quantization method and a Qwen3-VL wrapper "mode_qwen3_vl" (`lmms_eval.py`), so the stock `lmms-eval` command
  runs mode checkpoints.
- `tasks.py` writes the bundled tasks as local task definitions for both (`mode-hf tasks --out DIR`).

Each harness imports only its own module here; nothing in mode-hf imports a harness.
"""
