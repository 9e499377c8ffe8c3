"""Peak memory and FLOPs of real code, measured without running it at size.

`measure(fn)` runs `fn` under a live-storage tracker (a TorchDispatchMode that
adds a storage's bytes when an op first returns it and subtracts them when the
storage is freed) and counts FLOPs from torch's formula registry. Inside `FakeTensorMode` nothing is
computed, so a full-size iteration of a 400 M-parameter prior costs seconds on a
laptop; outside it, the same tracker measures a real CPU run (which is how the
tracker is validated against the allocator in the tests).

Fake tensors rather than the meta device: meta kernels over-report attention
memory, fake tensors run the real dispatch (and the CPU flash-attention op).
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import (flop_registry, register_flop_formula,
                                      sdpa_backward_flop_count, sdpa_flop_count)

aten = torch.ops.aten


def _register_cpu_attention_flops():
    """FlopCounterMode counts CUDA SDPA kernels but not the CPU flash-attention op."""
    forward = aten._scaled_dot_product_flash_attention_for_cpu
    backward = aten._scaled_dot_product_flash_attention_for_cpu_backward
    if forward in flop_registry:
        return

    @register_flop_formula(forward, get_raw=True)
    def _cpu_sdpa(query, key, value, *args, out_val=None, **kwargs) -> int:
        return sdpa_flop_count(query.shape, key.shape, value.shape)

    @register_flop_formula(backward, get_raw=True)
    def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


_register_cpu_attention_flops()


class LiveStorageTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages and their peak, and the FLOPs of every op.

    A storage is counted from the first op that returns it until it is freed
    (a weakref finaliser on the storage). Tensors that existed before the mode
    was entered (weights, inputs) are added with `track(...)`. FLOPs come from
    torch's formula registry (`torch.utils.flop_counter`), counted here rather
    than through `FlopCounterMode`, whose per-module tracker rejects
    `autograd.grad` with respect to a module's leaf input (which the two-pass
    micro-batched algorithms use).
    """

    def __init__(self):
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.phase_peaks: dict[str, int] = {}
        self._phase: str | None = None
        self.flops = 0
        self.flops_by_op: dict[str, int] = {}
        self._paused = False

    @contextmanager
    def phase(self, name: str):
        """Attribute the peak reached inside this block to `name`."""
        outer, self._phase = self._phase, name
        self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), self.current)
        try:
            yield
        finally:
            self._phase = outer

    @contextmanager
    def paused(self):
        """Ops inside are neither counted nor tracked (a nested measurement runs instead)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def bump(self, transient: int) -> None:
        """A transient of `transient` bytes above what is live now (a replayed call's working memory)."""
        self._reach(self.current + int(transient))

    def add_flops(self, flops_by_op: dict) -> None:
        for name, flops in flops_by_op.items():
            self.flops += flops
            self.flops_by_op[name] = self.flops_by_op.get(name, 0) + flops

    def _reach(self, level: int) -> None:
        self.peak = max(self.peak, level)
        if self._phase is not None:
            self.phase_peaks[self._phase] = max(self.phase_peaks[self._phase], level)

    def nested(self) -> "LiveStorageTracker":
        """A fresh tracker that already knows the storages live here (weights, inputs), so that
        it counts only what is allocated under it (`paused` this one meanwhile)."""
        tracker = LiveStorageTracker()
        tracker._live = dict(self._live)
        tracker.current = tracker.peak = self.current
        return tracker

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
        self._reach(self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int):
        nbytes = self._live.pop(key, None)
        if nbytes is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._paused:
            return out
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._add(item)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.add_flops({str(func._overloadpacket): int(formula(*args, **kwargs, out_val=out))})
        return out


class PeakAndFlops:
    """Unit views shared by measurements and estimates (`peak_bytes`, `flops` fields)."""

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30

    @property
    def tflops(self) -> float:
        return self.flops / 1e12


@dataclass
class Measurement(PeakAndFlops):
    """Peak live bytes (including tracked inputs), bytes live at the end, total FLOPs."""

    peak_bytes: int
    end_bytes: int
    flops: int
    flops_by_op: dict
    phase_peaks: dict = field(default_factory=dict)


def measure(fn, *, existing: tuple[torch.Tensor, ...] = (), with_phases: bool = False) -> Measurement:
    """Run `fn()` under the tracker; `existing` counts as live from the start.

    With `with_phases`, `fn` is called as `fn(phase)` where `phase(name)` is a
    context manager attributing peaks to named stages (`Measurement.phase_peaks`).
    """
    tracker = LiveStorageTracker().track(*existing)
    with tracker:
        fn(tracker.phase) if with_phases else fn()
    return Measurement(tracker.peak, tracker.current, tracker.flops, dict(tracker.flops_by_op),
                       dict(tracker.phase_peaks))


def allocator_peak(build, run) -> tuple[int, int, object]:
    """(peak bytes, bytes allocated when `run` began, what `build` returned): the CPU allocator's
    own accounting, an independent check of the tracker above.

    `build()` makes everything the run needs (weights, inputs) and `run(built)` runs it, both under
    `torch.profiler` with `profile_memory=True`: every allocation and free the c10 allocator reports
    carries its running total of allocated bytes, counted from the start of the profile (building
    inside it counts the weights). The peak is the largest total reported while `run` ran.
    """
    import time

    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        built = build()
        started = time.time_ns()  # the profiler stamps its events with the wall clock, in ns
        run(built)
        ended = time.time_ns()
    events = []

    def walk(node):
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.total_allocated, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    events.sort()
    # The allocator's counter is process-wide and keeps what earlier profiles left: count from this
    # profile's start (a fresh process per measurement is cleaner still: frees of blocks made under an
    # earlier profile are subtracted here).
    offset = events[0][1] - events[0][2] if events else 0
    totals = [(stamp, total - offset) for stamp, total, _ in events]
    before = max([total for stamp, total in totals if stamp < started][-1:] or [0])
    during = [total for stamp, total in totals if started <= stamp <= ended]
    return max(during + [before]), before, built
