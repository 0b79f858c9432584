"""Small least-recently-used caches that live for the process (launch parameters, seeds, plans, compiled
launches, barrier counters, zero states), and the stream a kept device tensor belongs to."""

from __future__ import annotations

import collections

import torch


def kept(cache: collections.OrderedDict, key, limit: int, make):
    """cache[key], made by make() where it is missing, as the most recently used entry; the least recently
    used dropped past limit."""
    found = cache.get(key)
    if found is None:
        found = cache[key] = make()
        if len(cache) > limit:
            cache.popitem(last=False)
    else:
        recently_used(cache, key)
    return found


def recently_used(cache: collections.OrderedDict, key) -> None:
    """Move key to the end of an LRU cache, if it is still there: another thread may have dropped it since."""
    try:
        cache.move_to_end(key)
    except KeyError:
        pass


def current_stream_handle(device: torch.device) -> int | None:
    """torch.cuda.current_stream(device).cuda_stream, without building a Stream object; None off CUDA. Part
    of a kept device tensor's key: one filled on a stream is read on that stream, in order after the fill."""
    if device.type != "cuda":
        return None
    return torch._C._cuda_getCurrentRawStream(torch.cuda.current_device() if device.index is None else device.index)
