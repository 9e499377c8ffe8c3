"""The live-storage tracker against the C allocator, and fake runs against real ones."""
import ctypes
import gc

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from ld3m_fast import LD3MGenerator, build_tiny_prior
from ld3m_fast.distill.planner import LiveStorageTracker, measure


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc
    except (OSError, AttributeError):
        return None


LIBC = _glibc()


def heap_bytes() -> int:
    """Bytes glibc has handed out: small-block heap plus mmapped large blocks."""
    info = LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


class _HeapSampling(LiveStorageTracker):
    """The tracker, plus the allocator's own count sampled after every op."""

    def __init__(self):
        super().__init__()
        self.base = heap_bytes()
        self.heap_peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.heap_peak = max(self.heap_peak, heap_bytes() - self.base)
        return out


def _iteration(fake: bool):
    """One generator forward + backward on a small config; returns (step, existing tensors)."""
    prior = build_tiny_prior()
    gen = LD3MGenerator(prior, steps=2, grad_mode="recompute", chunk_size=8)
    Z = torch.randn(16, 3, 8, 8)
    c = prior.class_table[torch.arange(16) % 10].clone()
    noise = gen.draw_noise(16, None)

    def step():
        Z_leaf = Z.clone().requires_grad_()
        c_leaf = c.clone().requires_grad_()
        gen(Z_leaf, c_leaf, noise).square().mean().backward()

    existing = tuple(prior.parameters()) + tuple(prior.buffers()) + (Z, c, noise.start)
    return step, existing


@pytest.mark.skipif(LIBC is None, reason="needs glibc's mallinfo2")
def test_tracker_agrees_with_the_allocator_on_a_real_cpu_run():
    step, _ = _iteration(fake=False)
    step()  # warm up lazily allocated state (kernels, caches)
    gc.collect()
    tracker = _HeapSampling()
    with tracker:
        step()
    print(f"\ntracker peak {tracker.peak / 2**20:.2f} MiB, allocator peak "
          f"{tracker.heap_peak / 2**20:.2f} MiB")
    assert tracker.peak == pytest.approx(tracker.heap_peak, rel=0.05)


def test_fake_run_matches_real_run():
    real_step, real_existing = _iteration(fake=False)
    real = measure(real_step, existing=real_existing)
    with FakeTensorMode():
        fake_step, fake_existing = _iteration(fake=True)
        fake = measure(fake_step, existing=fake_existing)
    # Identical up to a few scalar temporaries.
    assert fake.peak_bytes == pytest.approx(real.peak_bytes, rel=1e-3)
    assert fake.flops == real.flops > 0


def test_freed_storages_leave_the_count():
    mib4 = 4 * 2**20  # one 1024 x 1024 float32 tensor
    tracker = LiveStorageTracker()
    with tracker:
        a = torch.ones(1024, 1024)
        b = a * 2
        del a
        c = b + 1  # noqa: F841
    assert tracker.peak == 2 * mib4  # a and b, then b and c
    assert tracker.current == 2 * mib4


def test_cpu_attention_flops_are_counted():
    with FakeTensorMode():
        q = torch.randn(2, 4, 64, 32, requires_grad=True)
        m = measure(lambda: F.scaled_dot_product_attention(q, q, q).sum().backward())
    forward = 4 * 2 * 4 * 64 * 64 * 32
    assert m.flops >= forward * 3  # forward + backward (2.5x forward)
