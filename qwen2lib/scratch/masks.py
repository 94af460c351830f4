"""The left-padding convention, in one place: ``attention_mask`` (B, A) is 1 for a real token and 0 for left
padding, and a token's position is the number of real tokens before it, so padding shifts nothing. The torch
model, the generation loop and the ONNX runtime all take positions from here (the graphs compute the same from
``attention_mask`` in their own nodes, ``qwen2lib.compile.ops.attention_bias``).
"""
from __future__ import annotations

import numpy as np


def positions_from_mask(attention_mask):
    """(B, A) mask -> (B, A) int64 positions (torch tensor or numpy array, as given); padding gets position 0."""
    if isinstance(attention_mask, np.ndarray):
        return np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0).astype(np.int64)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
