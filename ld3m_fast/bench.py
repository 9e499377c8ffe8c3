"""The pipeline benchmark suite: one harness, three parts, one report.

a. simulated at full scale (cin256-v2, 10 classes, CFG 3, fp32), DM and MTT, in two
   comparisons that name both sides' settings:
   - equal chunk: the released scheme and ours at the same chain chunk (10) and the same
     student batching (micro-batches of 10 on both sides);
   - equal memory budget (8, 24, 80 GiB): each scheme at its fastest configuration that fits:
     the released scheme with its own full-batch student at its largest chunk that fits (its
     FLOPs do not depend on the chunk), ours at the planner's choice (mode, chunk, decoder
     chunk; student micro-batches of 10).
   "released (as released)" renders without grad, re-renders chunks with a checkpoint around
   each UNet call, and checkpoints the UNet's transformer blocks inside as the released UNet
   does (`checkpoint=True`: a 4th forward of those blocks); a row without that inner
   checkpointing stands beside it at equal chunk;
b. growth of the simulated peak with T, IPC and MTT syn_steps (both sides chunk 10, student
   micro-batches of 10, fp32);
c. measured on this machine: CPU seconds per DM iteration on the embedded prior, the
   released scheme (reference ops, released-style per-class student) vs ours (recompute,
   fused C++ ops, our student), at equal chunk and at equal memory budget; each scheme in
   its own process, one thread, interleaved rounds.

Simulations walk the real iteration under fake tensors (`ld3m_fast.distill.planner`), so parts
a and b say nothing about speed and part c says nothing about GPUs. Every row names
what it is and where it was measured.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ._host import cpu_model
from .distill.planner.plan import candidate_chunks, mode_name, plan
from .distill.planner.simulate import Walk, estimate

logger = logging.getLogger(__name__)

SETTINGS = [(256, 10, 20), (128, 1, 10), (128, 10, 10)]  # (res, ipc, T)
BUDGETS_GIB = (8, 24, 80)
CLASSES = 10
EQUAL_CHUNK = 10     # part a, equal chunk, and part b: both sides' chain chunk
STUDENT_BATCH = 10   # our student micro-batch (the released side's too at equal chunk)
DECODER_CHUNK = 2    # ours at equal chunk: the decoder back-propagated 2 images at a time
SIMULATED = "simulated (fake tensors, CPU dispatch path)"
# The released scheme as run settings (`DistillConfig` fields): its gradient mode, and its UNet's
# transformer blocks checkpointed inside as the released UNet does.
RELEASED = dict(grad_mode="released", checkpoint_attention="on", decoder_chunk=None, store_steps=None,
                sac_min_flops=None)
OURS_AT_CHUNK = f"ours: recompute, decoder chunk {DECODER_CHUNK}"
SCHEMES = {  # part a, equal chunk: name -> settings (chunk and student batching are shared)
    "released (as released)": RELEASED,
    "released, no inner checkpointing": {**RELEASED, "checkpoint_attention": "off"},
    "ours: recompute, decoder whole": dict(grad_mode="recompute", decoder_chunk=None),
    OURS_AT_CHUNK: dict(grad_mode="recompute", decoder_chunk=DECODER_CHUNK),
    "autograd (one graph, all images)": dict(grad_mode="autograd", chunk=None, decoder_chunk=None),
}


def bench_walk(prior: str, res: int, ipc: int, steps: int, algorithm: str, *, classes: int = CLASSES,
               **settings) -> Walk:
    """The walk of a run with these settings (the rest at their defaults) on `classes` classes."""
    from .distill.config import DistillConfig
    from .distill.planner.plan import planning_config

    config = planning_config(DistillConfig(prior=prior, res=res, ipc=ipc, steps=steps, algorithm=algorithm,
                                           chunk=EQUAL_CHUNK, **settings))
    return Walk.of(config, classes)


def _row(part: str, walk: Walk, scheme: str, result, **extra) -> dict:
    c = walk.config
    return {"part": part, "scheme": scheme, "prior": c.prior, "res": c.res, "ipc": c.ipc,
            "steps": c.steps, "algorithm": c.algorithm, "dtype": c.dtype,
            "syn_steps": c.syn_steps, "mtt_gradient": c.mtt_gradient, "grad_mode": c.grad_mode,
            "chunk": c.chunk, "decoder_chunk": c.decoder_chunk, "micro_batch": c.micro_batch,
            "mode": mode_name(walk), "store_steps": c.store_steps or 0, "sac_min_flops": c.sac_min_flops,
            "checkpoint_attention": c.attention_checkpointed,
            "peak_gib": result.peak_gib, "tflops": result.tflops,
            "phase_peaks_gib": {k: v / 2**30 for k, v in result.phase_peaks.items()},
            "weights_gib": result.weights_bytes / 2**30, "method": result.method,
            "device": SIMULATED, **extra}


def released_at_budget(base: Walk, budget: int):
    """(the released scheme's fastest configuration within `budget` or None, it at chunk 10).

    Its own full-batch student; the largest chunk that fits (its FLOPs do not depend on the
    chunk). When the distill phase alone is over budget no chunk helps and none is tried."""
    walk = base.at(micro_batch=None, dtype="fp32", **RELEASED)
    default = estimate(walk.at(chunk=min(EQUAL_CHUNK, walk.images)))
    if default.phase_peaks.get("distill", 0.0) > budget:
        return None, default
    for chunk in sorted(candidate_chunks(walk), reverse=True):
        result = estimate(walk.at(chunk=chunk))
        if result.peak_bytes <= budget:
            return result, default
    return None, default


def simulated_full_scale(prior: str = "cin256-v2", settings=SETTINGS, budgets_gib=BUDGETS_GIB,
                         algorithms=("dm", "mtt"), *, classes: int = CLASSES, overrides=None,
                         plan_options=None) -> list[dict]:
    """Part a over `settings` [(res, ipc, T)]: equal chunk, then equal budget per `budgets_gib`.

    overrides: other run settings for every row (tests shrink the student); plan_options:
    keyword arguments for `plan` (default: its automatic candidates, student micro-batches of 10)."""
    rows = []
    for res, ipc, steps in settings:
        for algorithm in algorithms:
            base = bench_walk(prior, res, ipc, steps, algorithm, classes=classes, micro_batch=STUDENT_BATCH,
                              **(overrides or {}))
            chunk = min(EQUAL_CHUNK, base.images)
            for scheme, changes in SCHEMES.items():
                walk = base.at(**{"chunk": chunk, **changes})
                started = time.process_time()
                rows.append(_row("a", walk, scheme, estimate(walk), comparison="equal chunk"))
                logger.info(f"  a, equal chunk: {res}² ipc {ipc} T={steps} {algorithm} {scheme}: "
                            f"{rows[-1]['peak_gib']:.2f} GiB, {rows[-1]['tflops']:.1f} TFLOP "
                            f"({time.process_time() - started:.0f} s CPU)")
            for gib in budgets_gib:
                budget = int(gib * 2**30)
                released, default = released_at_budget(base, budget)
                _, best = plan(base, budget, **{"micro_batches": [STUDENT_BATCH], **(plan_options or {})})
                extra = dict(comparison="equal budget", budget_gib=gib, released_default_tflops=default.tflops)
                rows.append(_row("a", (released or default).walk, "released (as released)", released or default,
                                 fits=released is not None, **extra))
                if best is not None:
                    rows.append(_row("a", best.walk, "ours (planner's choice)", best.estimate, fits=True, **extra))
                logger.info(f"  a, equal budget {gib} GiB: {res}² ipc {ipc} T={steps} {algorithm}: released "
                            + (f"chunk {released.walk.config.chunk}" if released else "does not fit") + ", ours "
                            + (f"{best.mode}, chunk {best.walk.config.chunk}, decoder {best.walk.config.decoder_chunk}"
                               if best else "nothing fits"))
    return rows


def simulated_growth(prior: str = "cin256-v2", syn_steps=(10, 20, 40, 80)) -> list[dict]:
    """Part b: both sides at chain chunk 10 and student micro-batches of 10, fp32."""
    rows = []
    base = bench_walk(prior, 256, 10, 20, "dm", micro_batch=STUDENT_BATCH)
    growth = [("steps", t, base.at(steps=t)) for t in (10, 20, 40, 80)]
    growth += [("ipc", n, base.at(ipc=n)) for n in (1, 10, 50)]
    mtt = base.at(algorithm="mtt")
    growth += [("syn_steps", n, mtt.at(syn_steps=n, mtt_gradient=g)) for g in ("truncated", "full") for n in syn_steps]
    schemes = {"released (as released)": RELEASED, OURS_AT_CHUNK: SCHEMES[OURS_AT_CHUNK]}
    for name, value, walk in growth:
        for scheme, changes in schemes.items():
            if name == "syn_steps" and scheme.startswith("released"):
                continue
            walked = walk.at(**changes)
            row = _row("b", walked, scheme, estimate(walked))
            row["varied"] = name
            rows.append(row)
            logger.info(f"  b: {name}={value} {scheme} {walked.config.mtt_gradient if name == 'syn_steps' else ''}: "
                        f"{row['peak_gib']:.2f} GiB")
    return rows


# --------------------------------------------------------------------------- part c

# Part c's schemes. Each runs in its own process (the allocator setting is process-wide:
# ours applies it as the CLI does, the released code does not), one thread, interleaved.
PART_C_SCHEMES = {
    "released": dict(label="released (eager, reference ops)", grad_mode="released", chunk=10,
                     backend="reference", student="released", keep_memory=False),
    "ours": dict(label="ours (recompute, fused C++ ops)", grad_mode="recompute", chunk=10,
                 backend=None, student="ours", keep_memory=True),
    "released, best chunk": dict(label="released, best chunk (all images)", grad_mode="released",
                                 chunk=None, backend="reference", student="released", keep_memory=False),
    "ours, best plan": dict(label="ours, best plan (whole graph kept, all images)", grad_mode="recompute",
                            chunk=None, store_steps="all", backend=None, student="ours", keep_memory=True),
    "ours, compiled": dict(label="ours (recompute, fused C++ ops, torch.compile)", grad_mode="recompute",
                           chunk=10, backend=None, student="ours", keep_memory=True),
}
COMPARISONS = {"equal chunk": ("released", "ours", "ours, compiled"),
               "equal memory budget": ("released", "released, best chunk", "ours", "ours, best plan")}


def _scheme_settings(scheme: dict, steps: int) -> dict:
    """A part-c scheme as run settings: the released student's UNet checkpoints its attention
    blocks inside as released; "all" stored steps keep the whole chain's graph."""
    settings = dict(grad_mode=scheme["grad_mode"], chunk=scheme["chunk"])
    if scheme["student"] == "released":
        settings["checkpoint_attention"] = "on"
    if scheme.get("store_steps") == "all":
        settings["store_steps"] = steps
    return settings


def measure_scheme(spec: dict) -> dict:
    """One part-c process: build the run, 1 warm-up + spec["iterations"] timed iterations.

    spec: res, ipc, steps, batch_real, iterations, scheme (a PART_C_SCHEMES key), compile
    (backend or None). Returns per-iteration CPU seconds (user + system), system seconds,
    minor page faults, wall seconds, the peak RSS and what actually ran.
    """
    import resource

    scheme = dict(PART_C_SCHEMES[spec["scheme"]])
    if scheme["keep_memory"]:
        from ._memory import keep_freed_memory

        keep_freed_memory()
    if scheme["backend"]:
        os.environ["LD3M_FAST_BACKEND"] = scheme["backend"]
    torch.set_num_threads(1)
    from .distill import DistillConfig, Distiller, build_setup, resolve_defaults

    config = DistillConfig(res=spec["res"], ipc=spec["ipc"], steps=spec["steps"], batch_real=spec["batch_real"],
                           iterations=spec["iterations"] + 1, threads=1, progress=False,
                           compile=bool(spec.get("compile")), compile_backend=spec.get("compile") or "inductor",
                           **_scheme_settings(scheme, spec["steps"]))
    config = resolve_defaults(config)
    setup = build_setup(config)
    if scheme["student"] == "released":
        from .reference.distill_losses import ReleasedDM

        setup.algorithm = ReleasedDM(setup.algorithm.network, batch_real=config.batch_real)
    rows = []
    with tempfile.TemporaryDirectory() as run_dir:
        distiller = Distiller(setup, run_dir)
        for i in range(spec["iterations"] + 1):
            before = resource.getrusage(resource.RUSAGE_SELF)
            started = time.perf_counter()
            distiller.step()
            after = resource.getrusage(resource.RUSAGE_SELF)
            rows.append({"warmup": i == 0, "wall_s": time.perf_counter() - started,
                         "cpu_s": after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime,
                         "sys_s": after.ru_stime - before.ru_stime, "minflt": after.ru_minflt - before.ru_minflt})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    generator = setup.generator.describe()
    options = {k: generator[k] for k in ("checkpoint_attention", "store_steps") if generator[k]}
    return {"rows": rows, "peak_rss_gib": peak / 2**30, "generator": {"chunk": setup.generator.chunk_size,
            **options}, "backend": os.environ.get("LD3M_FAST_BACKEND", "auto"), "threads": torch.get_num_threads()}


def _spawn_scheme(spec: dict) -> dict:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "LD3M_FAST_BACKEND"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    code = "import json, sys; from ld3m_fast.bench import measure_scheme; print(json.dumps(measure_scheme(json.loads(sys.argv[1]))))"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"part c: {spec['scheme']} at {spec['res']}² failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measured_cpu(resolutions=(32, 128), ipc: int = 10, iterations: int = 3, compile_backend: str | None = None,
                 *, pairs: int = 3, comparisons=tuple(COMPARISONS), batch_real: int = 64,
                 steps: int = 10) -> list[dict]:
    """Part c: CPU seconds per DM iteration on the embedded prior, released vs ours, like with like.

    Per resolution, `pairs` rounds; each round runs every scheme once, interleaved, each in a
    fresh process (1 thread) with 1 warm-up and `iterations` timed iterations:
      equal chunk:          released (released grad mode, chunk 10, reference ops, the
                            released-style per-class student) vs ours (recompute, chunk 10,
                            fused C++ ops, our student, the CLI's allocator setting);
      equal memory budget:  each at its fastest setting that fits the budget; on this CPU
                            (24 GB) everything fits at these sizes, so released at its best of
                            chunk 10 and all images, ours at its best of chunk 10 and the
                            generator's whole-graph plan (all images).
    `compile_backend` adds ours compiled (torch.compile) at chunk 10.
    Rows: one per scheme and resolution with CPU-time median/min/max (user + system),
    system time, minor faults, peak RSS, and per comparison the ratio of medians.
    """
    names = []
    for comparison in comparisons:
        names += [n for n in COMPARISONS[comparison] if n not in names and n != "ours, compiled"]
    if compile_backend:
        names.append("ours, compiled")
    rows = []
    for res in resolutions:
        results = {name: [] for name in names}
        for pair in range(pairs):
            for name in names:
                spec = dict(res=res, ipc=ipc, steps=steps, batch_real=batch_real, iterations=iterations,
                            scheme=name, compile=compile_backend if name == "ours, compiled" else None)
                results[name].append(_spawn_scheme(spec))
                times = [r["cpu_s"] for r in results[name][-1]["rows"] if not r["warmup"]]
                logger.info(f"  c: {res}² round {pair + 1}/{pairs} {name}: {statistics.median(times):.2f} CPU s/it")
        rows += _part_c_rows(res, ipc, steps, batch_real, results, comparisons)
    return rows


def _part_c_rows(res, ipc, steps, batch_real, results, comparisons) -> list[dict]:
    def timed(runs, key="cpu_s"):
        return [r[key] for run in runs for r in run["rows"] if not r["warmup"]]

    def round_medians(runs):
        return [statistics.median(r["cpu_s"] for r in run["rows"] if not r["warmup"]) for run in runs]

    rows = {}
    for name, runs in results.items():
        times = timed(runs)
        scheme = PART_C_SCHEMES[name]
        rows[name] = {"part": "c", "scheme": scheme["label"], "key": name, "res": res, "ipc": ipc,
                      "algorithm": "dm", "steps": steps, "batch_real": batch_real,
                      "grad_mode": scheme["grad_mode"], "chunk": runs[0]["generator"]["chunk"],
                      "generator_options": {k: v for k, v in runs[0]["generator"].items() if k != "chunk"},
                      "ops": runs[0]["backend"], "student": scheme["student"],
                      "allocator_keeps_memory": scheme["keep_memory"],
                      "seconds_median": statistics.median(times), "seconds_min": min(times),
                      "seconds_max": max(times), "seconds_spread": max(times) - min(times),
                      "sys_seconds_median": statistics.median(timed(runs, "sys_s")),
                      "minor_faults_median": statistics.median(timed(runs, "minflt")),
                      "peak_rss_gib": max(run["peak_rss_gib"] for run in runs),
                      "iterations_timed": len(times), "rounds": len(runs), "measure": "CPU time (user + system)",
                      "device": _cpu_name(), "threads": runs[0]["threads"], "comparisons": {}}
    for comparison in comparisons:
        members = [n for n in COMPARISONS[comparison] if n in rows]
        released = min((n for n in members if n.startswith("released")), key=lambda n: rows[n]["seconds_median"])
        ours = min((n for n in members if n.startswith("ours")), key=lambda n: rows[n]["seconds_median"])
        per_round = [a / b for a, b in zip(round_medians(results[released]), round_medians(results[ours]))]
        for n in members:
            rows[n]["comparisons"][comparison] = {
                "released": released, "ours": ours, "chosen": n in (released, ours),
                "speedup_vs_released": rows[released]["seconds_median"] / rows[n]["seconds_median"],
                "ours_vs_released": rows[released]["seconds_median"] / rows[ours]["seconds_median"],
                "per_round_ratio_min": min(per_round), "per_round_ratio_max": max(per_round)}
    for row in rows.values():  # the ratio at equal chunk (or the first comparison) as the headline
        first = row["comparisons"].get("equal chunk") or next(iter(row["comparisons"].values()), None)
        row["speedup_vs_released"] = first["speedup_vs_released"] if first else None
    return list(rows.values())


def _cpu_name() -> str:
    return f"CPU: {cpu_model()} ({os.cpu_count()} cores)"


def _peak_phase(row: dict) -> str:
    return max(row["phase_peaks_gib"], key=row["phase_peaks_gib"].get)


def _setting(r: dict) -> str:
    """A row's own settings in words: mode, chain chunk, decoder chunk, student batch."""
    student = f"student micro-batch {r['micro_batch']}" if r["micro_batch"] else "full-batch student"
    chunk = f"chunk {r['chunk'] or 'all'}"
    if r["grad_mode"] == "recompute":
        chunk += f", decoder {r['decoder_chunk'] or r['chunk'] or 'all'}"
    inner = ", attention checkpointed inside" if r.get("checkpoint_attention") else ""
    return f"{r['mode']}{inner}; {chunk}; {student}"


def _priors(rows: list[dict]) -> str:
    """The priors the rows were simulated with, as the table header names them."""
    return ", ".join(dict.fromkeys(r["prior"] for r in rows))


def _markdown_a(a: list[dict]) -> list[str]:
    out = []
    same = [r for r in a if r.get("comparison") == "equal chunk"]
    if same:
        out += [f"### a1. Equal chunk: both sides chain chunk {EQUAL_CHUNK}, student micro-batches of "
                f"{STUDENT_BATCH}, fp32 ({_priors(same)}, {CLASSES} classes, CFG 3; {SIMULATED})", "",
                "| res | IPC | T | alg | scheme | settings | peak GiB | peak phase | TFLOP/iter | "
                "vs released peak | vs released FLOPs |",
                "|---:|---:|---:|---|---|---|---:|---|---:|---:|---:|"]
        for r in same:
            ref = next(x for x in same if x["scheme"] == "released (as released)" and x["res"] == r["res"]
                       and x["ipc"] == r["ipc"] and x["algorithm"] == r["algorithm"])
            out.append(f"| {r['res']} | {r['ipc']} | {r['steps']} | {r['algorithm']} | {r['scheme']} | "
                       f"{_setting(r)} | {r['peak_gib']:.2f} | {_peak_phase(r)} | {r['tflops']:.1f} | "
                       f"{r['peak_gib'] / ref['peak_gib']:.2f}x | {r['tflops'] / ref['tflops']:.2f}x |")
        out.append("")
    budget = [r for r in a if r.get("comparison") == "equal budget"]
    if budget:
        out += ["### a2. Equal memory budget: each scheme at its fastest configuration that fits, fp32 "
                f"(released: its full-batch student, its largest chunk that fits; ours: the planner's choice, "
                f"student micro-batches of {STUDENT_BATCH}; {SIMULATED})", "",
                "| res | IPC | T | alg | budget | released: settings | peak GiB | TFLOP/iter | ours: settings | "
                "peak GiB | TFLOP/iter | ours / released FLOPs |",
                "|---:|---:|---:|---|---:|---|---:|---:|---|---:|---:|---:|"]
        keys = sorted({(r["res"], r["ipc"], r["steps"], r["algorithm"], r["budget_gib"]) for r in budget},
                      key=lambda k: (-k[0], k[1], k[3], k[4]))
        for key in keys:
            group = [r for r in budget if (r["res"], r["ipc"], r["steps"], r["algorithm"], r["budget_gib"]) == key]
            rel = next(r for r in group if r["scheme"].startswith("released"))
            ours = next((r for r in group if r["scheme"].startswith("ours")), None)
            if rel["fits"]:
                rel_cells = f"{_setting(rel)} | {rel['peak_gib']:.2f} | {rel['tflops']:.1f}"
                ratio = f"{ours['tflops'] / rel['tflops']:.2f}x" if ours else ""
            else:
                rel_cells = (f"does not fit (chunk {rel['chunk']}: {rel['peak_gib']:.2f} GiB, "
                             f"{_peak_phase(rel)}) | - | -")
                ratio = (f"({ours['tflops'] / rel['released_default_tflops']:.2f}x its chunk-{rel['chunk']} FLOPs)"
                         if ours else "")
            ours_cells = (f"{_setting(ours)} | {ours['peak_gib']:.2f} | {ours['tflops']:.1f}" if ours
                          else "nothing fits | - | -")
            out.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]:g} GiB | {rel_cells} | "
                       f"{ours_cells} | {ratio} |")
        out.append("")
    return out


def markdown(rows: list[dict]) -> str:
    """The report: one table per part."""
    out = []
    out += _markdown_a([r for r in rows if r["part"] == "a"])
    b = [r for r in rows if r["part"] == "b"]
    if b:
        out += ["### b. Growth of the simulated peak (256², IPC 10, T=20 unless varied; DM unless MTT; fp32; "
                f"both sides chain chunk {EQUAL_CHUNK}, student micro-batches of {STUDENT_BATCH})", "",
                "| varied | value | scheme | decoder chunk | MTT gradient | peak GiB | peak phase |",
                "|---|---:|---|---:|---|---:|---|"]
        for r in b:
            value = r[r["varied"]]
            grad = r["mtt_gradient"] if r["varied"] == "syn_steps" else ""
            out.append(f"| {r['varied']} | {value} | {r['scheme']} | {r['decoder_chunk'] or r['chunk']} | {grad} | "
                       f"{r['peak_gib']:.2f} | {_peak_phase(r)} |")
        out.append("")
    c = [r for r in rows if r["part"] == "c"]
    if c:
        first = c[0]
        out += [f"### c. Measured: CPU seconds per DM iteration, embedded prior, IPC {first['ipc']}, T={first['steps']}, "
                f"batch_real {first['batch_real']} ({first['device']}, {first['threads']} thread(s); "
                f"{first['rounds']} interleaved rounds x {first['iterations_timed'] // first['rounds']} iterations, "
                "each scheme in its own process)", "",
                "Each comparison sets the fastest released row against the fastest ours row it lists "
                "(marked *). CPU time is user + system; the spread is min-max over every timed iteration, "
                "the per-round range is the ratio measured round by round.", "",
                "| res | comparison | scheme | grad mode, chunk | s/iter (median) | min-max | system s | "
                "minor faults | peak RSS GiB | speed-up vs released | per-round range |",
                "|---:|---|---|---|---:|---|---:|---:|---:|---:|---|"]
        order = list(COMPARISONS)
        table = sorted(((r["res"], order.index(name), COMPARISONS[name].index(r["key"]), name, comp, r)
                        for r in c for name, comp in r.get("comparisons", {}).items()), key=lambda t: t[:3])
        for *_, name, comp, r in table:
            mark = "*" if comp["chosen"] else ""
            extra = ", ".join(f"{k}={v}" for k, v in r.get("generator_options", {}).items())
            setting = f"{r['grad_mode']}, {r['chunk'] or 'all'}" + (f", {extra}" if extra else "")
            ratio = (f"{comp['per_round_ratio_min']:.2f}-{comp['per_round_ratio_max']:.2f}x"
                     if comp["chosen"] and comp["ours"] == r["key"] else "")
            out.append(f"| {r['res']} | {name} | {r['scheme']}{mark} | {setting} | {r['seconds_median']:.2f} | "
                       f"{r['seconds_min']:.2f}-{r['seconds_max']:.2f} | {r['sys_seconds_median']:.2f} | "
                       f"{r['minor_faults_median']:.0f} | {r['peak_rss_gib']:.2f} | "
                       f"{comp['speedup_vs_released']:.2f}x | {ratio} |")
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict], path) -> Path | None:
    """Peak memory vs T and IPC (part b) as a PNG; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    b = [r for r in rows if r["part"] == "b"]
    if not b:
        return None
    panels = [("steps", "T (DDIM steps)"), ("ipc", "IPC"), ("syn_steps", "MTT syn_steps")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (name, label) in zip(axes, panels):
        series = {}
        for r in b:
            if r["varied"] == name:
                key = r["scheme"] + (f" ({r['mtt_gradient']})" if name == "syn_steps" else "")
                series.setdefault(key, []).append((r[name], r["peak_gib"]))
        for key, points in series.items():
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=key)
        ax.set_xlabel(label)
        ax.set_ylabel("simulated peak (GiB)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle(f"ld3m-fast: simulated peak memory per iteration, {_priors(b)} at 256²")
    fig.tight_layout()
    from ._files import atomic_write

    path = Path(path)
    with atomic_write(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def write_json(rows: list[dict], path) -> Path:
    from ._files import write_text_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": _cpu_name()}
    write_text_atomic(path, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return path
