"""Masks the reference's autograd graph does not keep: SPEC.md section 4 (no mask is stored between forward
and backward), the way the kernels do it, for a backend built of torch ops.

While the reference runs a training forward, a saved-tensor hook replaces each mask the graph would save
(the condition of a torch.where, say) by where to find it again: its place in the masks dict and its view.
The first backward step that needs one draws the masks again from the seed; they live until the graph is
freed, as the kernels' regenerated masks live for their backward.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch
from torch import Tensor

from .. import backends

MaskKey = tuple  # (name,) or (name, index): where a mask sits in sample_masks's dict


def _masks_by_key(masks: dict) -> dict:
    found = {}
    for name, value in masks.items():
        for index, mask in enumerate(value) if isinstance(value, list) else [(None, value)]:
            if mask is not None:
                found[(name,) if index is None else (name, index)] = mask
    return found


@dataclasses.dataclass(frozen=True)
class _SavedMask:
    """A view of a mask, standing for it in the graph."""

    regenerator: "_Regenerator"
    key: MaskKey
    offset: int
    shape: tuple
    stride: tuple


@dataclasses.dataclass(frozen=True)
class _SavedTensor:
    """A tensor the graph saves, with its version then: modified in place before the backward, it raises
    autograd's own error rather than giving wrong gradients."""

    tensor: Tensor
    version: int

    def unpacked(self) -> Tensor:
        now = self.tensor._version
        if now != self.version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace operation: "
                f"[{self.tensor.type()} {list(self.tensor.shape)}] is at version {now}; expected version "
                f"{self.version} instead"
            )
        return self.tensor


class _Regenerator:
    def __init__(self, masks_by_key: dict, draw: Callable[[], dict], outer: tuple | None):
        # storages of this forward's masks (alive while the forward runs, when packing happens), on one device
        stored = {k: m for k, m in masks_by_key.items() if m.numel()}
        self.keys = {m.untyped_storage().data_ptr(): k for k, m in stored.items()}
        assert len(self.keys) == len(stored), "masks share storage"
        self.draw = draw
        self.drawn: dict | None = None
        # hooks already in place (checkpoint, save_on_cpu, a test's): every tensor but a mask goes through them
        self.outer_pack, self.outer_unpack = outer if outer is not None else (None, None)

    def pack(self, t: Tensor):
        key = self.keys.get(t.untyped_storage().data_ptr()) if t.dtype == torch.bool and t.numel() else None
        if key is not None:
            return _SavedMask(self, key, t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        # autograd checks no version of a tensor saved through hooks: this one does, as it would without them
        return _SavedTensor(t, t._version) if self.outer_pack is None else self.outer_pack(t)

    def unpack(self, saved):
        if isinstance(saved, _SavedTensor):
            return saved.unpacked()
        if not isinstance(saved, _SavedMask):
            return self.outer_unpack(saved)
        if self.drawn is None:
            self.drawn = _masks_by_key(self.draw())
        return self.drawn[saved.key].as_strided(saved.shape, saved.stride, saved.offset)


def _outer_hooks() -> tuple | None | bool:
    """The saved-tensor hooks already in place (a pair), None if there are none, or False where ours cannot
    compose with them: a torch whose private autograd API lacks what this needs."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return False if top is None else top(False)


def _hooks_apply(device: torch.device) -> bool:
    """Whether this forward builds an eager autograd graph whose saves the hook sees: tensors with storage
    of their own (CPU, CUDA), not under a torch.func transform or the compiler's tracing (which run no
    such hooks), and hooks enabled."""
    if device.type not in ("cpu", "cuda") or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if backends.torch_func_transform_active():
        return False
    enabled = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", None)
    return enabled is not None and enabled()


@contextlib.contextmanager
def masks_regenerated_in_backward(masks: dict | None, draw: Callable[[], dict], device: torch.device):
    """Within this context, the autograd graph saves where each of `masks` (sample_masks's dict on `device`,
    which draw() returns again) is found rather than the mask; other tensors are saved as before, their
    version checked when unpacked (autograd checks none of a tensor saved through hooks). Where the hook
    cannot apply, or no mask is drawn, the graph keeps the masks, as autograd would."""
    masks_by_key = _masks_by_key(masks) if masks is not None else {}
    outer = _outer_hooks() if masks_by_key and _hooks_apply(device) else False
    if outer is False:
        yield
        return
    regenerator = _Regenerator(masks_by_key, draw, outer)
    with torch.autograd.graph.saved_tensors_hooks(regenerator.pack, regenerator.unpack):
        yield
