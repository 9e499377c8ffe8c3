"""DSA: each augmentation group, parameter ranges, determinism, Siamese sharing, gradients."""
from __future__ import annotations

import math

import pytest
import torch

from ld3m_fast.dsa import DEFAULT_STRATEGY, DSA, GROUPS, AugmentationDraw, parse_strategy


def _gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _draw(group, batch, **params) -> AugmentationDraw:
    return AugmentationDraw(group, batch, {k: torch.as_tensor(v) for k, v in params.items()})


# ----------------------------------------------------------------------------- groups one by one

def test_color_brightness_saturation_contrast():
    aug = DSA("color")
    x = torch.randn(2, 3, 5, 5)
    out = aug.apply(x, _draw("color", 2, brightness=[0.3, -0.2], saturation=[1.0, 1.0],
                             contrast=[1.0, 1.0]))
    assert torch.allclose(out, x + torch.tensor([0.3, -0.2]).view(2, 1, 1, 1), atol=1e-6)
    grey = aug.apply(x, _draw("color", 2, brightness=[0.0, 0.0], saturation=[0.0, 0.0],
                              contrast=[1.0, 1.0]))
    assert torch.allclose(grey, x.mean(1, keepdim=True).expand_as(x), atol=1e-6)
    flat = aug.apply(x, _draw("color", 2, brightness=[0.0, 0.0], saturation=[1.0, 1.0],
                              contrast=[0.0, 2.0]))
    means = x.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(flat[0], means[0].expand_as(x[0]), atol=1e-6)
    assert torch.allclose(flat[1], 2 * x[1] - means[1], atol=1e-5)


def test_crop_translates_with_zero_fill():
    aug = DSA("crop")
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8) + 1
    # size 8: max shift round(0.125 * 8) = 1, fractions map to shifts -1, 0, +1.
    out = aug.apply(x, _draw("crop", 2, shift=[[0.9, 0.5], [0.1, 0.0]]))
    expected0 = torch.zeros(8, 8)
    expected0[:-1] = x[0, 0, 1:]  # row shift +1: out[i] = x[i + 1]
    assert torch.equal(out[0, 0], expected0)
    expected1 = torch.zeros(8, 8)
    expected1[1:, 1:] = x[1, 0, :-1, :-1]  # shifts (-1, -1)
    assert torch.equal(out[1, 0], expected1)


def test_cutout_zeros_a_half_size_square():
    aug = DSA("cutout")
    x = torch.ones(3, 2, 10, 10)
    out = aug.apply(x, _draw("cutout", 3, centre=[[0.5, 0.5], [0.0, 0.0], [0.99, 0.3]]))
    zeros = (out == 0).sum(dim=(2, 3))[:, 0]
    assert zeros[0] == 25  # a 5x5 square fully inside
    assert zeros[1] < 25 and zeros[1] > 0  # clipped at the corner
    assert torch.equal(out[:, 0], out[:, 1])  # same mask for every channel
    assert torch.equal(out[0, 0, 3:8, 3:8], torch.zeros(5, 5))


def test_flip_is_horizontal_per_sample():
    aug = DSA("flip")
    x = torch.randn(2, 3, 4, 6)
    out = aug.apply(x, _draw("flip", 2, flip=[True, False]))
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])


def test_scale_and_rotate_identities_and_quarter_turn():
    x = torch.randn(2, 3, 7, 7)
    same = DSA("scale").apply(x, _draw("scale", 2, scale=[[1.0, 1.0], [1.0, 1.0]]))
    assert torch.allclose(same, x, atol=1e-5)
    same = DSA("rotate").apply(x, _draw("rotate", 2, angle=[0.0, 0.0]))
    assert torch.allclose(same, x, atol=1e-5)
    quarter = DSA("rotate").apply(x, _draw("rotate", 2, angle=[math.pi / 2, math.pi / 2]))
    assert torch.allclose(quarter, torch.rot90(x, -1, dims=(2, 3)), atol=1e-4)
    # Zoom in by 2 in x only: the centre column stays, content spreads outwards.
    zoom = DSA("scale").apply(x, _draw("scale", 2, scale=[[0.5, 1.0], [0.5, 1.0]]))
    assert torch.allclose(zoom[..., 3], x[..., 3], atol=1e-5)


def test_drawn_parameters_stay_in_spec_ranges():
    generator = _gen(3)
    seen = set()
    for _ in range(300):
        aug = DSA()
        draw = aug.draw(8, generator)
        seen.add(draw.group)
        p = draw.params
        if draw.group == "color":
            assert p["brightness"].abs().max() <= 0.5
            assert 0 <= p["saturation"].min() and p["saturation"].max() < 2
            assert 0.5 <= p["contrast"].min() and p["contrast"].max() < 1.5
        elif draw.group == "scale":
            assert p["scale"].min() >= 1 / 1.2 - 1e-6 and p["scale"].max() <= 1.2 + 1e-6
        elif draw.group == "rotate":
            assert p["angle"].abs().max() <= math.radians(15) + 1e-6
        elif draw.group in ("crop", "cutout"):
            values = p["shift" if draw.group == "crop" else "centre"]
            assert values.min() >= 0 and values.max() < 1
    assert seen == set(GROUPS)  # every group gets drawn, one per call


def test_crop_shift_range_is_one_eighth_of_the_side():
    aug = DSA("crop")
    x = torch.zeros(1, 1, 32, 32)
    x[0, 0, 16, 16] = 1.0
    moves = set()
    generator = _gen(0)
    for _ in range(200):
        out = aug(x, generator)
        row, col = divmod(int(out.flatten().argmax()), 32)
        moves.add((row - 16, col - 16))
    shifts = {m for pair in moves for m in pair}
    assert shifts == set(range(-4, 5))  # round(0.125 * 32) = 4 pixels each way


# ----------------------------------------------------------------------------- randomness

def test_determinism_given_a_seed_and_global_rng_untouched():
    x = torch.randn(4, 3, 16, 16)
    aug = DSA(DEFAULT_STRATEGY)
    torch.manual_seed(1234)
    global_state = torch.get_rng_state()
    first = [aug(x, g) for g in [_gen(7)] for _ in range(12)]
    generator = _gen(7)
    second = [aug(x, generator) for _ in range(12)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.equal(torch.get_rng_state(), global_state)
    other = [aug(x, g) for g in [_gen(8)] for _ in range(12)]
    assert any(not torch.equal(a, b) for a, b in zip(first, other))


def test_each_group_on_its_own_is_deterministic_and_consumes_only_the_generator():
    x = torch.randn(3, 3, 12, 12)
    global_state = torch.get_rng_state()
    for group in GROUPS:
        aug = DSA(group)
        assert torch.equal(aug(x, _gen(5)), aug(x, _gen(5)))
    assert torch.equal(torch.get_rng_state(), global_state)


# ----------------------------------------------------------------------------- Siamese

@pytest.mark.parametrize("group", GROUPS)
def test_siamese_rows_share_parameters_across_batch_sizes(group):
    aug = DSA(group)
    real = torch.randn(6, 3, 16, 16)
    synthetic = real[:3].clone()
    draw = aug.draw(6, _gen(11))
    assert torch.allclose(aug.apply(real, draw)[:3], aug.apply(synthetic, draw), atol=1e-6)
    real_out, syn_out = aug.siamese(real, synthetic, _gen(11))
    assert torch.allclose(real_out[:3], syn_out, atol=1e-6)
    with pytest.raises(ValueError, match="draw holds parameters for 6 images"):
        aug.apply(torch.randn(7, 3, 16, 16), draw)


@pytest.mark.parametrize("group", GROUPS)
def test_selected_rows_match_the_whole_batch(group):
    # Micro-batching: images[rows] with draw.select(rows) equals rows of the full result.
    aug = DSA(group)
    x = torch.randn(6, 3, 16, 16)
    draw = aug.draw(6, _gen(21))
    whole = aug.apply(x, draw)
    rows = torch.tensor([4, 1, 5])
    assert torch.allclose(aug.apply(x[rows], draw.select(rows)), whole[rows], atol=1e-6)
    assert torch.allclose(aug.apply(x[2:4], draw.select(slice(2, 4))), whole[2:4], atol=1e-6)


def test_siamese_draw_works_across_resolutions():
    aug = DSA("cutout")
    draw = aug.draw(2, _gen(0))
    big, small = torch.ones(2, 3, 32, 32), torch.ones(2, 3, 16, 16)
    assert (aug.apply(big, draw) == 0).sum(dim=(1, 2, 3)).max() <= 3 * 16 * 16
    assert (aug.apply(small, draw) == 0).sum(dim=(1, 2, 3)).max() <= 3 * 8 * 8


def test_batch_shared_mode_uses_one_parameter_set():
    aug = DSA(DEFAULT_STRATEGY, batch_shared=True)
    x = torch.randn(1, 3, 16, 16).expand(5, -1, -1, -1).contiguous()
    generator = _gen(2)
    for _ in range(12):
        out = aug(x, generator)
        assert torch.allclose(out, out[:1].expand_as(out), atol=1e-6)


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("group", GROUPS)
def test_gradient_flows_to_the_images(group):
    aug = DSA(group)
    x = torch.randn(3, 3, 12, 12, requires_grad=True)
    weights = torch.randn(3, 3, 12, 12)
    (aug(x, _gen(4)) * weights).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("group", GROUPS)
def test_gradcheck_each_group(group):
    aug = DSA(group)
    draw = aug.draw(2, _gen(9))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda images: aug.apply(images, draw), (x,))


# ----------------------------------------------------------------------------- strategies

def test_strategy_parsing():
    assert parse_strategy(DEFAULT_STRATEGY) == GROUPS
    assert parse_strategy("translate_flip") == ("crop", "flip")
    assert parse_strategy("none") == () and parse_strategy("") == ()
    with pytest.raises(ValueError, match="unknown DSA augmentation 'blur'"):
        DSA("color_blur")
    off = DSA("none")
    x = torch.randn(2, 3, 8, 8)
    assert off.draw(2, _gen()) is None and off(x, _gen()) is x
