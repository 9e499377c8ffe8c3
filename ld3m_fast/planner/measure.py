"""Peak memory and FLOPs of real code, measured without running it at size.

`measure(fn)` runs `fn` under a live-storage tracker (a TorchDispatchMode that
adds a storage's bytes when an op first returns it and subtracts them when the
storage is freed) and `FlopCounterMode`. Inside `FakeTensorMode` nothing is
computed, so a full-size iteration of a 400 M-parameter prior costs seconds on a
laptop; outside it, the same tracker measures a real CPU run (which is how the
tracker is validated against the allocator in the tests).

Fake tensors rather than the meta device: meta kernels over-report attention
memory, fake tensors run the real dispatch (and the CPU flash-attention op).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import (FlopCounterMode, register_flop_formula,
                                      sdpa_backward_flop_count, sdpa_flop_count)

aten = torch.ops.aten


def _register_cpu_attention_flops():
    """FlopCounterMode counts CUDA SDPA kernels but not the CPU flash-attention op."""
    forward = aten._scaled_dot_product_flash_attention_for_cpu
    backward = aten._scaled_dot_product_flash_attention_for_cpu_backward
    from torch.utils import flop_counter

    if forward.default in flop_counter.flop_registry:
        return

    @register_flop_formula(forward, get_raw=True)
    def _cpu_sdpa(query, key, value, *args, out_val=None, **kwargs) -> int:
        return sdpa_flop_count(query.shape, key.shape, value.shape)

    @register_flop_formula(backward, get_raw=True)
    def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


_register_cpu_attention_flops()


class LiveStorageTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages and their peak.

    A storage is counted from the first op that returns it until it is freed
    (a weakref finaliser on the storage). Tensors that existed before the mode
    was entered (weights, inputs) are added with `track(...)`.
    """

    def __init__(self):
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def track(self, *tensors: torch.Tensor):
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self._add(tensor)
        return self

    def _add(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        nbytes = storage.nbytes()
        self._live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int):
        nbytes = self._live.pop(key, None)
        if nbytes is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._add(item)
        return out


@dataclass
class Measurement:
    """Peak live bytes (including tracked inputs), bytes live at the end, total FLOPs."""

    peak_bytes: int
    end_bytes: int
    flops: int
    flops_by_op: dict

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30

    @property
    def tflops(self) -> float:
        return self.flops / 1e12


def measure(fn, *, existing: tuple[torch.Tensor, ...] = (), count_flops: bool = True) -> Measurement:
    """Run `fn()` under the tracker (and a FLOP counter); `existing` counts as live from the start."""
    tracker = LiveStorageTracker().track(*existing)
    counter = FlopCounterMode(display=False) if count_flops else None
    if counter is not None:
        with counter, tracker:
            fn()
        by_op = {str(k): v for k, v in counter.get_flop_counts().get("Global", {}).items()}
        flops = counter.get_total_flops()
    else:
        with tracker:
            fn()
        by_op, flops = {}, 0
    return Measurement(tracker.peak, tracker.current, flops, by_op)
