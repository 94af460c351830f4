"""The project's one int8 quantizer: symmetric, zero point 0, used by the torch package (notebook 03) and by
the graph builder (notebook 04) alike, so a weight quantized by either is the same bytes.

    q = round(w / scale) in [-127, 127],  scale = max|w| / 127 over the group (a row, or a block of a row)

-128 is never produced (the range stays symmetric) and each weight is off by at most scale / 2. An
all-zero group gets scale 1 (its q are 0 either way). Inputs may be torch tensors or numpy arrays; the
result is of the same kind.
"""
from __future__ import annotations

import numpy as np
import torch


def _as_tensor(weight) -> tuple[torch.Tensor, bool]:
    if isinstance(weight, torch.Tensor):
        return weight.detach().float(), False
    return torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)), True


def _symmetric(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., G) float -> (int8 (..., G), fp32 scale (...)): one scale per group along the last axis."""
    absmax = groups.abs().amax(dim=-1)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    q = torch.round(groups / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_weight(weight):
    """Per output channel: (N, K) -> (int8 (N, K), fp32 scale (N,))."""
    w, numpy_in = _as_tensor(weight)
    q, scale = _symmetric(w)
    return (q.numpy(), scale.numpy()) if numpy_in else (q, scale)


def quantize_per_block(weight, block_size: int):
    """Per (row, block of ``block_size`` inputs): (N, K) -> (int8 (N, K), fp32 scales (N, ceil(K / block)))."""
    w, numpy_in = _as_tensor(weight)
    N, K = w.shape
    k_blocks = -(-K // block_size)
    padded = torch.zeros(N, k_blocks * block_size)
    padded[:, :K] = w
    q, scale = _symmetric(padded.reshape(N, k_blocks, block_size))
    q = q.reshape(N, -1)[:, :K].contiguous()
    return (q.numpy(), scale.numpy()) if numpy_in else (q, scale)


def dequantize_weight(q, scale):
    """int8 (N, K) and per-channel (N,) or per-block (N, k_blocks) scales -> float32 (N, K)."""
    numpy_in = not isinstance(q, torch.Tensor)
    qt = torch.as_tensor(np.asarray(q) if numpy_in else q).float()
    st = torch.as_tensor(np.asarray(scale) if numpy_in else scale).float()
    if st.ndim == 1:
        st = st[:, None]
    block = -(-qt.shape[1] // st.shape[1])
    w = qt * st.repeat_interleave(block, dim=1)[:, : qt.shape[1]]
    return w.numpy() if numpy_in else w


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations, dynamically, one scale per row: (M, K) -> (int8 (M, K), fp32 scale (M, 1))."""
    q, scale = _symmetric(x.detach().float())
    return q, scale[:, None]
