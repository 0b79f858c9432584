"""Philox4x32-10 in PyTorch integer ops, and the counter layout every backend follows.

The layout is documented in docs/randomness.md; csrc/philox.h and the Triton kernels (fused_rnn/triton/cell.py, and
kernels.packed_dropout_kernel for the bulk masks) follow it bit for bit. Values are carried in int64 tensors holding uint32 numbers in [0, 2**32), so every
operation is exact on any device and under autograd-free tracing.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
UINT32_MASK = 0xFFFFFFFF

# Counter word c3: which kind of mask a draw belongs to.
KIND_INPUT = 1  # masks["input"][l]: input_dropout (l = 0) or the between-layer dropout (l > 0)
KIND_OUTPUT = 2  # masks["output"]: output_dropout
KIND_WEIGHT = 3  # masks["weight"][k]: weight drop on W_hh
KIND_SEQUENCE = 4  # one draw per (b, j) and sequence: hidden, cell, update in "sequence" mode
KIND_STEP = 5  # one draw per (b, j) and step: zoneout_h, zoneout_c, update in "step" mode

# Output word of a KIND_SEQUENCE / KIND_STEP draw that each mask reads.
WORD_HIDDEN = 0  # KIND_SEQUENCE
WORD_CELL = 1  # KIND_SEQUENCE
WORD_UPDATE = 2  # KIND_SEQUENCE (update_dropout_mode="sequence") and KIND_STEP ("step")
WORD_ZONEOUT_H = 0  # KIND_STEP
WORD_ZONEOUT_C = 1  # KIND_STEP

SEED_LIMIT = 2**63


def threshold(p: float) -> int:
    """The integer a uint32 draw is compared with: the event (drop, or zone out) happens iff draw < threshold.

    floor(p * 2**32) is exact in float64 (a power-of-two scaling), lies in [0, 2**32], and makes p = 0
    never fire and p = 1 always fire.
    """
    return int(math.floor(float(p) * 4294967296.0))


def keep_scale(p: float) -> float:
    """Inverted-dropout scale 1 / (1 - p); 0 for p = 1, where every element is dropped anyway."""
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0


def seed_key(seed: int | Tensor) -> tuple[int | Tensor, int | Tensor]:
    """The Philox key (k0, k1): the low and high 32-bit words of the 64-bit seed (an int or a 0-dim int64 tensor)."""
    return seed & UINT32_MASK, (seed >> 32) & UINT32_MASK


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    # a * b for a < 2**32 and b in [0, 2**32) without overflowing int64: split b into 16-bit halves.
    low = (b & 0xFFFF) * a  # < 2**48
    high = (b >> 16) * a  # < 2**48
    mid = low + ((high & 0xFFFF) << 16)  # < 2**49
    return (high >> 16) + (mid >> 32), mid & UINT32_MASK


def philox4x32(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int | Tensor, k1: int | Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 of counters (c0, c1, c2, c3) under key (k0, k1); all int64 tensors of uint32 values, broadcast."""
    for _ in range(PHILOX_ROUNDS):
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & UINT32_MASK
        k1 = (k1 + PHILOX_KEY_B) & UINT32_MASK
    return c0, c1, c2, c3


def _counter(value: int | Tensor, device: torch.device) -> Tensor:
    return torch.as_tensor(value, dtype=torch.int64, device=device)


def packed_draws(seed: int | Tensor, kind: int, index: int, steps: Tensor | int, numel: int, device: torch.device) -> Tensor:
    """Draws of a mask stored as [steps, numel] flat elements, four consecutive elements per Philox call.

    Element e of step t reads word e % 4 of Philox(c0 = e // 4, c1 = t, c2 = index, c3 = kind).
    Used by the bulk masks: input, output and weight. Returns int64 [len(steps), numel].
    """
    k0, k1 = seed_key(seed)
    steps = _counter(steps, device).reshape(-1, 1)
    groups = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device).reshape(1, -1)
    words = philox4x32(groups, steps, _counter(index, device), _counter(kind, device), k0, k1)
    # [steps, groups, 4] -> [steps, 4 * groups]: word w of group g is element 4 g + w
    return torch.stack(torch.broadcast_tensors(*words), dim=-1).reshape(steps.shape[0], -1)[:, :numel]


def unit_draws(seed: int | Tensor, kind: int, index: int, steps: Tensor | int, batch: int, hidden: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Draws of the per-unit masks of one layer-direction: one Philox call per (t, b, j), four words.

    Unit j < hidden of batch row b at step t reads Philox(c0 = b * hidden + j, c1 = t, c2 = index,
    c3 = kind); each mask takes its own word (WORD_*). Returns four int64 [len(steps), batch, hidden].
    """
    k0, k1 = seed_key(seed)
    steps = _counter(steps, device).reshape(-1, 1, 1)
    units = torch.arange(batch * hidden, dtype=torch.int64, device=device).reshape(1, batch, hidden)
    words = philox4x32(units, steps, _counter(index, device), _counter(kind, device), k0, k1)
    return tuple(w.expand(steps.shape[0], batch, hidden) for w in torch.broadcast_tensors(*words))
