"""DiT-XL/2-256 at full size as a diffusers pipeline folder, loaded through `load_prior(folder)`.

    python benchmarks/pipeline_prior_full_size.py [--out benchmarks/results/pipeline_prior] [--threads 1]

Builds DiT-XL/2-256's full-size configuration (`DIT_XL_2_256_CONFIG`) and the SD KL-f8
autoencoder (`SD_KL_F8_VAE_CONFIG`) with random weights (the class table shared by all blocks,
as in the released checkpoints), saves them with diffusers' own `DiTPipeline.save_pretrained`
in a temporary folder, then loads that folder through `ld3m_fast.load_prior` and runs one
guided denoiser call (a class row and the null row, batch 2, 4x32x32 latents) and one decode
to 256². Both outputs are compared with the same diffusers models called the way DiTPipeline
calls them (labels, then `vae.decode(z / scaling_factor)`), computed before saving.

Every phase reports CPU seconds (user + system of this process) and wall seconds, and the peak
resident memory of the phase (VmHWM, reset at each phase's start through /proc/self/clear_refs
where the kernel allows; otherwise the process's peak so far, as labelled). One run, n = 1: the
numbers say how long and how much on this machine, not a distribution. The temporary folder is
removed at the end. Results: `pipeline_prior_dit_xl_2_256.json` and the printed table in `--out`.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

LABEL = 207  # an ImageNet class; the second row is the null class
T = 500


def _peak_reset() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


class Phase:
    """CPU and wall seconds and peak RSS of one `with` block."""

    rows: list[dict] = []

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.reset = _peak_reset()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu0, self.wall0 = usage.ru_utime + usage.ru_stime, time.perf_counter()
        return self

    def __exit__(self, *exc):
        usage = resource.getrusage(resource.RUSAGE_SELF)
        row = {"phase": self.name, "cpu_s": round(usage.ru_utime + usage.ru_stime - self.cpu0, 2),
               "wall_s": round(time.perf_counter() - self.wall0, 2),
               "peak_rss_gib": round(_status_bytes("VmHWM") / 2**30, 2),
               "peak_is": "this phase" if self.reset else "the process so far",
               "rss_after_gib": round(_status_bytes("VmRSS") / 2**30, 2)}
        Phase.rows.append(row)
        print(f"{row['phase']:<44} {row['cpu_s']:>8.2f} {row['wall_s']:>8.2f} {row['peak_rss_gib']:>9.2f} "
              f"{row['rss_after_gib']:>9.2f}", flush=True)
        return False


def _full_size_pipeline():
    """(DiTPipeline, inputs) with random full-size weights; the global RNG is forked, not reseeded."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    from ld3m_fast.distill.planner.priors import DIT_SCHEDULER_CONFIG
    from ld3m_fast.priors.configs import DIT_XL_2_256_CONFIG, SD_KL_F8_VAE_CONFIG

    with torch.random.fork_rng():
        torch.manual_seed(0)  # diffusers initialises through the global RNG
        transformer = DiTTransformer2DModel(**DIT_XL_2_256_CONFIG).eval()
        vae = AutoencoderKL(**SD_KL_F8_VAE_CONFIG).eval()
    first = transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    for block in transformer.transformer_blocks[1:]:  # one table, as the released checkpoints have
        block.norm1.emb.class_embedder.embedding_table.weight.data.copy_(first.data)
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(**DIT_SCHEDULER_CONFIG))


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pipeline_prior"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tmp", type=Path, default=None, help="where the pipeline folder is written (default: $TMPDIR)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import diffusers

    from ld3m_fast._host import cpu_model
    from ld3m_fast.priors import load_prior

    header = f"{'phase':<44} {'cpu s':>8} {'wall s':>8} {'peak GiB':>9} {'RSS GiB':>9}"
    print(header)
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 32, 32, generator=generator)
    t = torch.full((2,), T)
    labels = torch.tensor([LABEL, 1000])
    folder = Path(tempfile.mkdtemp(prefix="dit-xl-2-256-pipeline-", dir=args.tmp))
    try:
        with Phase("build random DiT-XL/2-256 + SD KL-f8 (diffusers)"):
            pipeline = _full_size_pipeline()
        params = {"transformer": sum(p.numel() for p in pipeline.transformer.parameters()),
                  "vae": sum(p.numel() for p in pipeline.vae.parameters())}
        with Phase("reference: DiT(labels) + vae.decode(z / 0.18215)"), torch.no_grad():
            eps_ref = pipeline.transformer(z, timestep=t, class_labels=labels).sample[:, :4]
            image_ref = pipeline.vae.decode(z / pipeline.vae.config.scaling_factor).sample
        with Phase("DiTPipeline.save_pretrained"):
            pipeline.save_pretrained(folder)
        del pipeline
        gc.collect()
        with Phase("load_prior(pipeline folder)"):
            prior = load_prior(folder)
        with Phase("prior.eps: class row + null row, batch 2"), torch.no_grad():
            eps = prior.eps(z, t, prior.class_table[labels])
        with Phase("prior.decode: 4x32x32 -> 3x256x256, batch 2"), torch.no_grad():
            image = prior.decode(z)
        disk = _folder_bytes(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result = {
        "what": "DiT-XL/2-256 full-size config, random weights, saved by DiTPipeline.save_pretrained, "
                "loaded by ld3m_fast.load_prior(folder); one run (n=1)",
        "device": f"CPU: {cpu_model()}, {os.cpu_count()} cores (shared with other jobs), "
                  f"{args.threads} torch thread(s)",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__},
        "parameters": params, "pipeline_folder_bytes": disk,
        "prior": {"num_classes": prior.num_classes, "null_index": prior.null_index,
                  "image_size": prior.image_size, "latent_shape": list(prior.latent_shape()),
                  "scaling_factor": prior.autoencoder.scaling_factor, "conditioning": prior.conditioning},
        "equal_to_diffusers": {"eps": bool(torch.equal(eps, eps_ref)),
                               "eps_max_abs_diff": float((eps - eps_ref).abs().max()),
                               "decode": bool(torch.equal(image, image_ref)),
                               "decode_max_abs_diff": float((image - image_ref).abs().max())},
        "phases": Phase.rows,
    }
    summary = [
        f"device: {result['device']}",
        f"versions: {result['versions']}",
        f"parameters: transformer {params['transformer'] / 1e6:.1f} M, vae {params['vae'] / 1e6:.1f} M; "
        f"pipeline folder {disk / 2**30:.2f} GiB",
        f"prior: {result['prior']}",
        f"outputs vs the diffusers models called as DiTPipeline does: eps equal {result['equal_to_diffusers']['eps']} "
        f"(max |diff| {result['equal_to_diffusers']['eps_max_abs_diff']:.3g}), decode equal "
        f"{result['equal_to_diffusers']['decode']} (max |diff| {result['equal_to_diffusers']['decode_max_abs_diff']:.3g})",
    ]
    for line in summary:
        print(line)
    args.out.mkdir(parents=True, exist_ok=True)
    from ld3m_fast._files import write_json_atomic, write_text_atomic

    table = [header] + [f"{r['phase']:<44} {r['cpu_s']:>8.2f} {r['wall_s']:>8.2f} {r['peak_rss_gib']:>9.2f} "
                        f"{r['rss_after_gib']:>9.2f}" for r in Phase.rows]
    out_lines = table + [""] + summary
    write_json_atomic(args.out / "pipeline_prior_dit_xl_2_256.json", result)
    write_text_atomic(args.out / "pipeline_prior_dit_xl_2_256.txt", "\n".join(out_lines) + "\n")
    print(f"wrote {args.out / 'pipeline_prior_dit_xl_2_256.json'} and .txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
