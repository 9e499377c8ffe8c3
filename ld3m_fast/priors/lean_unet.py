"""A lean forward for diffusers' `UNet2DModel`: the same ops on the same weights, less Python.

`lean_unet2d_forward(model, sample, timestep, class_vectors)` returns what
`model(sample, timestep, class_labels=class_vectors).sample` returns, for the models for which
`why_not_lean(model)` is None, by calling the tensor functions (`F.conv2d`,
`F.group_norm`, `F.silu`, `F.linear`, `F.scaled_dot_product_attention`, ...) in the order
diffusers calls them, on the modules' own parameters.

Why: at the embedded default's sizes (8x8 latents, 10-20 images) a denoiser call is short
and diffusers' Python around the ops is a large share of it: every forward walks all 278
modules twice for `self.dtype` (`get_parameter_dtype` looks for casting hooks), each
attention call runs `inspect.signature`, and ~400 module calls go through `nn.Module.__call__`.
Measured on the shipped prior, one thread: a call costs ~8.6 ms at batch 1.

Equal to the diffusers forward: the same ops on the same inputs in the same order (even the
SiLU of the time embedding, once per ResNet block), so outputs and gradients are bit-identical
on CPU. `tests/test_lean_unet.py` compares forward and backward with the diffusers forward (the
reference) on the shipped prior and on tiny random ones.

Anything this module does not reproduce is refused by `why_not_lean` (the caller
then uses the diffusers forward): other block or embedding types, scale-shift time
embeddings, gradient checkpointing, attention processors other than `AttnProcessor2_0`,
module hooks (layerwise casting, accelerate offload, user hooks), a compiled model
(`model.compile()`), training mode.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_DOWN = ("DownBlock2D", "AttnDownBlock2D")
_UP = ("UpBlock2D", "AttnUpBlock2D")


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None) or hasattr(module, "_diffusers_hook"))


def global_hooks() -> bool:
    from torch.nn.modules import module as torch_module

    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or torch_module._global_backward_hooks
                or getattr(torch_module, "_global_backward_pre_hooks", None))


def _why_not_resnet(resnet) -> str | None:
    if type(resnet).__name__ != "ResnetBlock2D":
        return f"resnet block {type(resnet).__name__}"
    if resnet.upsample is not None or resnet.downsample is not None:
        return "a resampling ResNet block"
    if resnet.time_embedding_norm != "default" or resnet.time_emb_proj is None or resnet.skip_time_act:
        return f"time embedding norm {resnet.time_embedding_norm!r}"
    if not isinstance(resnet.nonlinearity, nn.SiLU) or not isinstance(resnet.norm1, nn.GroupNorm) \
            or not isinstance(resnet.norm2, nn.GroupNorm):
        return "a ResNet block without GroupNorm + SiLU"
    return None


def _why_not_attention(attn) -> str | None:
    if type(attn).__name__ != "Attention" or type(attn.processor).__name__ != "AttnProcessor2_0":
        return f"attention {type(attn).__name__} / {type(getattr(attn, 'processor', None)).__name__}"
    if attn.spatial_norm is not None or attn.norm_q is not None or attn.norm_k is not None \
            or attn.group_norm is None or attn.norm_cross or attn.is_cross_attention:
        return "an attention layer with other norms"
    if attn.to_k is None or attn.to_v is None:
        return "an attention layer without key / value projections"
    return None


def _why_not_resample(sampler, kind: str) -> str | None:
    if kind == "down":
        if type(sampler).__name__ != "Downsample2D" or not sampler.use_conv or sampler.norm is not None \
                or sampler.padding == 0 or not isinstance(sampler.conv, nn.Conv2d):
            return "a downsampler other than a strided convolution"
    elif type(sampler).__name__ != "Upsample2D" or not sampler.use_conv or sampler.use_conv_transpose \
            or sampler.norm is not None or not sampler.interpolate or sampler.name != "conv":
        return "an upsampler other than nearest x2 + convolution"
    return None


def why_not_lean(model: nn.Module) -> str | None:
    """None when `lean_unet2d_forward` reproduces `model`'s forward, else the reason it does not."""
    if type(model).__name__ != "UNet2DModel":
        return f"{type(model).__name__} is not a UNet2DModel"
    config = model.config
    if model.training:
        return "training mode"
    if getattr(model, "_compiled_call_impl", None) is not None:
        return "the model is compiled"
    if config.center_input_sample or config.time_embedding_type != "positional" \
            or config.class_embed_type is not None or config.resnet_time_scale_shift != "default":
        return "centred input, Fourier time embedding or a class embedding type"
    if type(model.class_embedding).__name__ != "_PassThroughLabels":
        return "the class embedding is not bypassed by the adapter"
    time_embedding = model.time_embedding
    if time_embedding.cond_proj is not None or time_embedding.post_act is not None \
            or not isinstance(time_embedding.act, nn.SiLU):
        return "a time embedding with a condition projection or another activation"
    if next(model.parameters()) is not model.conv_in.weight:
        return "conv_in is not the first parameter (diffusers' dtype would differ)"
    if type(model.mid_block).__name__ != "UNetMidBlock2D" or not isinstance(model.conv_act, nn.SiLU):
        return "mid block or output activation"
    if global_hooks():
        return "global module hooks"
    for module in model.modules():
        if _has_hooks(module):
            return f"a hook on {type(module).__name__}"
        if getattr(module, "gradient_checkpointing", False):
            return "gradient checkpointing"
        if isinstance(module, nn.Dropout) and module.p != 0.0 and module.training:
            return "active dropout"
    for block in model.down_blocks:
        if type(block).__name__ not in _DOWN:
            return f"down block {type(block).__name__}"
        if getattr(block, "downsample_type", None) == "resnet":
            return "a resnet downsampler"
    for block in model.up_blocks:
        if type(block).__name__ not in _UP:
            return f"up block {type(block).__name__}"
        if getattr(block, "upsample_type", None) == "resnet" or getattr(block, "s1", None):
            return "a resnet upsampler or FreeU"
    for block in (*model.down_blocks, *model.up_blocks, model.mid_block):
        for resnet in block.resnets:
            why = _why_not_resnet(resnet)
            if why:
                return why
        for attn in getattr(block, "attentions", None) or ():
            why = attn is not None and _why_not_attention(attn)
            if why:
                return why
        for sampler in getattr(block, "downsamplers", None) or ():
            why = _why_not_resample(sampler, "down")
            if why:
                return why
        for sampler in getattr(block, "upsamplers", None) or ():
            why = _why_not_resample(sampler, "up")
            if why:
                return why
    return None


def _conv(conv: nn.Conv2d, x):
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _norm(norm: nn.GroupNorm, x):
    return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


def _linear(linear: nn.Linear, x):
    return F.linear(x, linear.weight, linear.bias)


def _resnet(resnet, x, temb):
    """`ResnetBlock2D.forward` (default time embedding norm)."""
    h = _conv(resnet.conv1, F.silu(_norm(resnet.norm1, x)))
    h = h + _linear(resnet.time_emb_proj, F.silu(temb))[:, :, None, None]
    h = _conv(resnet.conv2, F.silu(_norm(resnet.norm2, h)))
    if resnet.conv_shortcut is not None:
        x = _conv(resnet.conv_shortcut, x)
    out = x + h
    return out if resnet.output_scale_factor == 1.0 else out / resnet.output_scale_factor


def _attention(attn, x):
    """`Attention` with `AttnProcessor2_0` on a (B, C, H, W) map (self-attention, group norm)."""
    residual = x
    batch, channels, height, width = x.shape
    h = x.view(batch, channels, height * width).transpose(1, 2)
    h = _norm(attn.group_norm, h.transpose(1, 2)).transpose(1, 2)
    query, key, value = _linear(attn.to_q, h), _linear(attn.to_k, h), _linear(attn.to_v, h)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    h = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
    h = h.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    h = _linear(attn.to_out[0], h)
    h = h.transpose(-1, -2).reshape(batch, channels, height, width)
    if attn.residual_connection:
        h = h + residual
    return h if attn.rescale_output_factor == 1.0 else h / attn.rescale_output_factor


def _upsample(sampler, x):
    if x.shape[0] >= 64:
        x = x.contiguous()
    return _conv(sampler.conv, F.interpolate(x, scale_factor=2.0, mode="nearest"))


def lean_unet2d_forward(model: nn.Module, sample: torch.Tensor, timestep: torch.Tensor,
                        class_vectors: torch.Tensor) -> torch.Tensor:
    """`model(sample, timestep, class_labels=class_vectors).sample` for a model
    `why_not_lean` accepts (the adapter's pass-through class embedding).

    sample (B, C, h, w); timestep (B,) or () integer; class_vectors (B, D) added to the
    time embedding. Returns (B, out_channels, h, w).
    """
    timesteps = timestep if timestep.dim() else timestep[None]
    timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)
    dtype = model.conv_in.weight.dtype
    emb = model.time_embedding(model.time_proj(timesteps).to(dtype=dtype))
    emb = emb + class_vectors.to(dtype=dtype)

    x = _conv(model.conv_in, sample)
    skips = [x]
    for block in model.down_blocks:
        attentions = getattr(block, "attentions", None)
        for i, resnet in enumerate(block.resnets):
            x = _resnet(resnet, x, emb)
            if attentions is not None:
                x = _attention(attentions[i], x)
            skips.append(x)
        if block.downsamplers is not None:
            for sampler in block.downsamplers:
                x = _conv(sampler.conv, x)
            skips.append(x)

    mid = model.mid_block
    x = _resnet(mid.resnets[0], x, emb)
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            x = _attention(attn, x)
        x = _resnet(resnet, x, emb)

    for block in model.up_blocks:
        attentions = getattr(block, "attentions", None)
        for i, resnet in enumerate(block.resnets):
            x = _resnet(resnet, torch.cat([x, skips.pop()], dim=1), emb)
            if attentions is not None:
                x = _attention(attentions[i], x)
        if block.upsamplers is not None:
            for sampler in block.upsamplers:
                x = _upsample(sampler, x)

    x = F.silu(_norm(model.conv_norm_out, x))
    return _conv(model.conv_out, x)


__all__ = ["global_hooks", "lean_unet2d_forward", "why_not_lean"]
