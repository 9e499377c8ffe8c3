"""Everything a run needs, built and validated before anything is written.

`build_setup(config)` loads the prior, the data and the expert buffer and builds the
generator, the synthetic set and the algorithm. It is pure (it writes nothing but
the data module's decode cache), so every bad input fails before a run folder exists.

Resolution: up to the prior's native size the chain renders at `res` itself (latents
of side res / latent factor: cin256-v2 at 128² uses 3×32×32, as in the paper); above
it, the prior renders natively and an antialiased, differentiable bilinear resize
inside the generator reaches `res` (`ld3m_fast.generator.render_size`). With
`--released-compat` the chain renders at `res` at every size, as the released code does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import distributed
from ..errors import LD3MError
from ..generator import released_timesteps, render_size
from .algorithms import MTT, NetworkSpec, RealData, build_algorithm, stream_generator
from .config import DistillConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Setup:
    """Everything a run needs, built and validated before anything is written."""

    config: DistillConfig
    prior: object
    generator: object
    synthetic: object
    algorithm: object
    real: RealData
    class_names: list[str]
    device: torch.device
    res: int
    dsa: object | None = None
    test_set: object | None = None  # the real test split, when inline evaluation is on


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LD3MError(f"unknown --device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LD3MError(f"--device {name} asked for but no CUDA device is available; use --device cpu")
    return device


def denoiser_multiple(prior) -> int:
    """The latent side must be a multiple of this for the denoiser to take it: the UNet's
    total downsampling (2 per down block after the first) or the DiT's patch size."""
    config = getattr(prior.denoiser.model, "config", {})
    if "patch_size" in config and config.get("patch_size"):
        return int(config["patch_size"])
    blocks = config.get("down_block_types") or config.get("block_out_channels") or ()
    return 2 ** max(0, len(blocks) - 1)


def resolve_resolution(prior, res: int | None, *, released: bool = False) -> int:
    """The output side: `res` or the prior's native size, checked against what the prior can render
    (at `res` itself with `released`, see `render_size`)."""
    res = prior.image_size if res is None else int(res)
    factor = prior.latent_factor
    if res % factor:
        raise LD3MError(f"--res {res} is not a multiple of the prior's latent factor {factor}; "
                        f"use e.g. {prior.image_size} (the prior's native size)")
    render = render_size(prior, res, released=released)
    latent, multiple = render // factor, denoiser_multiple(prior)
    if latent % multiple:
        step = factor * multiple
        below = [r for r in range(step, prior.image_size + 1, step)]
        above = "" if released else f" or any multiple of {factor} above it"
        raise LD3MError(f"--res {res} renders {latent}x{latent} latents, but the prior's denoiser needs a "
                        f"side divisible by {multiple}; use a multiple of {step} up to {prior.image_size} "
                        f"(e.g. {', '.join(map(str, below[-3:]))}){above}")
    return res


def prior_class_rows(prior, subset: str | None, num_classes: int) -> list[int]:
    """The prior's class-table row for each dataset label."""
    if subset is not None and prior.num_classes == 1000:
        from ..data.subsets import resolve_subset

        return list(resolve_subset(subset).imagenet_indices)
    if num_classes > prior.num_classes:
        raise LD3MError(f"the data has {num_classes} classes but the prior only {prior.num_classes}; "
                        "use a prior trained on these classes")
    return list(range(num_classes))


def device_memory(device: torch.device) -> int:
    """Bytes a run may plan for: the GPU's memory, or 80% of the machine's RAM on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def choose_chunk(config: DistillConfig, res: int, num_classes: int, device, *, log=print) -> dict:
    """--chunk auto: the planner's cheapest (mode, chunk, decoder chunk) that fits the memory budget.

    Returns the generator's knobs {chunk_size, decoder_chunk, store_steps, sac_min_flops}; the
    knobs the config sets stay fixed, the unset ones are the planner's to choose."""
    from ..planner.plan import format_bytes, parse_bytes, plan
    from ..planner.simulate import IterationSpec

    budget = parse_bytes(config.memory_budget) if config.memory_budget else device_memory(device)
    spec = IterationSpec(
        prior=config.prior, res=res, ipc=config.ipc, num_classes=num_classes, steps=config.steps,
        guidance=config.guidance, skip=None if config.skip == "none" else config.skip,
        algorithm=config.algorithm, grad_mode=config.grad_mode, micro_batch=config.micro_batch,
        dtype=config.dtype, syn_steps=config.syn_steps, mtt_gradient=config.mtt_gradient,
        batch_real=config.batch_real, width=config.width, depth=config.depth,
        world_size=distributed.current().world_size)  # one rank's share of the classes
    fixed = lambda value: None if value is None else [value]  # noqa: E731
    sac = fixed(config.sac_min_flops) if config.store_steps is None or config.sac_min_flops is not None \
        else [None]  # a set --store-steps without --sac-min-flops keeps whole graphs
    _, best = plan(spec, budget, dtypes=(config.dtype,), decoder_chunks=fixed(config.decoder_chunk),
                   store_steps=fixed(config.store_steps), sac=sac)
    if best is None:
        raise LD3MError(f"--chunk auto: no chunk size fits {format_bytes(budget)}; set --micro-batch, "
                        "lower --ipc or raise --memory-budget")
    s = best.spec
    log(f"--chunk auto: chunk {s.chunk}, decoder chunk {s.decoder_chunk or s.chunk}, {best.mode} "
        f"(planned peak {format_bytes(best.estimate.peak_bytes)} of {format_bytes(budget)}, "
        f"{best.estimate.tflops:.1f} TFLOP per iteration)")
    return dict(chunk_size=s.chunk, decoder_chunk=s.decoder_chunk, store_steps=s.store_steps,
                sac_min_flops=s.sac_min_flops if s.store_steps else None)


def generator_knobs(config: DistillConfig) -> dict:
    """The generator's chunk and recompute knobs as the config sets them (not --chunk auto)."""
    if config.grad_mode != "recompute" and (config.decoder_chunk is not None or config.store_steps):
        raise LD3MError(f"--decoder-chunk and --store-steps need --grad-mode recompute, not {config.grad_mode}")
    if config.store_steps is not None and config.store_steps > config.steps:
        raise LD3MError(f"--store-steps {config.store_steps} is more than the chain's {config.steps} steps")
    return dict(chunk_size=config.chunk, decoder_chunk=config.decoder_chunk,
                store_steps=config.store_steps or 0, sac_min_flops=config.sac_min_flops)


def released_generator_options(config: DistillConfig) -> dict:
    """The generator's options for --released-compat: the released timestep list and clamp; with
    --grad-mode released also its UNet's inner checkpointing of the transformer blocks (the same
    values, its cost). Empty without --released-compat."""
    if not config.released_compat:
        return {}
    return dict(spacing="released", clamp=True, checkpoint_attention=config.grad_mode == "released")


def use_memory_efficient_attention(prior, device: torch.device, *, log=print) -> str:
    """xformers attention on CUDA when it is installed; PyTorch SDPA otherwise (diffusers' default)."""
    if device.type != "cuda":
        return "sdpa"
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        return "sdpa"
    for model in (prior.denoiser.model, prior.autoencoder.model):
        if hasattr(model, "enable_xformers_memory_efficient_attention"):
            model.enable_xformers_memory_efficient_attention()
    log("attention: xformers (memory-efficient) on CUDA")
    return "xformers"


def compile_prior(prior, backend: str) -> None:
    """torch.compile the denoiser and the decoder in place (the encoder runs once, at init)."""
    prior.denoiser.model.compile(backend=backend)
    prior.autoencoder.model.decoder.compile(backend=backend)


def build_dsa(config: DistillConfig):
    from ..dsa import DSA

    if config.dsa in (None, "", "none"):
        return None
    try:
        return DSA(config.dsa)
    except ValueError as error:
        raise LD3MError(f"--dsa: {error}") from None


def build_network_spec(config: DistillConfig, res: int, num_classes: int) -> NetworkSpec:
    network = NetworkSpec(num_classes=num_classes, res=res, width=config.width, depth=config.depth,
                          norm=config.norm, compile_backend=config.compile_backend if config.compile else None)
    network.build()  # an unknown norm or an impossible depth fails now, not at iteration 1
    return network


def build_algorithm_for(config: DistillConfig, network: NetworkSpec, res: int, num_classes: int):
    trajectories = None
    if config.algorithm == "mtt":
        from .buffers import load_buffer

        expect = {"arch": network.arch, "depth": network.depth, "width": network.width,
                  "norm": network.norm, "res": res, "num_classes": num_classes,
                  "channels": network.channels}
        trajectories = load_buffer(config.buffer, expect=expect)
    mtt_options = {} if config.algorithm != "mtt" else dict(
        syn_steps=config.syn_steps, expert_epochs=config.expert_epochs,
        max_start_epoch=config.max_start_epoch, student_lr=config.student_lr,
        gradient=config.mtt_gradient, batch_syn=config.batch_syn,
        # The released script applies its truncated image gradient at half size (`2 * tuple`).
        image_grad_scale=MTT.RELEASED_IMAGE_GRAD_SCALE if config.released_compat else 1.0)
    return build_algorithm(config.algorithm, network, trajectories=trajectories,
                           batch_real=config.batch_real, micro_batch=config.micro_batch, **mtt_options)


def prepare_native_kernels(log=print) -> None:
    """Load (or build, once) the C++ CPU kernels now, so a first build happens here, said in
    one line, and not silently inside iteration 1."""
    from ..ops import _native

    ensure = getattr(_native, "ensure_extension", None)
    if ensure is not None:
        ensure(log=log)
    else:
        _native.get_extension()


def build_setup(config: DistillConfig, *, log=print) -> Setup:
    """Load the prior, data and buffer and build generator, synthetic set and algorithm."""
    from ..data import load_dataset, require_per_class
    from ..generator import LD3MGenerator
    from ..priors import load_prior
    from ..synthetic import SyntheticSet

    config.validate()
    # Under torchrun each rank runs on its own device (cuda:LOCAL_RANK with NCCL).
    device = distributed.current().device(resolve_device(config.device))
    dsa = build_dsa(config)
    prior_path = Path(config.prior)
    if not prior_path.exists():
        raise LD3MError(f"prior folder {prior_path} does not exist; pass --prior PATH")
    prior = load_prior(prior_path).to(device)
    if config.released_compat:  # a T the released sampler fails at: refused before the data load
        released_timesteps(len(prior.alphas_cumprod), config.steps)
    res = resolve_resolution(prior, config.res, released=config.released_compat)
    data = load_dataset(config.data, split="train", subset=config.subset, res=res,
                        cache_dir=config.cache_dir, max_per_class=config.max_per_class, log=log)
    require_per_class(data, config.ipc)
    rows = prior_class_rows(prior, config.subset, data.num_classes)
    network = build_network_spec(config, res, data.num_classes)
    algorithm = build_algorithm_for(config, network, res, data.num_classes)
    render = render_size(prior, res, released=config.released_compat)
    synthetic = SyntheticSet.from_real(prior, data.images, data.labels, config.ipc,
                                       stream_generator(config.seed, "init"),
                                       prior_classes=rows, image_size=render).to(device)
    knobs = generator_knobs(config)
    if config.chunk == "auto":
        knobs = choose_chunk(config, res, data.num_classes, device, log=log)
    use_memory_efficient_attention(prior, device, log=log)
    if config.compile:
        compile_prior(prior, config.compile_backend)
    generator = LD3MGenerator(prior, config.steps, guidance=config.guidance,
                              skip=None if config.skip == "none" else config.skip, eta=config.eta,
                              grad_mode=config.grad_mode, render_size=render,
                              output_size=None if res == render else res,
                              **released_generator_options(config), **knobs)
    algorithm.to(device)
    if device.type == "cpu":
        prepare_native_kernels(log)
    real = RealData.from_imageset(data)
    test_set = load_inline_eval_data(config, res, log) if config.eval_every else None
    return Setup(config, prior, generator, synthetic, algorithm, real, list(data.class_names), device, res, dsa,
                 test_set)


def load_inline_eval_data(config: DistillConfig, res: int, log):
    """The test split and a check of the architectures, now rather than at the first evaluation."""
    from ..data import load_dataset
    from ..networks import parse_arch

    for arch in config.eval_archs.split(","):
        parse_arch(arch.strip())
    return load_dataset(config.data, split="test", subset=config.subset, res=res,
                        cache_dir=config.cache_dir, log=log)


__all__ = ["DTYPES", "Setup", "build_setup", "denoiser_multiple", "device_memory", "prior_class_rows",
           "released_generator_options", "resolve_device", "resolve_resolution",
           "use_memory_efficient_attention"]
