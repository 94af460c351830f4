"""Qwen2 from scratch, for teaching (notebooks 00 and 06): the model with shape comments, RoPE and YaRN as pure
functions, Dual Chunk Attention beside its naive reference, and the long-context study. Every later stage is
checked against ``transformers``; this package is where a reader learns what those stages compute."""
