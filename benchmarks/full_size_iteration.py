"""One real distillation iteration of each full-size prior on this CPU: seconds per phase, measured
peak beside the planned one.

    python benchmarks/full_size_iteration.py --out DIR [--priors cin256-v2,dit-xl-2-256] [--threads N]

cin256-v2 (UNet 400.9 M + VQ-f4 55.3 M, 3x64x64 latents) and DiT-XL/2-256 (675 M + the SD KL-f8
autoencoder 83.7 M, 4x32x32 latents), random weights, at 256², sized for this machine: 2 classes x
IPC 1, T = 2, DM, guidance 3, recompute with chain and decoder chunks of 1, 16 real images per
class. Each prior runs in a fresh process (`benchmarks/plan_check.py: measure_row`): the CPU seconds
of the render, distill and backward phases (`distill_iteration`'s phases; backward includes the
optimiser step), the measured peak (the CPU allocator's running total under torch.profiler, from
before the prior was built) and the planner's predicted peak for the same walk. Writes
DIR/full_size_iteration.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SETTINGS = dict(ipc=1, steps=2, chunk=1, decoder_chunk=1, batch_real=16)
CLASSES = 2


def _spawn(prior: str, threads: int) -> dict:
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from benchmarks.plan_check import measure_row; "
            "print('ROW ' + json.dumps(measure_row(sys.argv[2], 'recompute', json.loads(sys.argv[3]), "
            "threads=int(sys.argv[4]), classes=int(sys.argv[5]))))")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT), prior, json.dumps(SETTINGS), str(threads),
                           str(CLASSES)], env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True)
    rows = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if done.returncode or not rows:
        return {"prior": prior, "error": (done.stderr or done.stdout)[-2000:]}
    return json.loads(rows[-1])


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"One real iteration per full-size prior, random weights, 256², {CLASSES} classes x IPC "
             f"{SETTINGS['ipc']}, T={SETTINGS['steps']}, DM, recompute, chain and decoder chunks of 1, "
             f"{SETTINGS['batch_real']} real images per class ({device}).", "",
             "| prior | threads | render CPU s | distill CPU s | backward CPU s | iteration CPU s | "
             "planned peak GiB | measured peak GiB | measured / planned | peak RSS GiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['prior']} | failed: {r['error'].strip().splitlines()[-1][:150]} |" + " |" * 8)
            continue
        phase = r["phase_cpu_s"]
        lines.append(f"| {r['prior']} | {r['threads']} | {phase.get('render')} | {phase.get('distill')} | "
                     f"{phase.get('backward')} | {r['iteration_cpu_s']} | {r['predicted_peak_bytes'] / 2**30:.2f} | "
                     f"{r['measured_peak_bytes'] / 2**30:.2f} | {r['measured_over_predicted']:.3f} | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from ld3m_fast._files import write_json_atomic, write_text_atomic
    from ld3m_fast._host import cpu_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "full_size_iteration")
    parser.add_argument("--priors", default="cin256-v2,dit-xl-2-256")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    device = f"CPU: {cpu_model()}, {os.cpu_count()} cores"
    rows = []
    for prior in [p.strip() for p in args.priors.split(",") if p.strip()]:
        print(f"{prior} ...", flush=True)
        rows.append(_spawn(prior, args.threads))
        args.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out / "full_size_iteration.json", rows)
        write_text_atomic(args.out / "full_size_iteration.md", markdown(rows, device))
    print(markdown(rows, device))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
