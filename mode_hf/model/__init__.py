"""The model side of mode-hf: family adapters (`layouts`), structure queries (`structure`: expert sets, decoder
layers, routers, dense linears), accelerate offload (`offload`), the packed modules that replace experts and
linears (`packed`) and their native CPU kernels (`native`, `csrc/`). No transformers import.
"""
