"""Comparison helpers for the tests."""

from __future__ import annotations

import torch


def error_ratio(ref: torch.Tensor, out: torch.Tensor) -> float:
    """RMS of the difference over the RMS of the reference (flash-linear-attention's measure)."""
    ref, out = ref.detach().double(), out.detach().double()
    return ((ref - out).square().mean().sqrt() / ref.square().mean().sqrt().clamp_min(1e-300)).item()


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float) -> None:
    """Fail unless out matches ref in shape, has no NaN where ref has none, and its error ratio is <= ratio."""
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert not out.isnan().any() or ref.isnan().any(), f"{name}: NaN in output"
    if ref.numel() == 0:
        return
    err = error_ratio(ref, out)
    assert err <= ratio, f"{name}: error ratio {err:.3g} > {ratio:.3g} (max abs diff {(ref.double() - out.double()).abs().max().item():.3g})"
