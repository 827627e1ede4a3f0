"""The codec pipeline, one module per stage: grouping -> quantize -> entropy -> (container)."""
