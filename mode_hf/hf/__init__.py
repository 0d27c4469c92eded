"""The transformers and Hub layer: the quantizer transformers calls (`quantizer`), checkpoint save, load and
verification (`checkpoint`, with `atomic`), the model card (`card`), Hub uploads (`hub`), report pictures
(`report`) and the compressed-tensors export (`export`).
"""
