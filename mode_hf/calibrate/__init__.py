"""Calibration: samples from a source (`sources`) turned into model inputs (`inputs`), scoped hooks (`hooks`),
layer-at-a-time passes (`layerwise`), what the passes observe (`observe`: routing statistics, output damage, GPTQ
inputs and Hessians), next-token losses (`losses`) and router fine-tuning (`routers`).
"""
