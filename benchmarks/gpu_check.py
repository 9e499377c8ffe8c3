"""GPU check kit: the kernels' GPU tier, one full-size iteration per plan, SDPA against xformers.

    python benchmarks/gpu_check.py --out DIR [--predictions FILE]        # CUDA, < 8 minutes
    python benchmarks/gpu_check.py --cpu-smoke --out DIR                 # the same code, tiny, on CPU
    python benchmarks/gpu_check.py --predict-only --budget 139GiB --out DIR   # planner only, any CPU

Parts, each guarded (a failure is recorded and the next part runs) under one global deadline
(what no longer fits is skipped, with a note):

1. tests: `pytest -m gpu` in a subprocess over the test files holding gpu-marked tests (the
   Triton kernels against the PyTorch reference, fp32/fp16/bf16, forward and backward), with
   TRITON_INTERPRET=0 so that compiled kernels run. Without CUDA every selected test must skip
   cleanly: what is checked then is the selection.
2. iteration: one distillation iteration (DM, `ld3m_fast.distill.iteration.distill_iteration`)
   of cin256-v2 with random weights at 256², IPC 10, T=20, 10 classes, guidance 3, for the
   released scheme (chunk 10, full-batch student, attention checkpointed as released) and ours
   (recompute chunk 10; stored steps under selective checkpointing with the decoder in pieces;
   the planner's choice for the card's memory). Per plan: the measured peak (CUDA:
   `torch.cuda.max_memory_allocated`, reset before; CPU: the planner's live-storage tracker
   over the real iteration) beside the planner's prediction (`ld3m_fast.distill.planner.simulate
   .estimate`), seconds per iteration (synchronised; a warm-up, then the median of up to
   --timed) and the ratios to the released scheme.
3. attention: one denoiser forward + backward with PyTorch SDPA and, where installed (CUDA
   only), xformers through `ld3m_fast.distill.setup.use_memory_efficient_attention`.

Planner predictions walk the code under fake tensors on the CPU: at full size the planner's
own search takes many minutes, so a GPU session makes them first, on its CPU, with
--predict-only (no device time) and hands the file to the GPU run with --predictions; the
file is used only when the library's sources are the same. Without it the fixed plans'
predictions are computed in worker processes while the device measures.

Writes DIR/gpu_check.json and DIR/gpu_check.md after every step (a run stopped at its limit
keeps what it finished), DIR/gpu_tier_pytest.log and DIR/gpu_tier_junit.xml; --predict-only
writes DIR/planner_predictions.json. Exit status 1 when a part failed, else 0.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

STARTED = time.monotonic()
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not

import torch  # noqa: E402

REPORT = "gpu_check"
PREDICTIONS = "planner_predictions.json"
PARTS = ("tests", "iteration", "attention")
TITLES = {"tests": "1. GPU-tier tests", "iteration": "2. One full iteration per plan",
          "attention": "3. Attention: SDPA against xformers"}
RUN_ORDER = ("tests", "attention", "iteration")  # the cheap parts first, the long one last
RELEASED = "released"
CHOICE = "ours: planner's choice"
GPU_MARK = re.compile(r"^\s*(@pytest\.mark\.gpu\b|pytestmark\s*=.*\bpytest\.mark\.gpu\b)", re.MULTILINE)


@dataclass(frozen=True)
class Scale:
    """The size a check runs at: the GPU run, or the CPU smoke test of the same code.

    plan_search: keyword arguments narrowing `ld3m_fast.distill.planner.plan.plan`'s search, as
    (name, values) pairs; () searches as `--chunk auto` does.
    """

    name: str
    prior: str             # a planner prior name (ld3m_fast.distill.planner.priors.FULL_SIZE_PRIORS)
    res: int
    ipc: int
    steps: int
    num_classes: int
    guidance: float
    batch_real: int        # DM real images per class
    chunk: int             # generator chunk of the released scheme and of ours
    micro_batch: int       # ours: student micro-batch
    decoder_chunk: int     # ours with stored steps: images per decoder call
    attention_batch: int   # part 3: latents per denoiser call
    timed: int             # at most this many timed iterations per plan
    deadline_s: float
    tests_timeout_s: float
    planner_workers: int   # worker processes computing predictions during a run
    threads: int = 0       # torch intra-op threads in this process (0: torch's default)
    plan_search: tuple = ()


GPU = Scale("gpu", "cin256-v2", 256, 10, 20, 10, 3.0, 256, 10, 10, 5, 10, timed=3, deadline_s=450,
            tests_timeout_s=150, planner_workers=4)
# Two classes of one image: every plan still splits the chain (chunk 2 of 2 images, decoder pieces
# of 1, student micro-batches of 1), and a planner walk of it takes seconds, not minutes. One
# intra-op thread: these tensors are tiny, and on a shared machine OpenMP threads that wait for
# each other slow such iterations down by orders of magnitude.
CPU_SMOKE = Scale("cpu-smoke", "tiny", 16, 1, 2, 2, 3.0, 4, 2, 1, 1, 2, timed=2, deadline_s=900,
                  tests_timeout_s=300, planner_workers=1, threads=1,
                  plan_search=(("chunks", (2,)), ("store_steps", (0, 2)), ("sac", (None,))))


def plan_specs(scale: Scale, sac_level: float | None):
    """The plans part 2 runs, name -> `Walk` (a run's settings at a size), and the walk the planner
    chooses knobs for (as `--chunk auto` with student micro-batches of `scale.micro_batch`).

    Each is a `DistillConfig` the planner walks and `build_walked` assembles for real: the same
    function as the run (`ld3m_fast.distill.assemble.assemble_iteration`). The released scheme is
    `ld3m_fast.distill.planner.plan.released_reference`'s: chunk 10, full-batch student, fp32, the
    UNet's transformer blocks checkpointed inside as released.
    """
    from ld3m_fast.distill.config import DistillConfig
    from ld3m_fast.distill.planner.plan import planning_config
    from ld3m_fast.distill.planner.simulate import Walk

    config = planning_config(DistillConfig(prior=scale.prior, res=scale.res, ipc=scale.ipc, steps=scale.steps,
                                           guidance=scale.guidance, algorithm="dm", batch_real=scale.batch_real,
                                           dtype="fp32"))
    base = Walk.of(config, scale.num_classes)
    ours = base.at(grad_mode="recompute", chunk=scale.chunk, micro_batch=scale.micro_batch)
    specs = {
        RELEASED: base.at(grad_mode="released", chunk=scale.chunk, micro_batch=None, checkpoint_attention="on"),
        "ours: recompute": ours,
        "ours: stored steps + decoder pieces": ours.at(decoder_chunk=scale.decoder_chunk,
                                                       store_steps=scale.steps // 2, sac_min_flops=sac_level),
    }
    return specs, ours


def build_iteration(walk, prior, device: torch.device, seed: int = 0):
    """One iteration of `walk` with real tensors on `device` (`build_walked`: what the planner walks
    under fake tensors, with random latents, class embeddings and real images)."""
    from ld3m_fast.distill.planner.simulate import build_walked

    if walk.config.algorithm != "dm":
        raise ValueError(f"the check runs DM iterations, not {walk.config.algorithm!r}")
    return build_walked(walk, prior=prior, device=device, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- plumbing


class Deadline:
    """Seconds left of a budget counted from `start` (time.monotonic())."""

    def __init__(self, seconds: float, start: float):
        self.seconds, self.start = float(seconds), start

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - started


def _error(error: BaseException) -> str:
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    return f"{type(error).__name__}: {error}\n" + "".join(lines)[-3000:]


def _gib(n) -> float | None:
    return None if n is None else n / 2**30


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _version(name: str) -> str:
    try:
        return __import__(name).__version__
    except ImportError:
        return "not installed"
    except Exception as error:  # a broken optional install (xformers without CUDA)
        return f"unusable ({type(error).__name__})"


def environment(device: torch.device) -> dict:
    """Device, versions, TF32 settings and which backend each op runs on this device."""
    from ld3m_fast._host import cpu_model
    from ld3m_fast.cli.info import collect
    from ld3m_fast.distill.planner.memory import device_free_memory
    from ld3m_fast.ops import _backend

    info = collect()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU: {cpu_model()}, {os.cpu_count()} cores"
    meta = {"device": name, "device_type": device.type, "memory_bytes": device_free_memory(device)[0],
            "cpu": cpu_model(), "python": platform.python_version(), "torch": torch.__version__,
            "triton": _version("triton"), "diffusers": _version("diffusers"),
            "xformers": _version("xformers"), "versions": info["versions"], "ops": info["ops"],
            "environment": info["environment"],
            "backend_here": {op: _backend.choose(op, device.type, torch.float32)
                             for op in ("ld3m_step", "trajectory_matching_distance")}}
    if device.type == "cuda":
        meta.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    tf32={"cudnn_conv": torch.backends.cudnn.allow_tf32,
                          "matmul": torch.backends.cuda.matmul.allow_tf32})
    return meta


class Report:
    """The JSON report and its markdown, rewritten (atomically) after every step."""

    def __init__(self, out: Path, data: dict, start: float):
        self.out, self.data, self.start = out, data, start

    def part(self, name: str) -> dict:
        return self.data["parts"].setdefault(name, {"status": "pending"})

    def save(self) -> None:
        from ld3m_fast._files import write_json_atomic, write_text_atomic

        self.data["elapsed_s"] = round(time.monotonic() - self.start, 1)
        write_json_atomic(self.out / f"{REPORT}.json", self.data)
        write_text_atomic(self.out / f"{REPORT}.md", markdown(self.data))


def log(text: str) -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------- planner predictions


def source_fingerprint() -> str:
    """Hash of the library's Python sources and the diffusers version: predictions made from
    other sources are not reused."""
    import ld3m_fast

    digest = hashlib.sha256(_version("diffusers").encode())
    package = Path(ld3m_fast.__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _estimate_row(estimate, seconds: float | None, source: str) -> dict:
    return {"peak_bytes": int(estimate.peak_bytes), "flops": int(estimate.flops),
            "phase_peaks": {k: int(v) for k, v in estimate.phase_peaks.items()},
            "method": estimate.method, "walk": estimate.walk.describe(), "seconds": seconds, "source": source}


class _Inline:
    """A job computed in this process when first asked for (no worker processes)."""

    def __init__(self, fn, args, kwargs):
        self.call = (fn, args, kwargs)
        self.value = None

    def get(self, timeout=None):
        if self.call is not None:
            fn, args, kwargs = self.call
            self.call, self.value = None, fn(*args, **kwargs)
        return self.value


def _timed_job(fn, *args, **kwargs):
    started = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - started


class Predictions:
    """Planner predictions for part 2: from a --predict-only file made from the same sources,
    or computed in spawned worker processes (fake tensors, CPU) while the device measures."""

    def __init__(self, specs: dict, request, budget: int, search: dict, *, workers: int = 0,
                 cached: dict | None = None, cached_from: str = ""):
        self.rows, self.jobs, self.pool = {}, {}, None
        self.choice_row, self.choice_job = None, None
        self.budget, self.note = budget, ""
        if cached is not None:
            for name, spec in specs.items():
                row = cached["predictions"].get(name)
                if row is not None and row.get("walk") == spec.describe():
                    self.rows[name] = dict(row, source=f"precomputed on CPU ({cached_from})")
            if cached.get("choice") is not None:
                self.choice_row = dict(cached["choice"], source=f"precomputed on CPU ({cached_from})")
            elif "choice" in cached:
                self.choice_row = {"none_fits": True, "source": cached_from}
            self.budget = int(cached["budget_bytes"])
        missing = {name: spec for name, spec in specs.items() if name not in self.rows}
        need_choice = self.choice_row is None
        if not missing and not need_choice:
            return
        if workers > 0:
            try:
                import multiprocessing

                self.pool = multiprocessing.get_context("spawn").Pool(workers)
            except Exception as error:  # no processes here: compute in this process when asked
                self.note = f"worker processes unavailable ({error}); predictions computed inline"
        from ld3m_fast.distill.planner.plan import plan
        from ld3m_fast.distill.planner.simulate import estimate

        submit = (lambda fn, *a, **k: self.pool.apply_async(_timed_job, (fn,) + a, k)) if self.pool \
            else (lambda fn, *a, **k: _Inline(_timed_job, (fn,) + a, k))
        if need_choice:  # the longest job first
            self.choice_job = submit(plan, request.at(chunk=None), self.budget, **search)
        for name, spec in missing.items():
            self.jobs[name] = submit(estimate, spec)

    def estimate(self, name: str, timeout: float) -> dict:
        """The prediction row of a fixed plan; raises multiprocessing.TimeoutError when late."""
        if name not in self.rows:
            estimate, seconds = self.jobs[name].get(timeout=max(timeout, 0.0))
            self.rows[name] = _estimate_row(estimate, round(seconds, 1), "computed during this run "
                                            "(worker process)" if self.pool else "computed during this run")
        return self.rows[name]

    def choice(self, timeout: float) -> dict:
        """The planner's choice as a prediction row (`none_fits` when nothing fits the budget)."""
        if self.choice_row is None:
            (candidates, best), seconds = self.choice_job.get(timeout=max(timeout, 0.0))
            source = "computed during this run" + (" (worker process)" if self.pool else "")
            self.choice_row = ({"none_fits": True, "source": source} if best is None else
                               _estimate_row(best.estimate, round(seconds, 1), source))
            self.choice_row["candidates"] = len(candidates)
        return self.choice_row

    def file_data(self, scale: "Scale") -> dict | None:
        """What --predictions reads, when every prediction is in (else None)."""
        from ld3m_fast._host import cpu_model

        if self.choice_row is None or set(self.jobs) - set(self.rows):
            return None
        choice = None if self.choice_row.get("none_fits") else self.choice_row
        return {"fingerprint": source_fingerprint(), "scale": scale.name, "budget_bytes": self.budget,
                "made_on": f"CPU: {cpu_model()}", "torch": torch.__version__, "diffusers": _version("diffusers"),
                "made_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "predictions": self.rows, "choice": choice, "candidates": self.choice_row.get("candidates")}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


def sac_level(request) -> float | None:
    """The highest selective-checkpointing threshold the planner offers (keeps the costliest ops)."""
    from ld3m_fast.distill.planner.plan import sac_levels

    levels = sac_levels(request)
    return levels[0] if levels else None


def predict_only(scale: Scale, budget: int, out: Path, workers: int) -> int:
    """--predict-only: every plan's prediction and the planner's choice, written to a file."""
    from ld3m_fast._files import write_json_atomic

    specs, request = plan_specs(scale, sac_level(plan_specs(scale, None)[1]))
    predictions = Predictions(specs, request, budget, search_of(scale), workers=workers)
    try:
        for name in specs:
            row = predictions.estimate(name, timeout=24 * 3600)
            log(f"predicted {name}: peak {_size(row['peak_bytes'])} ({row['seconds']} s)")
        choice = predictions.choice(timeout=24 * 3600)
    finally:
        predictions.close()
    write_json_atomic(out / PREDICTIONS, predictions.file_data(scale))
    log(f"planner's choice for {_gib(budget):.1f} GiB ({choice.get('candidates')} candidates walked): "
        + ("nothing fits" if choice.get("none_fits") else
           f"{json.dumps(_knobs(choice['walk']))}, peak {_size(choice['peak_bytes'])} ({choice['seconds']} s)"))
    log(f"wrote {out / PREDICTIONS}")
    return 0


def load_predictions(path: Path | None, scale: Scale, device_bytes: int) -> tuple[dict | None, str]:
    """The --predictions file when it fits this run, else (None, why not)."""
    if path is None:
        return None, "no --predictions file: computed during this run"
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        return None, f"--predictions {path} unreadable ({error}): computed during this run"
    if data.get("scale") != scale.name:
        return None, f"--predictions {path} is for {data.get('scale')!r}, not {scale.name!r}"
    if data.get("fingerprint") != source_fingerprint():
        return None, f"--predictions {path} was made from other sources: computed during this run"
    if int(data.get("budget_bytes", 0)) > device_bytes:
        return None, (f"--predictions {path} planned for {_gib(data['budget_bytes']):.1f} GiB, more than this "
                      f"device's {_gib(device_bytes):.1f} GiB: computed during this run")
    return data, f"{path} (made {data.get('made_at')} on {data.get('made_on')}, torch {data.get('torch')})"


# --------------------------------------------------------------------------- part 1: tests


def gpu_test_files(root: Path = ROOT) -> list[Path]:
    """Test files holding gpu-marked tests (a decorator, or a module-wide `pytestmark`)."""
    return [p for p in sorted((root / "tests").glob("test_*.py")) if GPU_MARK.search(p.read_text())]


def _junit_counts(path: Path) -> dict:
    """Outcome counts, failures and skip reasons from pytest's JUnit XML."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, skip_reasons = [], {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "errors"
                failures.append({"test": name, "message": (child.get("message") or "")[:400]})
            elif child.tag == "skipped":
                outcome = "skipped"
                reason = (child.get("message") or "").strip()
                skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
        counts[outcome] += 1
    return {**counts, "failures": failures, "skip_reasons": skip_reasons}


def tests_part(ctx: dict, part: dict) -> None:
    device, out, deadline = ctx["device"], ctx["out"], ctx["deadline"]
    files = gpu_test_files()
    junit, log_path = out / "gpu_tier_junit.xml", out / "gpu_tier_pytest.log"
    junit.unlink(missing_ok=True)
    relative = [p.relative_to(ROOT).as_posix() for p in files]
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
               f"--junitxml={junit}", *relative]
    if device.type == "cuda" and importlib.util.find_spec("xdist") is not None:
        command[3:3] = ["-n", "4"]  # Triton compiles each kernel variant once: four at a time
    env = dict(os.environ, TRITON_INTERPRET="0", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop("LD3M_FAST_BACKEND", None)
    timeout = max(1.0, min(ctx["scale"].tests_timeout_s, deadline.left() - 5))
    part.update(command="TRITON_INTERPRET=0 python " + " ".join(command[1:]).replace(str(junit), junit.name),
                files=relative, timeout_s=round(timeout))
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        output = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                         for x in (expired.stdout, expired.stderr))
        rc = None
    part["seconds"] = round(time.perf_counter() - started, 1)
    log_path.write_text(output)
    summary = [line for line in output.splitlines() if re.search(r"\b(passed|failed|skipped|deselected|"
                                                                 r"error|no tests ran)\b.* in [\d.]+s", line)]
    part["summary"] = summary[-1].strip("= ") if summary else None
    deselected = re.search(r"(\d+) deselected", part["summary"] or "")
    part["deselected"] = int(deselected.group(1)) if deselected else 0
    part["output_tail"] = output[-2500:]
    part["returncode"] = rc
    if rc is None:
        raise RuntimeError(f"pytest did not finish within {timeout:.0f} s (output in {log_path.name})")
    if not junit.is_file():
        raise RuntimeError(f"pytest wrote no report (exit status {rc}); see {log_path.name}")
    part.update(_junit_counts(junit))
    part["selected"] = part["passed"] + part["failed"] + part["errors"] + part["skipped"]
    if device.type == "cuda":
        part["check"] = "Triton kernels (compiled, TRITON_INTERPRET=0) against the PyTorch reference on this GPU"
        if rc != 0 or part["failed"] or part["errors"] or not part["passed"]:
            raise RuntimeError(f"gpu tier: {part['summary']} (exit status {rc})")
    else:
        part["check"] = ("no CUDA here: the selection only (`-m gpu` selects the gpu-marked tests and "
                         "every one of them skips cleanly)")
        clean = {reason for reason in part["skip_reasons"] if "CUDA" in reason}
        if rc != 0 or not part["selected"] or part["skipped"] != part["selected"] or \
                set(part["skip_reasons"]) != clean or not part["deselected"]:
            raise RuntimeError(f"selection check failed: {part['summary']} (exit status {rc}, skip reasons "
                               f"{part['skip_reasons']})")


# --------------------------------------------------------------------------- part 2: iterations


def _knobs(spec: dict) -> dict:
    return {k: spec[k] for k in ("grad_mode", "chunk", "decoder_chunk", "store_steps", "sac_min_flops",
                                 "micro_batch", "dtype", "checkpoint_attention")}


def _mode(walk) -> str:
    from ld3m_fast.distill.planner.plan import mode_name

    return mode_name(walk)


def search_of(scale: Scale) -> dict:
    """The planner's search for the choice: `--chunk auto` with the scale's student micro-batch,
    narrowed by `scale.plan_search`."""
    return {"micro_batches": [scale.micro_batch], **dict(scale.plan_search)}


def run_plan(walk, prior, device: torch.device, timed: int, share: float, deadline: Deadline,
             row: dict) -> None:
    """Warm-up, then up to `timed` timed iterations within `share` seconds; fills `row`."""
    from ld3m_fast.distill.planner.measure import measure

    built = build_iteration(walk, prior, device)
    resident = built.resident
    once = built.run

    plan_started = time.monotonic()
    if device.type == "cuda":
        row["measured_method"] = ("torch.cuda.max_memory_allocated over the warm-up and timed iterations "
                                  "(reset after building; weights and resident tensors included)")
        _sync(device)
        row["allocated_before_bytes"] = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        warmup = _timed(once, device)
    else:
        row["measured_method"] = ("ld3m_fast.distill.planner.measure live-storage tracker over the real warm-up "
                                  "iteration (weights and resident tensors included)")
        holder = {}

        def traced():
            holder["seconds"] = _timed(once, device)

        measured = measure(traced, existing=tuple(resident))
        warmup = holder["seconds"]
        row["measured_peak_bytes"] = int(measured.peak_bytes)
    row["warmup_s"] = round(warmup, 4)
    times = []
    while len(times) < timed:
        last = times[-1] if times else warmup
        spent = time.monotonic() - plan_started
        if deadline.left() < 1.2 * last + 2 or (times and spent + 1.2 * last > share):
            break
        times.append(_timed(once, device))
    if device.type == "cuda":
        row["measured_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
    row["timed_s"] = [round(t, 4) for t in times]
    row["seconds_per_iteration"] = round(statistics.median(times), 4) if times else None
    if len(times) < timed:
        row["note"] = (f"{len(times)} of {timed} timed iterations fitted the time left"
                       + ("" if times else "; only the warm-up ran"))
    row["attention"] = _processors(prior)
    del built, resident


def _processors(prior) -> str:
    model = prior.denoiser.model
    names = sorted({type(p).__name__ for p in getattr(model, "attn_processors", {}).values()})
    return ", ".join(names) or "n/a"


def iteration_part(ctx: dict, part: dict, report: Report) -> None:
    scale, device, deadline = ctx["scale"], ctx["device"], ctx["deadline"]
    predictions: Predictions = ctx["predictions"]()
    specs = ctx["specs"]
    prior = ctx["prior"]()
    part.update(setting=(f"{scale.prior} (random weights) at {scale.res}², IPC {scale.ipc}, T={scale.steps}, "
                         f"DM, {scale.num_classes} classes, guidance {scale.guidance:g}, batch_real "
                         f"{scale.batch_real}"),
                ran_on=ctx["where"], predicted_by="ld3m_fast.distill.planner.simulate.estimate (fake tensors, CPU)",
                predictions_source=ctx["predictions_source"], budget_bytes=predictions.budget)
    if predictions.note:
        part["note"] = predictions.note
    rows = part.setdefault("plans", [])
    names = list(specs) + [CHOICE]
    typical = None  # seconds per iteration of the plans so far (the released one is the costliest)
    for index, name in enumerate(names):
        row = {"name": name, "status": "pending"}
        rows.append(row)
        try:
            if name == CHOICE:
                wait = deadline.left() - 2 * (typical or 0) - 5
                choice = predictions.choice(timeout=wait)
                if choice.get("none_fits"):
                    row.update(status="skipped", note=f"the planner found no plan within "
                                                      f"{_gib(predictions.budget):.1f} GiB")
                    continue
                from ld3m_fast.distill.planner.simulate import Walk

                spec = Walk.from_description(choice["walk"])
                row["prediction"] = choice
            else:
                spec = specs[name]
            row.update(walk=spec.describe(), mode=_mode(spec))
            if typical is not None and deadline.left() < 2 * typical + 5:
                row.update(status="skipped", note=f"deadline: {deadline.left():.0f} s left, a warm-up and one "
                                                  f"timed iteration need about {2 * typical:.0f} s")
                continue
            share = deadline.left() / (len(names) - index)
            config = spec.config
            log(f"[{ctx['where']}] iteration {name}: {row['mode']}, chunk {config.chunk}, decoder chunk "
                f"{config.decoder_chunk or config.chunk}, student micro-batch {config.micro_batch or 'all'} ...")
            run_plan(spec, prior, device, ctx["timed"], share, deadline, row)
            row["status"] = "ok"
            typical = max(typical or 0.0, row["seconds_per_iteration"] or row["warmup_s"])
            log(f"[{ctx['where']}]   {row['seconds_per_iteration']} s/iteration (median of "
                f"{len(row['timed_s'])}), measured peak {_size(row['measured_peak_bytes'])}")
        except Exception as error:  # noqa: BLE001 - one plan's failure is recorded, the next plan runs
            row.update(status="skipped" if _is_timeout(error) else "failed",
                       error=None if _is_timeout(error) else _error(error))
            if _is_timeout(error):
                row["note"] = "deadline: the planner had not chosen in time (precompute with --predict-only)"
            if device.type == "cuda":
                row["peak_at_failure_bytes"] = int(torch.cuda.max_memory_allocated(device))
            first = (str(error).splitlines() or [type(error).__name__])[0]
            log(f"[{ctx['where']}]   {name}: {row['status']} ({first[:200]})")
        finally:
            _free(device)
            report.save()
    # Predictions: computed in the background meanwhile; wait for them up to the deadline.
    for row in rows:
        if row["name"] == CHOICE or "prediction" in row:
            continue
        try:
            row["prediction"] = predictions.estimate(row["name"], timeout=deadline.left() - 3)
        except Exception as error:  # noqa: BLE001
            row["prediction"] = {"error": "not finished by the deadline" if _is_timeout(error) else _error(error)}
    released = next((r for r in rows if r["name"] == RELEASED and r["status"] == "ok"), None)
    for row in rows:
        predicted = (row.get("prediction") or {}).get("peak_bytes")
        if predicted and row.get("measured_peak_bytes"):
            row["measured_over_predicted"] = round(row["measured_peak_bytes"] / predicted, 3)
        if released and row["status"] == "ok":
            if row.get("seconds_per_iteration") and released.get("seconds_per_iteration"):
                row["time_vs_released"] = round(row["seconds_per_iteration"] / released["seconds_per_iteration"], 3)
            row["peak_vs_released"] = round(row["measured_peak_bytes"] / released["measured_peak_bytes"], 3)
    failed = [r["name"] for r in rows if r["status"] == "failed"]
    if failed:
        raise RuntimeError(f"plans failed: {', '.join(failed)}")


def _is_timeout(error: BaseException) -> bool:
    import multiprocessing

    return isinstance(error, (multiprocessing.TimeoutError, TimeoutError))


# --------------------------------------------------------------------------- part 3: attention


def attention_part(ctx: dict, part: dict) -> None:
    from ld3m_fast.distill.setup import use_memory_efficient_attention
    from ld3m_fast.generator import render_size

    scale, device = ctx["scale"], ctx["device"]
    prior = ctx["prior"]()
    draw = torch.Generator().manual_seed(5)
    batch = scale.attention_batch
    z = torch.randn(batch, *prior.latent_shape(render_size(prior, scale.res)), generator=draw).to(device)
    cond = torch.randn(batch, prior.embedding_dim, generator=draw).to(device)
    t = torch.full((batch,), 501, dtype=torch.long, device=device)

    def forward_backward():
        x = z.detach().requires_grad_()
        eps = prior.eps(x, t, cond)
        torch.autograd.grad(eps, x, torch.ones_like(eps))

    def side(name: str) -> dict:
        row = {"side": name, "processors": _processors(prior)}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        row["warmup_s"] = round(_timed(forward_backward, device), 4)
        times = [_timed(forward_backward, device) for _ in range(3)]
        row["timed_s"] = [round(x, 4) for x in times]
        row["seconds"] = round(statistics.median(times), 4)
        if device.type == "cuda":
            row["peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
        return row

    part.update(ran_on=ctx["where"], setting=(f"{scale.prior} denoiser, {batch} latents of "
                                              f"{tuple(z.shape[1:])}, one forward + backward (grad to z)"))
    sides = part.setdefault("sides", [])
    sides.append(side("sdpa"))
    if device.type != "cuda":
        part["xformers"] = "not run: xformers runs on CUDA only"
    elif _version("xformers") == "not installed":
        part["xformers"] = "not run: xformers is not installed here"
    else:
        saved = {model: dict(model.attn_processors) for model in (prior.denoiser.model, prior.autoencoder.model)
                 if hasattr(model, "attn_processors")}
        try:
            chosen = use_memory_efficient_attention(prior, device)
            if chosen != "xformers":
                part["xformers"] = f"not run: use_memory_efficient_attention chose {chosen!r}"
            else:
                sides.append(side("xformers"))
                part["xformers"] = "ran"
                part["xformers_over_sdpa"] = round(sides[-1]["seconds"] / sides[0]["seconds"], 3)
        finally:
            for model, processors in saved.items():  # part 2 runs on the default (SDPA) again
                model.set_attn_processor(processors)
    log(f"[{ctx['where']}] attention: " + "; ".join(f"{s['side']} {s['seconds']} s ({s['processors']})"
                                                    for s in sides) + f"; xformers {part['xformers']}")


# --------------------------------------------------------------------------- markdown


def _size(n) -> str:
    if n is None:
        return "–"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _fmt(value, digits=2, unit="") -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}{unit}"


def markdown(data: dict) -> str:
    meta = data.get("meta", {})
    lines = [f"# ld3m-fast GPU check — {data['mode']}", "",
             f"- device: **{meta.get('device', '?')}** ({meta.get('device_type', '?')}, "
             f"{_fmt(_gib(meta.get('memory_bytes')), 1)} GiB)",
             f"- versions: torch {meta.get('torch')}, triton {meta.get('triton')}, diffusers "
             f"{meta.get('diffusers')}, xformers {meta.get('xformers')}, python {meta.get('python')}"
             + (f", CUDA {meta['cuda']}, cuDNN {meta['cudnn']}" if meta.get("cuda") else ""),
             f"- ops on this device: {', '.join(f'{k}={v}' for k, v in meta.get('backend_here', {}).items())}"
             + (f"; TF32 conv {meta['tf32']['cudnn_conv']}, matmul {meta['tf32']['matmul']}"
                if meta.get("tf32") else ""),
             f"- run: {data.get('started')}, {data.get('elapsed_s')} s of a {data.get('deadline_s')} s deadline; "
             f"parts asked for: {', '.join(data.get('parts_requested', []))}", ""]
    parts = data.get("parts", {})
    for name in PARTS:
        if name not in parts:
            continue
        part = parts[name]
        lines += [f"## {TITLES[name]} — {part['status']}", ""]
        if part.get("ran_on"):
            lines.append(f"Ran on: {part['ran_on']}.")
        if part.get("note"):
            lines.append(f"Note: {part['note']}")
        if name == "tests" and "command" in part:
            lines += [f"`{part['command']}` ({part.get('seconds')} s): {part.get('summary')}", "",
                      f"Checked: {part.get('check', '?')}."]
            for failure in part.get("failures", [])[:20]:
                first = (failure["message"].splitlines() or [""])[0]
                lines.append(f"- FAILED {failure['test']}: {first}")
        if name == "iteration" and "plans" in part:
            lines += [f"Setting: {part.get('setting')}. Predicted peak: {part.get('predicted_by')}, "
                      f"source: {part.get('predictions_source')}. Measured peak: "
                      + "; ".join(sorted({r['measured_method'] for r in part['plans'] if r.get('measured_method')}))
                      + ".", "",
                      "| plan | mode | chunk | decoder chunk | student micro-batch | dtype | predicted peak | "
                      "measured peak | measured / predicted | s / iteration (median of n) | time vs released | "
                      "peak vs released | status |",
                      "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
            for row in part["plans"]:
                spec = row.get("walk") or {}
                prediction = row.get("prediction") or {}
                seconds = row.get("seconds_per_iteration")
                timing = (f"{seconds:.3f} ({len(row.get('timed_s', []))})" if seconds is not None else
                          (f"warm-up {row['warmup_s']:.3f}" if row.get("warmup_s") else "–"))
                status = row["status"] + (f": {row['note']}" if row.get("note") else "") \
                    + (f": {row['error'].splitlines()[0][:160]}" if row.get("error") else "")
                lines.append(
                    f"| {row['name']} | {row.get('mode', '–')} | {spec.get('chunk', '–')} | "
                    f"{spec.get('decoder_chunk') or spec.get('chunk', '–')} | {spec.get('micro_batch') or 'all'} | "
                    f"{spec.get('dtype', '–')} | {_size(prediction.get('peak_bytes'))} | "
                    f"{_size(row.get('measured_peak_bytes'))} | {_fmt(row.get('measured_over_predicted'), 3)} | "
                    f"{timing} | {_fmt(row.get('time_vs_released'), 3, '×')} | "
                    f"{_fmt(row.get('peak_vs_released'), 3, '×')} | {status} |")
            methods = [(r["name"], (r.get("prediction") or {}).get("method")) for r in part["plans"]]
            lines += ["", "How each prediction was made:"] + [f"- {name}: {method}" for name, method in methods
                                                               if method]
        if name == "attention" and "sides" in part:
            lines += [f"Setting: {part.get('setting')}.", "",
                      "| side | attention processors | s per forward + backward (median of 3) | peak |",
                      "|---|---|---:|---:|"]
            for side in part["sides"]:
                lines.append(f"| {side['side']} | {side['processors']} | {side['seconds']:.4f} | "
                             f"{_size(side.get('peak_bytes'))} |")
            lines += ["", f"xformers: {part.get('xformers')}"
                      + (f"; xformers / SDPA time {part['xformers_over_sdpa']:.3f}×" if part.get("xformers_over_sdpa")
                         else "")]
        if part.get("error"):
            lines += ["", "```", part["error"].strip()[-1500:], "```"]
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for the report files")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="the same code at tiny size on CPU (tiny prior, res 16, IPC 1, T=2)")
    parser.add_argument("--predict-only", action="store_true",
                        help="only the planner's predictions (CPU, no device): writes " + PREDICTIONS)
    parser.add_argument("--predictions", type=Path, help=f"a {PREDICTIONS} made by --predict-only")
    parser.add_argument("--budget", help="device memory for the planner's choice, e.g. 139GiB "
                                         "(default: the device's free memory at start)")
    parser.add_argument("--reserve", help="memory left out of the budget (default: the planner's, "
                                          "1 GiB + 5%%; ld3m_fast/distill/planner/memory.py)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--deadline", type=float, help="seconds for the whole check, from start "
                                                       f"(default {GPU.deadline_s:g} on GPU)")
    parser.add_argument("--timed", type=int, help="timed iterations per plan at most (after a warm-up)")
    parser.add_argument("--planner-workers", type=int,
                        help="worker processes computing predictions (0: in this process; default "
                             f"{GPU.planner_workers} on GPU, {CPU_SMOKE.planner_workers} for --cpu-smoke)")
    return parser.parse_args(argv)


def main(argv=None, started: float | None = None) -> int:
    """Run the check; `started` (time.monotonic()) is when the deadline began (default: now)."""
    started = time.monotonic() if started is None else started
    args = _parse(argv)
    scale = CPU_SMOKE if args.cpu_smoke else GPU
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    from ld3m_fast.distill.planner.memory import memory_budget

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    workers = scale.planner_workers if args.planner_workers is None else args.planner_workers
    if args.predict_only:
        if args.budget is None and scale is GPU:
            raise SystemExit("--predict-only needs --budget (the card's memory, e.g. 139GiB)")
        return predict_only(scale, memory_budget(args.budget, args.reserve, "cpu").usable, out, workers)

    if scale is GPU:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --cpu-smoke on a machine without a GPU")
        device = torch.device("cuda")
        if os.environ.get("TRITON_INTERPRET") == "1":  # compiled kernels, not the interpreter
            os.environ["TRITON_INTERPRET"] = "0"
    else:
        device = torch.device("cpu")
    if scale.threads:
        torch.set_num_threads(scale.threads)
    deadline = Deadline(args.deadline if args.deadline is not None else scale.deadline_s, started)
    meta = environment(device)
    where = meta["device"]
    report = Report(out, {"kit": "ld3m-fast benchmarks/gpu_check.py", "mode": scale.name,
                          "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          "deadline_s": deadline.seconds, "parts_requested": parts, "meta": meta,
                          "scale": asdict(scale), "parts": {}}, started)
    for name in parts:
        report.part(name)
    report.save()
    log(f"gpu check ({scale.name}) on {where}: torch {meta['torch']}, triton {meta['triton']}, "
        f"diffusers {meta['diffusers']}, xformers {meta['xformers']}; deadline {deadline.seconds:g} s")

    usable = memory_budget(args.budget, args.reserve, device)
    device_bytes = meta["memory_bytes"]
    budget = usable.usable
    report.data["memory_budget"] = {"budget_bytes": usable.budget, "reserve_bytes": usable.reserve,
                                    "usable_bytes": usable.usable, "source": usable.source}
    cache: dict = {}

    def prior():
        if "prior" not in cache:
            from ld3m_fast.distill.planner.priors import build_planning_prior

            started = time.perf_counter()
            cache["prior"] = build_planning_prior(scale.prior).to(device)  # real random weights
            report.data["prior_build_s"] = round(time.perf_counter() - started, 1)
        return cache["prior"]

    def predictions():
        if "predictions" not in cache:
            cached, source = load_predictions(args.predictions, scale, device_bytes)
            ctx["predictions_source"] = source
            cache["predictions"] = Predictions(ctx["specs"], ctx["request"], budget, search_of(scale),
                                               workers=workers, cached=cached,
                                               cached_from=str(args.predictions))
        return cache["predictions"]

    ctx = dict(scale=scale, device=device, out=out, deadline=deadline, where=where, prior=prior,
               predictions=predictions, predictions_source="", timed=args.timed or scale.timed)
    failed = False
    try:
        if "iteration" in parts:  # the planner starts first, in the background, while part 1 runs
            try:
                ctx["specs"], ctx["request"] = plan_specs(scale, sac_level(plan_specs(scale, None)[1]))
                predictions()
            except Exception as error:  # noqa: BLE001 - recorded as the iteration part's failure
                ctx["setup_error"] = error
        for name in [p for p in RUN_ORDER if p in parts]:
            part = report.part(name)
            if deadline.left() <= 0:
                part.update(status="skipped", note=f"deadline of {deadline.seconds:g} s reached before this part")
                report.save()
                continue
            started = time.perf_counter()
            part["status"] = "running"
            report.save()
            try:
                if name == "tests":
                    tests_part(ctx, part)
                elif name == "iteration":
                    if "setup_error" in ctx:
                        raise ctx["setup_error"]
                    iteration_part(ctx, part, report)
                else:
                    attention_part(ctx, part)
                part["status"] = "ok"
            except Exception as error:  # noqa: BLE001 - a failing part is recorded, the others run
                failed = True
                part.update(status="failed", error=_error(error))
                log(f"[{where}] part {name} failed: {(str(error).splitlines() or [type(error).__name__])[0][:300]}")
            part["part_seconds"] = round(time.perf_counter() - started, 1)
            report.save()
    finally:
        if "predictions" in cache:
            cache["predictions"].close()
            data = cache["predictions"].file_data(scale)
            if data is not None:  # what this run predicted, reusable with --predictions
                from ld3m_fast._files import write_json_atomic

                write_json_atomic(out / PREDICTIONS, data)
        report.save()
    log(markdown(report.data))
    log(f"wrote {out / (REPORT + '.json')} and {out / (REPORT + '.md')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(started=STARTED))  # the deadline counts the imports too
