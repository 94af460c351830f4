"""Qwen2 from scratch, for teaching (notebooks 00 and 06): the model with shape comments, RoPE and YaRN as pure
functions, Dual Chunk Attention beside its naive reference (``dual_chunk.py``, its fast path, is also the code every
deploy package carries), and the long-context study. Every later stage is checked against ``transformers``; this
package is where a reader learns what those stages compute."""
