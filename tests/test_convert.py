"""The CompVis cin256-v2 converter: key map, strictness, schedule check, round trip.

Scaled-down checkpoints are generated in code with the original CompVis key names
and shapes (`compvis_state_dict_shapes`) and random values; every value is distinct,
so each converted tensor can be traced back to exactly one checkpoint tensor by value.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import math
import warnings

import numpy as np
import pytest
import torch

from ld3m_fast.convert import (CIN256_V2, CompVisLDMConfig, add_convert_arguments,
                               build_modules, compvis_key_map, convert_cin256_v2,
                               convert_state_dict, load_compvis_state_dict, run_convert)
from ld3m_fast.errors import PriorError
from ld3m_fast.priors.compvis_keys import (CLASS_TABLE_KEY, SCHEDULE_BUFFERS, UNET_PREFIX,
                                           VQ_PREFIX, compvis_schedule_buffers,
                                           compvis_state_dict_shapes)
from ld3m_fast.priors.configs import (CIN256_V2_COMPVIS_UNET_PARAMS, CIN256_V2_COMPVIS_VQ_PARAMS,
                                      CIN256_V2_SCHEDULER_CONFIG, CIN256_V2_UNET_CONFIG,
                                      CIN256_V2_VQ_CONFIG, DIT_XL_2_256_CONFIG, count_parameters,
                                      instantiate, unet_config_from_compvis,
                                      vq_config_from_compvis)

TINY_VQ_PARAMS = {
    "embed_dim": 3, "n_embed": 16,
    "ddconfig": {"double_z": False, "z_channels": 3, "resolution": 32, "in_channels": 3,
                 "out_ch": 3, "ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1,
                 "attn_resolutions": (), "dropout": 0.0},
}
# Four levels and two res-blocks like cin256-v2 (so input/output block indices reach 10
# and 11), attention at downsample 2/4/8 but not at level 0.
TINY_CIN = CompVisLDMConfig(
    unet_params={**CIN256_V2_COMPVIS_UNET_PARAMS, "image_size": 16, "model_channels": 32,
                 "channel_mult": (1, 2, 2, 3), "context_dim": 16},
    vq_params=TINY_VQ_PARAMS, scheduler_config=CIN256_V2_SCHEDULER_CONFIG,
    num_classes=10, image_size=32)
# A different shape of the same family: attention at every level (factor 1 included),
# one res-block, two heads, two transformer layers per SpatialTransformer.
TINY_DEEP_ATTENTION = CompVisLDMConfig(
    unet_params={**CIN256_V2_COMPVIS_UNET_PARAMS, "image_size": 16, "model_channels": 32,
                 "channel_mult": (1, 2), "attention_resolutions": (1, 2), "num_res_blocks": 1,
                 "num_heads": 2, "transformer_depth": 2, "context_dim": 8},
    vq_params=TINY_VQ_PARAMS, scheduler_config=CIN256_V2_SCHEDULER_CONFIG,
    num_classes=5, image_size=32)


def random_compvis_state_dict(config: CompVisLDMConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A CompVis-named state_dict: distinct random weights and the true schedule buffers.

    Weights are N(0, 0.02^2) so that the converted modules also produce finite outputs.
    """
    generator = torch.Generator().manual_seed(seed)
    shapes = config.expected_shapes()
    schedule = compvis_schedule_buffers(config.scheduler_config["beta_start"],
                                        config.scheduler_config["beta_end"],
                                        config.scheduler_config["num_train_timesteps"])
    return {name: schedule[name] if name in schedule else 0.02 * torch.randn(shape, generator=generator)
            for name, shape in shapes.items()}


def _fingerprint(tensor: torch.Tensor) -> str:
    """Identity of a tensor's values, independent of its shape."""
    return hashlib.sha1(tensor.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def _assert_bijection(state_dict: dict[str, torch.Tensor], converted) -> None:
    """Every converted weight holds the values of exactly one UNet/VQ checkpoint tensor,
    and every UNet/VQ checkpoint tensor is used exactly once."""
    sources = {_fingerprint(v): k for k, v in state_dict.items()
               if k.startswith((UNET_PREFIX, VQ_PREFIX))}
    assert len(sources) == sum(k.startswith((UNET_PREFIX, VQ_PREFIX)) for k in state_dict)
    used: dict[str, str] = {}
    outputs = {**{f"unet.{k}": v for k, v in converted.unet_state_dict.items()},
               **{f"vq.{k}": v for k, v in converted.vq_state_dict.items()}}
    for name, tensor in outputs.items():
        source = sources.get(_fingerprint(tensor))
        assert source is not None, f"{name} holds values of no checkpoint tensor"
        assert source not in used, f"{source} fills both {used[source]} and {name}"
        assert tensor.numel() == state_dict[source].numel()
        used[source] = name
    assert set(used) == set(sources.values()), f"unused: {sorted(set(sources.values()) - set(used))[:5]}"
    assert sum(t.numel() for t in outputs.values()) == sum(state_dict[s].numel() for s in sources.values())


# --- configs and key lists ------------------------------------------------------------------

def test_full_size_parameter_counts_match_spec():
    assert round(count_parameters("cin256-v2-unet") / 1e6, 1) == 400.9
    assert round(count_parameters("cin256-v2-vq") / 1e6, 1) == 55.3
    assert round(count_parameters("sd-kl-f8") / 1e6, 1) == 83.7


def test_dit_xl_2_has_675m_distinct_parameters():
    # diffusers repeats the shared timestep/class embedders in each of the 28 blocks.
    model = instantiate("DiTTransformer2DModel", DIT_XL_2_256_CONFIG)
    per_block_copy = sum(p.numel() for p in model.transformer_blocks[0].norm1.emb.parameters())
    distinct = count_parameters("dit-xl-2-256") - 27 * per_block_copy
    assert round(distinct / 1e6) == 675


def test_full_size_compvis_key_list_has_906_tensors_and_diffusers_totals():
    shapes = CIN256_V2.expected_shapes()
    assert len(shapes) == 906
    assert sum(name in shapes for name in SCHEDULE_BUFFERS) == 12
    assert shapes[CLASS_TABLE_KEY] == (1001, 512)
    assert shapes[VQ_PREFIX + "quantize.embedding.weight"] == (8192, 3)
    assert shapes[VQ_PREFIX + "encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes[UNET_PREFIX + "input_blocks.4.1.proj_in.weight"] == (384, 384, 1, 1)
    unet = sum(math.prod(s) for k, s in shapes.items() if k.startswith(UNET_PREFIX))
    vq = sum(math.prod(s) for k, s in shapes.items() if k.startswith(VQ_PREFIX))
    assert unet == count_parameters("cin256-v2-unet")
    assert vq == count_parameters("cin256-v2-vq")
    assert shapes == compvis_state_dict_shapes(CIN256_V2_COMPVIS_UNET_PARAMS,
                                               CIN256_V2_COMPVIS_VQ_PARAMS, 1001, 512)


def test_diffusers_configs_follow_from_the_published_compvis_config():
    assert unet_config_from_compvis(CIN256_V2_COMPVIS_UNET_PARAMS) == CIN256_V2_UNET_CONFIG
    assert vq_config_from_compvis(CIN256_V2_COMPVIS_VQ_PARAMS) == CIN256_V2_VQ_CONFIG
    # Cross-check against diffusers' own LDM config translation.
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    original = {"model": {"params": {
        "unet_config": {"params": dict(CIN256_V2_COMPVIS_UNET_PARAMS)},
        "first_stage_config": {"params": CIN256_V2_COMPVIS_VQ_PARAMS}}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = create_unet_diffusers_config_from_ldm(original, None, image_size=256)
    for key, value in theirs.items():
        if value is not None:
            assert CIN256_V2_UNET_CONFIG.get(key) == (tuple(value) if isinstance(value, list)
                                                      else value), key


def test_full_size_key_map_is_a_bijection():
    key_map = compvis_key_map(CIN256_V2)
    assert len(key_map) == 906 - 12 - 1
    place = key_map[VQ_PREFIX + "decoder.mid.attn_1.proj_out.weight"]
    assert (place.component, place.key, place.shape) == (
        "vq", "decoder.mid_block.attentions.0.to_out.0.weight", (512, 512))
    place = key_map[UNET_PREFIX + "output_blocks.11.0.skip_connection.weight"]
    assert (place.key, place.shape) == ("up_blocks.3.resnets.2.conv_shortcut.weight", (192, 384, 1, 1))


# --- scaled-down conversions ----------------------------------------------------------------

@pytest.mark.parametrize("config", [TINY_CIN, TINY_DEEP_ATTENTION], ids=["cin-shaped", "deep-attention"])
def test_every_tensor_lands_once_and_nothing_is_left(config):
    state_dict = random_compvis_state_dict(config)
    converted = convert_state_dict(state_dict, config)
    _assert_bijection(state_dict, converted)
    assert torch.equal(converted.class_table, state_dict[CLASS_TABLE_KEY])
    unet_expected = instantiate("UNet2DConditionModel", converted.unet_config).state_dict()
    vq_expected = instantiate("VQModel", converted.vq_config).state_dict()
    assert {k: tuple(v.shape) for k, v in converted.unet_state_dict.items()} == \
        {k: tuple(v.shape) for k, v in unet_expected.items()}
    assert {k: tuple(v.shape) for k, v in converted.vq_state_dict.items()} == \
        {k: tuple(v.shape) for k, v in vq_expected.items()}


def test_specific_tensors_land_where_they_belong():
    sd = random_compvis_state_dict(TINY_CIN)
    out = convert_state_dict(sd, TINY_CIN)
    unet, vq = out.unet_state_dict, out.vq_state_dict
    u, f = UNET_PREFIX, VQ_PREFIX
    pairs = [
        (unet["time_embedding.linear_1.weight"], sd[u + "time_embed.0.weight"]),
        (unet["conv_in.weight"], sd[u + "input_blocks.0.0.weight"]),
        (unet["down_blocks.0.resnets.1.conv2.weight"], sd[u + "input_blocks.2.0.out_layers.3.weight"]),
        (unet["down_blocks.0.downsamplers.0.conv.weight"], sd[u + "input_blocks.3.0.op.weight"]),
        (unet["down_blocks.1.resnets.0.conv_shortcut.weight"], sd[u + "input_blocks.4.0.skip_connection.weight"]),
        (unet["down_blocks.1.attentions.0.proj_in.weight"], sd[u + "input_blocks.4.1.proj_in.weight"]),
        (unet["down_blocks.3.attentions.1.transformer_blocks.0.attn2.to_k.weight"],
         sd[u + "input_blocks.11.1.transformer_blocks.0.attn2.to_k.weight"]),
        (unet["mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"],
         sd[u + "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight"]),
        (unet["mid_block.resnets.1.time_emb_proj.weight"], sd[u + "middle_block.2.emb_layers.1.weight"]),
        (unet["up_blocks.0.upsamplers.0.conv.weight"], sd[u + "output_blocks.2.2.conv.weight"]),
        (unet["up_blocks.2.upsamplers.0.conv.bias"], sd[u + "output_blocks.8.2.conv.bias"]),
        (unet["up_blocks.3.resnets.2.norm1.weight"], sd[u + "output_blocks.11.0.in_layers.0.weight"]),
        (unet["conv_norm_out.weight"], sd[u + "out.0.weight"]),
        (unet["conv_out.weight"], sd[u + "out.2.weight"]),
        (vq["encoder.down_blocks.0.downsamplers.0.conv.weight"], sd[f + "encoder.down.0.downsample.conv.weight"]),
        (vq["encoder.mid_block.attentions.0.group_norm.weight"], sd[f + "encoder.mid.attn_1.norm.weight"]),
        (vq["encoder.conv_norm_out.bias"], sd[f + "encoder.norm_out.bias"]),
        # diffusers counts decoder levels from the bottom: CompVis up.1 is up_blocks.0.
        (vq["decoder.up_blocks.0.resnets.1.conv1.weight"], sd[f + "decoder.up.1.block.1.conv1.weight"]),
        (vq["decoder.up_blocks.0.upsamplers.0.conv.weight"], sd[f + "decoder.up.1.upsample.conv.weight"]),
        (vq["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"], sd[f + "decoder.up.0.block.0.nin_shortcut.weight"]),
        (vq["quant_conv.weight"], sd[f + "quant_conv.weight"]),
        (vq["post_quant_conv.bias"], sd[f + "post_quant_conv.bias"]),
        (vq["quantize.embedding.weight"], sd[f + "quantize.embedding.weight"]),
    ]
    for converted, original in pairs:
        assert torch.equal(converted, original)
    # 1x1-conv attention kernels of the VQ mid-block become Linear weights.
    q = sd[f + "decoder.mid.attn_1.q.weight"]
    assert q.shape == (64, 64, 1, 1)
    assert torch.equal(vq["decoder.mid_block.attentions.0.to_q.weight"], q[:, :, 0, 0])


def test_converted_modules_run():
    converted = convert_state_dict(random_compvis_state_dict(TINY_CIN), TINY_CIN)
    unet, vq = build_modules(converted)
    z = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    cond = converted.class_table[[3, 10]][:, None, :]          # (B, 1, D) class tokens
    with torch.no_grad():
        eps = unet(z, torch.tensor([1, 500]), encoder_hidden_states=cond).sample
        image = vq.decode(z).sample
    assert eps.shape == (2, 3, 16, 16) and torch.isfinite(eps).all()
    assert image.shape == (2, 3, 32, 32) and torch.isfinite(image).all()


# --- strictness ---------------------------------------------------------------------------

def test_extra_key_is_listed():
    sd = random_compvis_state_dict(TINY_CIN)
    sd["model.diffusion_model.extra_head.weight"] = torch.zeros(3)
    sd["model_ema.decay"] = torch.tensor(0.999)
    with pytest.raises(PriorError, match=r"2 unexpected keys: model.diffusion_model.extra_head.weight, "
                                         r"model_ema.decay"):
        convert_state_dict(sd, TINY_CIN)


def test_missing_key_is_listed():
    sd = random_compvis_state_dict(TINY_CIN)
    del sd[VQ_PREFIX + "quantize.embedding.weight"]
    del sd["posterior_mean_coef2"]
    with pytest.raises(PriorError, match=r"2 missing keys: first_stage_model.quantize.embedding.weight, "
                                         r"posterior_mean_coef2"):
        convert_state_dict(sd, TINY_CIN)


def test_many_missing_keys_are_summarised():
    sd = random_compvis_state_dict(TINY_CIN)
    for name in [k for k in sd if k.startswith(VQ_PREFIX)]:
        del sd[name]
    with pytest.raises(PriorError, match=r"missing keys: .*\(and \d+ more\)") as info:
        convert_state_dict(sd, TINY_CIN)
    assert "\n" not in str(info.value)


def test_shape_mismatch_is_listed():
    sd = random_compvis_state_dict(TINY_CIN)
    sd[CLASS_TABLE_KEY] = torch.zeros(10, 16)                  # null row missing
    with pytest.raises(PriorError, match=r"1 shape mismatches: cond_stage_model.embedding.weight "
                                         r"\(10, 16\) != \(11, 16\)"):
        convert_state_dict(sd, TINY_CIN)


def test_wrong_schedule_is_refused():
    sd = random_compvis_state_dict(TINY_CIN)
    sd["betas"] = torch.linspace(0.0015, 0.0195, 1000)         # plain linear, not sqrt-linear
    with pytest.raises(PriorError, match="checkpoint betas do not match the scheduler config"):
        convert_state_dict(sd, TINY_CIN)


def test_schedule_buffers_match_the_diffusers_schedule():
    from diffusers import DDIMScheduler

    buffers = compvis_schedule_buffers(0.0015, 0.0195)
    scheduler = DDIMScheduler.from_config(CIN256_V2_SCHEDULER_CONFIG)
    torch.testing.assert_close(buffers["alphas_cumprod"], scheduler.alphas_cumprod, rtol=1e-5, atol=0)
    assert set(buffers) == set(SCHEDULE_BUFFERS)


# --- files and CLI ------------------------------------------------------------------------

def test_checkpoint_file_round_trip(tmp_path):
    from ld3m_fast.priors import load_prior

    sd = random_compvis_state_dict(TINY_CIN)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 1}, ckpt)
    out = convert_cin256_v2(ckpt, tmp_path / "prior", config=TINY_CIN)
    expected = convert_state_dict(sd, TINY_CIN)
    prior = load_prior(out)
    for loaded, wanted in ((prior.denoiser.model.state_dict(), expected.unet_state_dict),
                           (prior.autoencoder.model.state_dict(), expected.vq_state_dict)):
        assert set(loaded) == set(wanted)
        for key, value in wanted.items():
            assert torch.equal(loaded[key], value), key
    assert torch.equal(prior.class_table, sd[CLASS_TABLE_KEY])
    assert prior.num_classes == 10 and prior.null_index == 10
    abar = torch.from_numpy(np.cumprod(1 - sd["betas"].double().numpy()))
    torch.testing.assert_close(prior.alphas_cumprod, abar, rtol=1e-5, atol=0)


def test_numpy_scalars_are_allowed_other_objects_are_not(tmp_path):
    sd = {"betas": torch.ones(3)}
    ckpt = tmp_path / "numpy.ckpt"
    torch.save({"state_dict": sd, "global_step": np.int64(7), "epoch": np.float64(1.0)}, ckpt)
    assert torch.equal(load_compvis_state_dict(ckpt)["betas"], sd["betas"])

    ckpt = tmp_path / "object.ckpt"
    torch.save({"state_dict": sd, "callbacks": argparse.Namespace(x=1)}, ckpt)
    with pytest.raises(PriorError, match=r"not a plain state-dict checkpoint \(1 unknown globals: "
                                         r"argparse.Namespace\)"):
        load_compvis_state_dict(ckpt)


def test_unreadable_checkpoints(tmp_path):
    with pytest.raises(PriorError, match="does not exist"):
        load_compvis_state_dict(tmp_path / "absent.ckpt")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(PriorError, match="cannot read"):
        load_compvis_state_dict(garbage)
    listing = tmp_path / "list.ckpt"
    torch.save([torch.ones(1)], listing)
    with pytest.raises(PriorError, match="neither a dict"):
        load_compvis_state_dict(listing)


def test_existing_output_needs_force(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": random_compvis_state_dict(TINY_CIN)}, ckpt)
    out = tmp_path / "prior"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(PriorError, match="exists and is not empty; pass --force"):
        convert_cin256_v2(ckpt, out, config=TINY_CIN)
    assert (out / "keep.txt").read_text() == "precious"
    convert_cin256_v2(ckpt, out, config=TINY_CIN, force=True)
    assert not (out / "keep.txt").exists() and (out / "ld3m_prior.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt", "prior"]   # no temp left


def test_cli_arguments_and_refusal(tmp_path):
    parser = add_convert_arguments(argparse.ArgumentParser())
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    args = parser.parse_args([str(tmp_path / "model.ckpt"), str(out)])
    assert args.force is False
    with pytest.raises(PriorError, match="pass --force"):
        run_convert(args)
    assert parser.parse_args(["a.ckpt", "b", "--force"]).force is True


def test_cli_converts_and_reports(tmp_path, monkeypatch, caplog):
    import functools

    import ld3m_fast.convert as convert_module

    # The CLI converts cin256-v2; point it at the scaled-down relative for speed.
    monkeypatch.setattr(convert_module, "convert_cin256_v2",
                        functools.partial(convert_cin256_v2, config=TINY_CIN))
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": random_compvis_state_dict(TINY_CIN), "global_step": 1}, ckpt)
    args = add_convert_arguments(argparse.ArgumentParser()).parse_args([str(ckpt), str(tmp_path / "p")])
    with caplog.at_level(logging.INFO, logger="ld3m_fast"):
        assert run_convert(args) == 0
    unet_count = sum(math.prod(s) for k, s in TINY_CIN.expected_shapes().items() if k.startswith(UNET_PREFIX))
    printed = caplog.text
    assert f"UNet2DConditionModel {unet_count / 1e6:.1f} M parameters" in printed
    assert "10 classes + null row" in printed


# --- full size (opt-in) ---------------------------------------------------------------------

@pytest.mark.slow
def test_full_size_cin256_v2_round_trip(tmp_path, caplog):
    from ld3m_fast.priors import load_prior

    sd = random_compvis_state_dict(CIN256_V2)
    assert len(sd) == 906
    converted = convert_state_dict(sd, CIN256_V2)
    _assert_bijection(sd, converted)
    assert sum(t.numel() for t in converted.unet_state_dict.values()) == 400_920_579
    assert round(sum(t.numel() for t in converted.vq_state_dict.values()) / 1e6, 1) == 55.3
    del converted
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 470000}, ckpt)
    out = tmp_path / "cin256-v2"
    args = add_convert_arguments(argparse.ArgumentParser()).parse_args([str(ckpt), str(out)])
    with caplog.at_level(logging.INFO, logger="ld3m_fast"):
        assert run_convert(args) == 0
    printed = caplog.text
    assert "UNet2DConditionModel 400.9 M parameters, VQModel 55.3 M parameters" in printed
    prior = load_prior(out)
    unet = prior.denoiser.model.state_dict()
    assert round(sum(t.numel() for t in unet.values()) / 1e6, 1) == 400.9
    assert torch.equal(unet["up_blocks.0.attentions.2.proj_out.weight"],
                       sd[UNET_PREFIX + "output_blocks.2.1.proj_out.weight"])
    assert torch.equal(prior.autoencoder.model.state_dict()["encoder.mid_block.attentions.0.to_v.weight"],
                       sd[VQ_PREFIX + "encoder.mid.attn_1.v.weight"][:, :, 0, 0])
    assert prior.class_table.shape == (1001, 512) and prior.null_index == 1000
