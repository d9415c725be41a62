"""Tree masks for attention_with_kv_cache: bit-packed int64 [Q, ceil(Q/64)], bit j of row i set when new
token i may attend to new token j. Builders for causal, paper-mode and fused-mode (DESIGN §1.2) layouts."""
from __future__ import annotations

import torch


def pack(mask: torch.Tensor) -> torch.Tensor:
    """bool [Q, Q] -> bit-packed int64 [Q, ceil(Q/64)]."""
    if mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        raise ValueError(f"mask must be a square [Q, Q] bool tensor, got shape {tuple(mask.shape)}")
    Q = mask.shape[0]
    W = (Q + 63) // 64
    padded = torch.zeros(Q, W * 64, dtype=torch.long, device=mask.device)
    padded[:, :Q] = mask.long()
    bits = padded.view(Q, W, 64) << torch.arange(64, device=mask.device)
    return bits.sum(-1)  # distinct bits: the sum is the OR (bit 63 wraps to the sign, as intended)


def unpack(packed: torch.Tensor, Q: int) -> torch.Tensor:
    """bit-packed int64 [Q, ceil(Q/64)] -> bool [Q, Q]."""
    bits = (packed.unsqueeze(-1) >> torch.arange(64, device=packed.device)) & 1
    return bits.view(packed.shape[0], -1)[:, :Q].bool()


def causal(Q: int, device=None) -> torch.Tensor:
    return pack(torch.ones(Q, Q, dtype=torch.bool, device=device).tril())


def fused_layout(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused-mode block of DESIGN §1.2 for k look-ahead tokens.

    Tokens: [c, d_1..d_k] (causal), then k+1 groups of k look-ahead tokens; group j sits after c..d_j.
    Returns (bool mask [Q, Q], position offsets [Q] relative to c), Q = (k+1)^2.
    """
    Q = (k + 1) ** 2
    mask = torch.zeros(Q, Q, dtype=torch.bool)
    pos = torch.zeros(Q, dtype=torch.long)
    mask[: k + 1, : k + 1] = torch.ones(k + 1, k + 1, dtype=torch.bool).tril()
    pos[: k + 1] = torch.arange(k + 1)
    for j in range(k + 1):
        base = k + 1 + j * k
        for i in range(k):
            mask[base + i, : j + 1] = True
            mask[base + i, base : base + i + 1] = True
            pos[base + i] = j + 1 + i
    return mask, pos


def fused(k: int, device=None) -> torch.Tensor:
    return pack(fused_layout(k)[0]).to(device)
