"""Key names and shapes of a CompVis LatentDiffusion checkpoint, derived from its config.

A CompVis class-conditional LDM checkpoint (`cin256-v2` and its smaller relatives)
holds, in `ckpt["state_dict"]`:

- `model.diffusion_model.*`: the openaimodel `UNetModel` with SpatialTransformers;
- `first_stage_model.*`: the ldm `VQModel` (Encoder, Decoder, quant_conv,
  post_quant_conv, `quantize.embedding.weight`);
- `cond_stage_model.embedding.weight`: the `ClassEmbedder` table (n_classes, context_dim);
- the 12 noise-schedule buffers of `DDPM.register_schedule` (`SCHEDULE_BUFFERS`).

`compvis_state_dict_shapes` walks the same loops as the CompVis module constructors
and names every tensor the way `nn.Module.state_dict()` would; `compvis_schedule_buffers`
recomputes the schedule buffers. Together they describe the file without reading it,
which the converter uses to check a checkpoint key by key.
"""
from __future__ import annotations

import numpy as np
import torch

UNET_PREFIX = "model.diffusion_model."
VQ_PREFIX = "first_stage_model."
CLASS_TABLE_KEY = "cond_stage_model.embedding.weight"
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)

Shapes = dict[str, tuple[int, ...]]


def _norm(shapes: Shapes, prefix: str, channels: int):
    """GroupNorm or LayerNorm: affine weight and bias."""
    shapes[f"{prefix}.weight"] = (channels,)
    shapes[f"{prefix}.bias"] = (channels,)


def _conv(shapes: Shapes, prefix: str, out_ch: int, in_ch: int, kernel: int, bias: bool = True):
    shapes[f"{prefix}.weight"] = (out_ch, in_ch, kernel, kernel)
    if bias:
        shapes[f"{prefix}.bias"] = (out_ch,)


def _linear(shapes: Shapes, prefix: str, out_features: int, in_features: int, bias: bool = True):
    shapes[f"{prefix}.weight"] = (out_features, in_features)
    if bias:
        shapes[f"{prefix}.bias"] = (out_features,)


# --- openaimodel UNetModel ------------------------------------------------------------

def _unet_resblock(shapes: Shapes, prefix: str, in_ch: int, out_ch: int, emb_ch: int):
    """ResBlock: in_layers [norm, SiLU, conv], emb_layers [SiLU, linear],
    out_layers [norm, SiLU, dropout, conv], a 1x1 skip_connection when channels change."""
    _norm(shapes, f"{prefix}.in_layers.0", in_ch)
    _conv(shapes, f"{prefix}.in_layers.2", out_ch, in_ch, 3)
    _linear(shapes, f"{prefix}.emb_layers.1", out_ch, emb_ch)
    _norm(shapes, f"{prefix}.out_layers.0", out_ch)
    _conv(shapes, f"{prefix}.out_layers.3", out_ch, out_ch, 3)
    if in_ch != out_ch:
        _conv(shapes, f"{prefix}.skip_connection", out_ch, in_ch, 1)


def _spatial_transformer(shapes: Shapes, prefix: str, channels: int, heads: int,
                         depth: int, context_dim: int):
    """SpatialTransformer with 1x1-conv proj_in/proj_out and GEGLU feed-forward (x4)."""
    inner = heads * (channels // heads)
    _norm(shapes, f"{prefix}.norm", channels)
    _conv(shapes, f"{prefix}.proj_in", inner, channels, 1)
    for d in range(depth):
        block = f"{prefix}.transformer_blocks.{d}"
        for attn, kv_dim in (("attn1", inner), ("attn2", context_dim)):
            _linear(shapes, f"{block}.{attn}.to_q", inner, inner, bias=False)
            _linear(shapes, f"{block}.{attn}.to_k", inner, kv_dim, bias=False)
            _linear(shapes, f"{block}.{attn}.to_v", inner, kv_dim, bias=False)
            _linear(shapes, f"{block}.{attn}.to_out.0", inner, inner)
        _linear(shapes, f"{block}.ff.net.0.proj", inner * 4 * 2, inner)
        _linear(shapes, f"{block}.ff.net.2", inner, inner * 4)
        for norm in ("norm1", "norm2", "norm3"):
            _norm(shapes, f"{block}.{norm}", inner)
    _conv(shapes, f"{prefix}.proj_out", channels, inner, 1)


def unet_shapes(params: dict) -> Shapes:
    """state_dict shapes of an openaimodel `UNetModel` (keys without the checkpoint prefix)."""
    mc = params["model_channels"]
    emb_ch = 4 * mc
    heads, depth = params["num_heads"], params.get("transformer_depth", 1)
    context_dim = params["context_dim"]
    attention_at = set(params["attention_resolutions"])
    mults = list(params["channel_mult"])
    shapes: Shapes = {}
    _linear(shapes, "time_embed.0", emb_ch, mc)
    _linear(shapes, "time_embed.2", emb_ch, emb_ch)
    _conv(shapes, "input_blocks.0.0", mc, params["in_channels"], 3)

    ch, ds, index = mc, 1, 1
    skip_channels = [mc]
    for level, mult in enumerate(mults):
        for _ in range(params["num_res_blocks"]):
            _unet_resblock(shapes, f"input_blocks.{index}.0", ch, mult * mc, emb_ch)
            ch = mult * mc
            if ds in attention_at:
                _spatial_transformer(shapes, f"input_blocks.{index}.1", ch, heads, depth, context_dim)
            skip_channels.append(ch)
            index += 1
        if level != len(mults) - 1:
            _conv(shapes, f"input_blocks.{index}.0.op", ch, ch, 3)
            skip_channels.append(ch)
            ds *= 2
            index += 1

    _unet_resblock(shapes, "middle_block.0", ch, ch, emb_ch)
    _spatial_transformer(shapes, "middle_block.1", ch, heads, depth, context_dim)
    _unet_resblock(shapes, "middle_block.2", ch, ch, emb_ch)

    index = 0
    for level, mult in reversed(list(enumerate(mults))):
        for i in range(params["num_res_blocks"] + 1):
            _unet_resblock(shapes, f"output_blocks.{index}.0", ch + skip_channels.pop(),
                           mult * mc, emb_ch)
            ch = mult * mc
            layer = 1
            if ds in attention_at:
                _spatial_transformer(shapes, f"output_blocks.{index}.1", ch, heads, depth,
                                     context_dim)
                layer = 2
            if level and i == params["num_res_blocks"]:
                _conv(shapes, f"output_blocks.{index}.{layer}.conv", ch, ch, 3)
                ds //= 2
            index += 1

    _norm(shapes, "out.0", mc)
    _conv(shapes, "out.2", params["out_channels"], mc, 3)
    return shapes


# --- ldm VQModel (taming-style Encoder / Decoder) -----------------------------------------

def _vq_resblock(shapes: Shapes, prefix: str, in_ch: int, out_ch: int):
    """ResnetBlock without time embedding: norm1, conv1, norm2, conv2, 1x1 nin_shortcut."""
    _norm(shapes, f"{prefix}.norm1", in_ch)
    _conv(shapes, f"{prefix}.conv1", out_ch, in_ch, 3)
    _norm(shapes, f"{prefix}.norm2", out_ch)
    _conv(shapes, f"{prefix}.conv2", out_ch, out_ch, 3)
    if in_ch != out_ch:
        _conv(shapes, f"{prefix}.nin_shortcut", out_ch, in_ch, 1)


def _vq_attention(shapes: Shapes, prefix: str, channels: int):
    """AttnBlock: norm, then q, k, v, proj_out as 1x1 convolutions (diffusers: Linear)."""
    _norm(shapes, f"{prefix}.norm", channels)
    for name in ("q", "k", "v", "proj_out"):
        _conv(shapes, f"{prefix}.{name}", channels, channels, 1)


def vq_shapes(params: dict) -> Shapes:
    """state_dict shapes of an ldm `VQModel` with Identity loss (keys without prefix)."""
    dd = params["ddconfig"]
    ch, mults, n_res = dd["ch"], list(dd["ch_mult"]), dd["num_res_blocks"]
    attention_at = set(dd.get("attn_resolutions", ()))
    shapes: Shapes = {}

    _conv(shapes, "encoder.conv_in", ch, dd["in_channels"], 3)
    resolution = dd["resolution"]
    block_in = ch
    for level, mult in enumerate(mults):
        block_in = ch * ([1] + mults)[level]
        for j in range(n_res):
            _vq_resblock(shapes, f"encoder.down.{level}.block.{j}", block_in, ch * mult)
            block_in = ch * mult
            if resolution in attention_at:
                _vq_attention(shapes, f"encoder.down.{level}.attn.{j}", block_in)
        if level != len(mults) - 1:
            _conv(shapes, f"encoder.down.{level}.downsample.conv", block_in, block_in, 3)
            resolution //= 2
    _vq_resblock(shapes, "encoder.mid.block_1", block_in, block_in)
    _vq_attention(shapes, "encoder.mid.attn_1", block_in)
    _vq_resblock(shapes, "encoder.mid.block_2", block_in, block_in)
    _norm(shapes, "encoder.norm_out", block_in)
    z_out = 2 * dd["z_channels"] if dd.get("double_z", False) else dd["z_channels"]
    _conv(shapes, "encoder.conv_out", z_out, block_in, 3)

    block_in = ch * mults[-1]
    _conv(shapes, "decoder.conv_in", block_in, dd["z_channels"], 3)
    _vq_resblock(shapes, "decoder.mid.block_1", block_in, block_in)
    _vq_attention(shapes, "decoder.mid.attn_1", block_in)
    _vq_resblock(shapes, "decoder.mid.block_2", block_in, block_in)
    for level in reversed(range(len(mults))):
        for j in range(n_res + 1):
            _vq_resblock(shapes, f"decoder.up.{level}.block.{j}", block_in, ch * mults[level])
            block_in = ch * mults[level]
            if resolution in attention_at:
                _vq_attention(shapes, f"decoder.up.{level}.attn.{j}", block_in)
        if level != 0:
            _conv(shapes, f"decoder.up.{level}.upsample.conv", block_in, block_in, 3)
            resolution *= 2
    _norm(shapes, "decoder.norm_out", block_in)
    _conv(shapes, "decoder.conv_out", dd["out_ch"], block_in, 3)

    _conv(shapes, "quant_conv", params["embed_dim"], dd["z_channels"], 1)
    _conv(shapes, "post_quant_conv", dd["z_channels"], params["embed_dim"], 1)
    shapes["quantize.embedding.weight"] = (params["n_embed"], params["embed_dim"])
    return shapes


def compvis_state_dict_shapes(unet_cfg: dict, vq_cfg: dict, n_classes: int, context_dim: int,
                              num_timesteps: int = 1000) -> Shapes:
    """Every tensor name and shape of a CompVis class-conditional LDM checkpoint's state_dict.

    unet_cfg: CompVis `unet_config.params` (e.g. `CIN256_V2_COMPVIS_UNET_PARAMS`).
    vq_cfg: CompVis `first_stage_config.params` (e.g. `CIN256_V2_COMPVIS_VQ_PARAMS`).
    n_classes: rows of the `ClassEmbedder` table *including* the null row (1001 for cin256-v2).
    context_dim: width of a class embedding (512 for cin256-v2).
    Returns {name: shape} in module order; 906 entries for cin256-v2.
    """
    shapes: Shapes = {}
    for name in SCHEDULE_BUFFERS:
        shapes[name] = (num_timesteps,)
    shapes.update({UNET_PREFIX + k: v for k, v in unet_shapes(unet_cfg).items()})
    shapes.update({VQ_PREFIX + k: v for k, v in vq_shapes(vq_cfg).items()})
    shapes[CLASS_TABLE_KEY] = (n_classes, context_dim)
    return shapes


def compvis_schedule_buffers(linear_start: float, linear_end: float,
                             num_timesteps: int = 1000) -> dict[str, torch.Tensor]:
    """The 12 float32 (num_timesteps,) buffers of CompVis `DDPM.register_schedule`.

    Schedule "linear" (sqrt-linear in beta), v_posterior = 0; computed in float64 and
    stored in float32, as CompVis does.
    """
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, num_timesteps,
                           dtype=torch.float64).numpy() ** 2
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    values = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1.0),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    }
    return {name: torch.tensor(values[name], dtype=torch.float32) for name in SCHEDULE_BUFFERS}
