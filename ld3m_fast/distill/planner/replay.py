"""Replay repeated denoiser and decoder calls inside a planner walk from a recording of the first.

A walked iteration calls the denoiser hundreds of times with the same few input shapes, and
under fake tensors each call dispatches thousands of operators in Python. What a call does to
memory depends only on its signature: the inputs' shapes, dtypes and `requires_grad`, its other
arguments, grad mode, autocast, and whether the transformer blocks are checkpointed. So the
first call of each signature is run for real (on fake copies of its inputs, under a tracker of
its own, with the walk's tracker paused) and summarised as a `Recording`:

- forward: the peak above what was live at the call (`forward_peak`), the outputs' layout, the
  bytes the autograd graph keeps until backward (`kept`), which inputs it keeps alive, the
  bytes that outlive even the graph (`leaked`: autocast's cache of casts of leaves that require
  grad, kept until autocast exits), and the FLOPs;
- backward (when the call made a graph): the peak above what was live when backward began,
  the input gradients' layout, and the FLOPs.

Every call of that signature (the first too) is then a `_Replayed` autograd function that
makes the same allocations at the same moments: its outputs, a block of `kept` bytes held by
the graph with the inputs it keeps, the recorded peaks as transients, the FLOPs, and in
backward the input gradients. The walk's tracker sees what the real call would have made it
see, in a fraction of the time; tests/test_planner_replay.py checks replayed walks against
plain ones on the tiny prior in every mode: FLOPs equal op by op, peaks within 0.2% and most to
the byte (bf16's autocast keeps casts of leaves past their graphs, and selective checkpointing
keeps its inputs in ways a recording sees only approximately: a few KB).

The calls replayed (`REPLAYED`): the prior's `eps` and `decode`, the generator's
checkpointed calls (`selective_denoise`, `checkpointed_guided_eps`) as whole units, and the
`forward` and `embed` of a distillation network whose parameters are frozen (DM's). A call
made where a recording cannot stand for it runs for real: inside a checkpointed region
(saved-tensor hooks are active: the region's recompute must see real operators) or under
another dispatch mode (selective checkpointing picks operators by their name).
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from .measure import LiveStorageTracker

REPLAYED = {"prior": ("eps", "decode"), "generator": ("selective_denoise", "checkpointed_guided_eps")}
_RECORDINGS: dict = {}  # signature -> Recording, for the life of the process


@dataclass(frozen=True)
class Layout:
    """How a call's tensor outputs (or input gradients) sit in storage: one storage per group."""

    metas: tuple          # per tensor: (shape, stride, offset, dtype, group) or None
    group_bytes: tuple    # bytes of each storage group

    @classmethod
    def of(cls, tensors) -> "Layout":
        groups, metas = {}, []
        for t in tensors:
            if t is None:
                metas.append(None)
                continue
            key = t.untyped_storage()._cdata
            if key not in groups:
                groups[key] = (len(groups), t.untyped_storage().nbytes())
            metas.append((tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype, groups[key][0]))
        return cls(tuple(metas), tuple(size for _, size in sorted(groups.values())))

    @property
    def nbytes(self) -> int:
        return sum(self.group_bytes)

    def allocate(self) -> list:
        """Fresh tensors of this layout (None where the layout has none)."""
        bases = [torch.empty(size, dtype=torch.uint8) for size in self.group_bytes]
        tensors = []
        for meta in self.metas:
            if meta is None:
                tensors.append(None)
                continue
            shape, stride, offset, dtype, group = meta
            tensors.append(bases[group].view(dtype).as_strided(shape, stride, offset))
        return tensors


@dataclass
class Recording:
    outputs: Layout
    forward_peak: int
    forward_flops: dict
    kept: int                 # bytes the graph keeps until backward (beyond outputs and inputs)
    kept_inputs: tuple        # indices (among the tensor inputs) of the inputs the graph keeps alive
    leaked: int = 0           # bytes that outlive the graph (autocast's cast cache), not per leaf
    leaf_casts: tuple = ()    # (input index, bytes) of the leaves whose casts autocast keeps
    backward_peak: int = 0
    backward_flops: dict | None = None
    input_grads: Layout | None = None


def _tracker() -> LiveStorageTracker | None:
    for mode in reversed(_get_current_dispatch_mode_stack()):
        if isinstance(mode, LiveStorageTracker):
            return mode
    return None


def _replayable() -> bool:
    """No saved-tensor hooks (a checkpointed region) and no dispatch mode but the walk's own."""
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        return False
    from torch._subclasses.fake_tensor import FakeTensorMode

    return all(isinstance(m, (LiveStorageTracker, FakeTensorMode)) for m in _get_current_dispatch_mode_stack())


def _split(args) -> tuple[list, tuple]:
    """(the tensor arguments, a hashable description of the others)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    others = tuple(None if isinstance(a, torch.Tensor) else a for a in args)
    return tensors, others


def _join(args, tensors) -> list:
    it = iter(tensors)
    return [next(it) if isinstance(a, torch.Tensor) else a for a in args]


def _signature(name: str, args, state) -> tuple:
    grad = torch.is_grad_enabled()
    autocast = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
    tensors, others = _split(args)
    metas = tuple((tuple(x.shape), tuple(x.stride()), x.dtype, x.requires_grad and grad, x.is_leaf)
                  for x in tensors)
    return (name, state(), grad, autocast, metas, others)


def _record(function, args, walk_tracker: LiveStorageTracker) -> Recording:
    """Run `function` on fresh copies of the tensor `args` under a tracker of its own (knowing what
    the walk's tracker knows is live: the weights), forward and backward."""
    grad = torch.is_grad_enabled()
    inputs, _ = _split(args)
    # Same strides as the inputs (an expanded null class, a slice): operators decompose by layout.
    fresh = [torch.empty_strided(x.shape, x.stride(), dtype=x.dtype).requires_grad_(x.requires_grad and grad)
             for x in inputs]
    # A leaf that requires grad is passed as such (autocast caches its casts, AccumulateGrad keeps
    # it); another input that requires grad is a non-leaf, as in the walk, so that the graph keeps
    # it only if it saves it; the others are plain tensors.
    call = [f.clone() if f.requires_grad and not x.is_leaf else f for f, x in zip(fresh, inputs)]
    wants = {i: f for i, f in enumerate(fresh) if f.requires_grad}  # held: the gradients are theirs
    recorder = walk_tracker.nested()
    base = recorder.current  # the walk's live storages: weights, and everything before this call
    recorder.track(*fresh, *call)
    del fresh
    keys = [c.untyped_storage()._cdata for c in call]
    sizes = [c.untyped_storage().nbytes() for c in call]
    with recorder:
        start = recorder.current
        out = function(*_join(args, call))
        outputs = (out,) if not isinstance(out, tuple) else out
        del out, call
        layout = Layout.of(outputs)
        recording = Recording(layout, recorder.peak - start, dict(recorder.flops_by_op), 0, ())
        # An input is kept if its storage outlives our references to it.
        recording.kept_inputs = tuple(i for i, key in enumerate(keys) if key in recorder._live)
        freed = sum(size for i, size in enumerate(sizes) if i not in recording.kept_inputs)
        kept = recorder.current - start + freed - layout.nbytes
        graph = [o for o in outputs if o is not None and o.requires_grad]
        if wants and graph:
            grad_outputs = [torch.empty_like(o) for o in graph]
            before = recorder.peak = recorder.current
            flops_before = dict(recorder.flops_by_op)
            grads = torch.autograd.grad(graph, list(wants.values()), grad_outputs, allow_unused=True)
            recording.backward_peak = recorder.peak - before
            recording.backward_flops = {k: v - flops_before.get(k, 0) for k, v in recorder.flops_by_op.items()
                                        if v != flops_before.get(k, 0)}
            by_input = dict(zip(wants, grads))
            recording.input_grads = Layout.of([by_input.get(i) for i in range(len(inputs))])
            del grads, grad_outputs, by_input
        del outputs, graph
        # Live now beyond the leaves we hold: what outlives the graph (autocast's cast cache).
        held = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in wants.values()}
        leaked = max(0, recorder.current - base - sum(held.values()))
        recording.kept = max(0, kept - leaked)
        # Autocast keeps one cast per leaf that requires grad: a later call on the same leaf reuses it.
        casts = tuple((i, leaf.numel() * torch.empty((), dtype=torch.get_autocast_dtype("cpu")).element_size())
                      for i, leaf in wants.items() if inputs[i].is_leaf and leaf.is_floating_point())
        subsets = (tuple(c for bit, c in enumerate(casts) if mask >> bit & 1) for mask in range(1, 2 ** len(casts)))
        matching = next((sub for sub in subsets if sum(size for _, size in sub) == leaked), None)
        if torch.is_autocast_enabled("cpu") and matching is not None:
            recording.leaf_casts = matching
        else:
            recording.leaked = leaked
    return recording


class _Replayed(torch.autograd.Function):
    """A recorded call: its allocations, transients and FLOPs, forward and backward."""

    @staticmethod
    def forward(ctx, recording: Recording, leaks: list, *inputs):
        tracker = _tracker()
        if tracker is not None:
            tracker.bump(recording.forward_peak)
            tracker.add_flops(recording.forward_flops)
        outputs = [o for o in recording.outputs.allocate() if o is not None]
        if recording.leaked:
            leaks.append(torch.empty(recording.leaked, dtype=torch.uint8))
        for i, size in recording.leaf_casts:
            leaks.cast(inputs[i], size)
        kept = torch.empty(recording.kept, dtype=torch.uint8)
        ctx.save_for_backward(kept, *(inputs[i] for i in recording.kept_inputs))
        ctx.recording = recording
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        recording = ctx.recording
        tracker = _tracker()
        if tracker is not None:
            tracker.bump(recording.backward_peak)
            tracker.add_flops(recording.backward_flops or {})
        needs = ctx.needs_input_grad[2:]
        grads = recording.input_grads.allocate() if recording.input_grads is not None else [None] * len(needs)
        return (None, None) + tuple(g if need else None for g, need in zip(grads, needs))


class _Leaks(list):
    """What replayed calls keep beyond their graphs until the walk's autocast ends: autocast's
    casts of leaves (one per leaf, as autocast's cache keeps one) and other leaked bytes."""

    def __init__(self):
        super().__init__()
        self.casts: dict = {}  # id(leaf) -> (the leaf, its cast's bytes)

    def cast(self, leaf: torch.Tensor, size: int) -> None:
        held = self.casts.get(id(leaf))
        if held is None or held[0] is not leaf:
            self.casts[id(leaf)] = (leaf, torch.empty(size, dtype=torch.uint8))

    def clear(self) -> None:
        super().clear()
        self.casts.clear()


class _ReplayedCall:
    """Stands for one method (`eps`, `decode`, ...) of the walk's prior or generator."""

    def __init__(self, key: str, name: str, function, state, leaks: list, condition=None):
        self.key, self.name, self.function, self.state, self.leaks = key, name, function, state, leaks
        self.condition = condition  # None, or a callable: False runs the call for real

    def __call__(self, *args):
        if not _replayable() or _tracker() is None or (self.condition is not None and not self.condition()):
            return self.function(*args)
        signature = (self.key, _signature(self.name, args, self.state))
        recording = _RECORDINGS.get(signature)
        if recording is None:
            tracker = _tracker()
            with tracker.paused():
                recording = _record(self.function, args, tracker)
            _RECORDINGS[signature] = recording
        inputs, _ = _split(args)
        produced = iter(_Replayed.apply(recording, self.leaks, *inputs))
        outputs = [None if meta is None else next(produced) for meta in recording.outputs.metas]
        return tuple(outputs) if len(outputs) > 1 else outputs[0]


@contextmanager
def replaying(generator, key: str, network=None):
    """Inside, the calls of `REPLAYED` on `generator` and its prior, and those of the frozen
    networks `network` (a `NetworkSpec`) builds, are replayed from recordings named by `key`
    (the prior's architecture) and the call's signature; the recordings last for the process."""
    transformers = getattr(generator, "_transformers", [])

    def state() -> tuple:
        """What the signature adds: the transformer blocks' checkpointing, the selective level."""
        return (tuple(bool(getattr(m, "gradient_checkpointing", False)) for m in transformers),
                generator.sac_min_flops)

    leaks = _Leaks()
    owners = {"prior": generator.prior, "generator": generator}
    for owner, names in REPLAYED.items():
        for name in names:
            setattr(owners[owner], name, _ReplayedCall(key, name, getattr(owners[owner], name), state, leaks))
    if network is not None:
        network.build = _replayed_builder(network, leaks)
    try:
        yield
    finally:
        for owner, names in REPLAYED.items():
            for name in names:
                delattr(owners[owner], name)
        if network is not None:
            del network.build
        leaks.clear()


def _replayed_builder(network, leaks):
    """`network.build` whose networks replay their `forward` and `embed` while frozen (DM's: no
    parameter requires grad; DC and MTT differentiate the parameters and run for real)."""
    import dataclasses

    build = network.build
    key = repr(sorted(dataclasses.asdict(network).items()))

    def built():
        module = build()
        # Weak: the wrappers live on the module, which must still be freed when the algorithm drops it.
        owner = weakref.ref(module)

        def frozen() -> bool:
            return not any(p.requires_grad for p in owner().parameters())

        def state() -> tuple:
            return (next(owner().parameters()).dtype,)

        def method(name):
            return lambda *args: getattr(type(owner()), name)(owner(), *args)

        for name in ("forward", "embed"):
            if hasattr(module, name):
                setattr(module, name, _ReplayedCall(key, f"network.{name}", method(name), state, leaks, frozen))
        return module

    return built


def forget_recordings() -> None:
    _RECORDINGS.clear()


__all__ = ["REPLAYED", "Recording", "forget_recordings", "replaying"]
