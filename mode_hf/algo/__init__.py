"""The algorithms of mode-hf as pure functions on tensors and arrays: calibration statistics and the redundancy
filter (`statistics`), allocation costs (`cost`), the bit-width MILP (`allocation`), RTN and GPTQ (`quantize`),
bit-packing (`packing`) and grouped matmuls (`grouped`).

New tensors out, inputs untouched; no config object and no transformers import anywhere in this package.
"""
