"""Three budgets and the chunk-10 decoder-piece peaks in one process (the in-process memo serves all)."""
import json, sys, time
import torch
torch.set_num_threads(1)
from dataclasses import replace
from ld3m_fast.cli.main import main
from ld3m_fast.planner.simulate import IterationSpec, estimate
from ld3m_fast.planner.plan import released_reference

out = "benchmarks/results/plan_256"
common = ["plan", "--prior", "cin256-v2", "--res", "256", "--ipc", "10", "--classes", "10", "--steps", "20",
          "--algorithm", "dm", "--dtypes", "fp32", "--chunks", "1,10", "--decoder-chunks", "1,10"]
t0 = time.time()
for b in sys.argv[1:]:
    print(f"=== budget {b} (start {time.time()-t0:.0f}s)", flush=True)
    rc = main(common + ["--budget", b, "--json", f"{out}/plan_{b}.json"])
    print(f"=== budget {b} rc {rc} done {time.time()-t0:.0f}s", flush=True)
spec = IterationSpec(prior="cin256-v2", res=256, ipc=10, num_classes=10, steps=20, algorithm="dm", micro_batch=10)
rel = released_reference(spec)
rows = []
for d in (10, 1):
    e = estimate(replace(spec, chunk=10, decoder_chunk=d))
    rows.append({"mode": "recompute", "chunk": 10, "decoder_chunk": d, "peak_bytes": int(e.peak_bytes),
                 "flops": int(e.flops), "phase_peaks": {k: int(v) for k, v in e.phase_peaks.items()}})
    print(f"recompute chunk 10 decoder {d}: peak {e.peak_bytes/2**30:.2f} GiB, {e.flops/1e12:.1f} TFLOP", flush=True)
json.dump({"setting": {**spec.describe(), "device": "simulated (fake tensors, CPU dispatch path)"},
           "released": {"chunk": rel.spec.chunk, "peak_bytes": int(rel.peak_bytes), "flops": int(rel.flops),
                        "phase_peaks": {k: int(v) for k, v in rel.phase_peaks.items()}},
           "chunk10": rows}, open(f"{out}/chunk10_decoder_pieces.json", "w"), indent=2)
print(f"=== all done {time.time()-t0:.0f}s", flush=True)
