"""Serving engines: the vLLM plugin (`vllm`: quantization method "mode", loaded by vLLM through the
`vllm.general_plugins` entry point, in vLLM's own environment). Nothing here is imported by `import mode_hf`.
"""
