"""Distributed runs (docs/distributed.md): gloo processes on the CPU against one process.

Exactness per algorithm (1 vs 2 processes, and MTT on 10 classes over 3), resume on another
number of processes (2 -> 1, 1 -> 2), a killed rank (plain ranks and under torchrun), a frozen
rank (the heartbeat), a killed rank during eval, Ctrl-C on torchrun, eval over ranks, the
planner's one-rank estimate.

What is exact and why:
- DM and DC with generator chunks and student micro-batches of one class (`--chunk IPC
  --micro-batch IPC`): every tensor operation sees the same inputs in the same shapes and
  layouts on any world size (per-class streams, per-class pieces, augmented batches in one
  layout, gradient rows summed with exact zeros, the logged loss summed per class), so the
  final set and the logged losses are bit-identical (asserted over EXACT_ITERATIONS = 50).
- MTT (truncated) in the same setting: every student step's gradient is the processes'
  micro-batch parts added in rank order (a chain), the order one process adds them in:
  bit-identical (10 classes, 3 processes).
- DM and DC with the defaults: each process renders its own classes in one batch, and matrix
  products pick their kernels by batch size: equal to rounding, within 1e-5 relative over 3
  iterations.
- MTT with `--batch-syn` (truncated and full): the micro-batches straddle processes, so the
  parts add in another order: within 1e-5 relative over 3 iterations here.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ld3m_fast import distributed
from ld3m_fast.distill.config import DistillConfig
from ld3m_fast.distill.run import CHECKPOINT

from _workspace import RES, checkpoint_iteration, make_workspace

IPC = 2
ITERATIONS = 3
EXACT_ITERATIONS = 50  # the exact cases run long enough for rounding differences to show, had they any
# name -> (settings, exact?)
CASES = {
    "dm-aligned": (dict(algorithm="dm", chunk=IPC, micro_batch=IPC, iterations=EXACT_ITERATIONS), True),
    "dc-aligned": (dict(algorithm="dc", chunk=IPC, micro_batch=IPC, iterations=EXACT_ITERATIONS), True),
    "dm": (dict(algorithm="dm"), False),
    "dc": (dict(algorithm="dc"), False),
    "mtt-truncated": (dict(algorithm="mtt", mtt_gradient="truncated", batch_syn=3), False),
    "mtt-full": (dict(algorithm="mtt", mtt_gradient="full", batch_syn=3), False),
}
RESUME_AT, RESUME_TO = 2, 4
TOLERANCE = 1e-5
HANG_GUARD_SECONDS = 600  # a guard against a hang, not a timing assertion
KILL_STOP_SECONDS = 60  # a killed rank: the others stop within this (a generous bound on a busy machine)


def config(ws, out, **overrides):
    values = dict(data=str(ws / "data"), prior=str(ws / "prior"), ipc=IPC, steps=2, guidance=3.0, res=RES,
                  width=8, batch_real=4, iterations=ITERATIONS, progress=False, cache_dir=str(ws / "cache"),
                  max_per_class=4, out=str(out), threads=1, syn_steps=3, expert_epochs=1,
                  buffer=str(ws / "buffer"), image_every=2)
    values.update(overrides)
    return DistillConfig(**values)


def _runs(rank, world_size, init_file, ws, out):
    """One process of the 2-process part (then, on rank 0, every 1-process reference)."""
    import torch.distributed as dist

    from ld3m_fast.distill.run import resume_run, start_run

    torch.set_num_threads(1)
    aligned = {**CASES["dm-aligned"][0], "iterations": RESUME_TO}
    if rank == 0:  # one process up to RESUME_AT, resumed below by two (rank 1 waits at the init)
        start_run(config(ws, out / "resume-up", **{**aligned, "iterations": RESUME_AT}))
    with process_group(rank, world_size, init_file):
        for name, (settings, _) in CASES.items():
            start_run(config(ws, out / f"{name}-2", **settings))
        start_run(config(ws, out / "resume", **{**aligned, "iterations": RESUME_AT}))
        resume_run(out / "resume-up", {"iterations": RESUME_TO})
        start_run(config(ws, out / "uninterrupted-2", **aligned))
    if rank != 0:
        return
    assert distributed.current().world_size == 1
    for name, (settings, _) in CASES.items():
        start_run(config(ws, out / f"{name}-1", **settings))
    resume_run(out / "resume", {"iterations": RESUME_TO})
    start_run(config(ws, out / "uninterrupted", **aligned))


@contextmanager
def process_group(rank, world_size, init_file):
    """A gloo group for a spawned process, left on every path: a process that exits with a gloo
    group alive dies in the interpreter's teardown ("terminate called without an active
    exception", SIGABRT). The barrier makes every rank finish its collectives before any rank
    closes its connections."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
        distributed.shutdown()


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from ld3m_fast.data import load_dataset
    from ld3m_fast.distill.algorithms import NetworkSpec
    from ld3m_fast.distill.buffers import build_buffer

    root = make_workspace(tmp_path_factory.mktemp("distributed"))
    data = load_dataset(root / "data", split="train", res=RES, cache_dir=root / "cache")
    build_buffer(root / "buffer", NetworkSpec(num_classes=3, res=RES, width=8), data.images, data.labels,
                 num_experts=1, epochs=3, keep_epochs=3, batch_size=20, seed=0)
    return root


@pytest.fixture(scope="module")
def runs(ws, tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("runs")
    mp.spawn(_runs, args=(2, str(out / "init"), ws, out), nprocs=2, join=True)
    return out


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0.0 when equal)."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def final_state(run) -> dict:
    syn = load_file(run / "final" / "synthetic.safetensors")
    state = {"Z": syn["Z"], "c": syn["c"], "images": load_file(run / "final" / "images.safetensors")["images"]}
    checkpoint = load_file(run / CHECKPOINT)
    state.update({k: v for k, v in checkpoint.items() if k.startswith(("optimizer.", "algorithm."))})
    return state


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_give_the_one_process_result(runs, name):
    exact = CASES[name][1]
    two, one = final_state(runs / f"{name}-2"), final_state(runs / f"{name}-1")
    assert two.keys() == one.keys()
    differences = {key: relative_difference(two[key], one[key]) for key in one}
    print(f"{name}: max relative difference, 2 vs 1 process: " +
          ", ".join(f"{k} {v:.2e}" for k, v in differences.items()))
    if exact:  # same arithmetic on any world size: bit-identical, the logged loss too
        for key in one:
            assert torch.equal(two[key], one[key]), (name, key, differences[key])
        assert losses(runs / f"{name}-2") == losses(runs / f"{name}-1")
    else:  # batched convolutions over another batch, or a gradient summed in another order
        for key, value in differences.items():
            assert value <= TOLERANCE, (name, key, value)
        assert losses(runs / f"{name}-2") == pytest.approx(losses(runs / f"{name}-1"), rel=TOLERANCE)
    iterations = CASES[name][0].get("iterations", ITERATIONS)
    assert [json.loads(x)["iteration"] for x in (runs / f"{name}-2" / "metrics.jsonl").read_text().splitlines()] \
        == list(range(1, iterations + 1))
    grids = sorted({*range(2, iterations + 1, 2), iterations})  # every image_every = 2 iterations, and the last
    assert sorted(p.name for p in (runs / f"{name}-2" / "images").iterdir()) == [f"iter_{k:06d}.png" for k in grids]


UNINTERRUPTED = {1: "uninterrupted", 2: "uninterrupted-2"}  # processes -> the run of RESUME_TO iterations


@pytest.mark.parametrize("run, before, after", [("resume", 2, 1), ("resume-up", 1, 2)])
def test_a_checkpoint_resumes_on_another_number_of_processes(runs, run, before, after):
    """`before` processes to RESUME_AT, then `after` to RESUME_TO (DM, one class per chunk and
    micro-batch): every iteration is bit-identical to the uninterrupted run on its own number of
    processes, and the final state to the uninterrupted run on `after` processes."""
    first, then = runs / UNINTERRUPTED[before], runs / UNINTERRUPTED[after]
    resumed, whole = final_state(runs / run), final_state(then)
    assert resumed.keys() == whole.keys()
    for key in whole:
        assert torch.equal(resumed[key], whole[key]), (key, relative_difference(resumed[key], whole[key]))
    assert losses(runs / run)[:RESUME_AT] == losses(first)[:RESUME_AT]
    assert losses(runs / run)[RESUME_AT:] == losses(then)[RESUME_AT:]
    with safe_open(str(runs / run / CHECKPOINT), framework="pt") as f:
        assert f.metadata()["iteration"] == str(RESUME_TO) and f.metadata()["world_size"] == str(after)


MTT_CLASSES, MTT_PROCESSES, MTT_ITERATIONS = 10, 3, 10


def _mtt_runs(rank, world_size, init_file, ws, out):
    """MTT (truncated) on 10 classes, one class per chunk and micro-batch: 3 processes, then 1."""
    from ld3m_fast.distill.run import start_run

    torch.set_num_threads(1)
    settings = dict(algorithm="mtt", ipc=1, chunk=1, micro_batch=1, iterations=MTT_ITERATIONS, image_every=1000)
    with process_group(rank, world_size, init_file):
        start_run(config(ws, out / f"mtt-{world_size}", **settings))
    if rank == 0:
        start_run(config(ws, out / "mtt-1", **settings))


@pytest.fixture(scope="module")
def mtt_runs(tmp_path_factory):
    """The classes of the embedded default (10), over 3 processes (4, 3, 3 classes)."""
    import torch.multiprocessing as mp

    from ld3m_fast.data import load_dataset
    from ld3m_fast.distill.algorithms import NetworkSpec
    from ld3m_fast.distill.buffers import build_buffer

    ws = make_workspace(tmp_path_factory.mktemp("mtt10"), classes=MTT_CLASSES)
    data = load_dataset(ws / "data", split="train", res=RES, cache_dir=ws / "cache")
    build_buffer(ws / "buffer", NetworkSpec(num_classes=MTT_CLASSES, res=RES, width=8), data.images, data.labels,
                 num_experts=1, epochs=3, keep_epochs=3, batch_size=20, seed=0)
    out = tmp_path_factory.mktemp("mtt10-runs")
    mp.spawn(_mtt_runs, args=(MTT_PROCESSES, str(out / "init"), ws, out), nprocs=MTT_PROCESSES, join=True)
    return out


def test_mtt_on_three_processes_gives_the_one_process_result_bit_for_bit(mtt_runs):
    """Every student step's gradient is the processes' micro-batch parts added in rank order (a
    chain, not an all-reduce): with one class per micro-batch, the order one process adds them in."""
    many, one = final_state(mtt_runs / f"mtt-{MTT_PROCESSES}"), final_state(mtt_runs / "mtt-1")
    assert many.keys() == one.keys() and "algorithm.0" in one  # the student lr too
    for key in one:
        assert torch.equal(many[key], one[key]), (key, relative_difference(many[key], one[key]))
    assert losses(mtt_runs / f"mtt-{MTT_PROCESSES}") == losses(mtt_runs / "mtt-1")


def test_class_shares_cover_every_class_once():
    for classes in (1, 3, 10, 1000):
        for world in range(1, min(classes, 9) + 1):
            shares = [distributed.class_share(classes, r, world) for r in range(world)]
            assert [k for s in shares for k in s] == list(range(classes))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
            assert len(shares[0]) == distributed.largest_share(classes, world)
    with pytest.raises(distributed.LD3MError, match="at most 3"):
        distributed.class_share(3, 0, 4)


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distill_args(ws, out, *extra) -> list[str]:
    return ["distill", "--prior", ws / "prior", "--data", ws / "data", "--res", RES, "--ipc", IPC,
            "--steps", 2, "--guidance", 1, "--width", 8, "--batch-real", 4, "--max-per-class", 4,
            "--cache-dir", ws / "cache", "--out", out, "--threads", 1, "--no-progress", *extra]


def launch_ranks(args, world_size=2, env=None, **popen):
    """`python -m ld3m_fast ARGS` once per rank, with the environment torchrun would set."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size), **(env or {})}
    return [subprocess.Popen([sys.executable, "-m", "ld3m_fast", *map(str, args)], text=True,
                             env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, **popen)
            for r in range(world_size)]


def metric_lines(run) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def wait_for_iterations(run, count, processes):
    deadline = time.monotonic() + HANG_GUARD_SECONDS
    while metric_lines(run) < count:
        assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
        assert time.monotonic() < deadline, "no progress (hang guard)"
        time.sleep(0.2)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("ld3m-fast")]


def assert_stopped_after_a_kill(run, err, stopped_after, bound=KILL_STOP_SECONDS, what="the kill"):
    """One error line that names the intact checkpoint; that checkpoint loads; a prompt stop."""
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert "another process of the run has stopped" in lines[0] and "is intact" in lines[0], lines[0]
    assert "--resume" in lines[0]
    kept = checkpoint_iteration(run)
    assert kept >= 2 and kept % 2 == 0 and f"checkpoint of iteration {kept} " in lines[0]  # the last periodic one
    assert load_file(run / CHECKPOINT)["Z"].shape[0] == 3 * IPC  # whole
    print(f"stopped {stopped_after:.1f} s after {what}: {lines[0]}")
    # A dead peer's connections close at once (measured here: 2-3 s); the limit is for a busy machine.
    assert stopped_after < bound, stopped_after
    return lines[0]


def test_a_killed_rank_stops_the_other_with_one_line(ws, tmp_path):
    run = tmp_path / "run"
    ranks = launch_ranks(distill_args(ws, run, "--iterations", 100_000, "--save-every", 2),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_iterations(run, 3, ranks)
    ranks[1].kill()  # SIGKILL: no chance to say goodbye
    killed = time.monotonic()
    try:
        _, err = ranks[0].communicate(timeout=HANG_GUARD_SECONDS)
        stopped_after = time.monotonic() - killed
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
    assert ranks[0].returncode == 2, err
    assert "Traceback" not in err, err
    assert_stopped_after_a_kill(run, err, stopped_after)


FROZEN_TIMEOUT = 20  # LD3M_FAST_DIST_TIMEOUT of the frozen-rank tests (seconds; the default is 60)


def test_a_frozen_rank_stops_the_other_within_the_heartbeat_timeout(ws, tmp_path):
    """SIGSTOP: the frozen rank's connections stay open and nothing fails; the heartbeat finds it."""
    run = tmp_path / "run"
    ranks = launch_ranks(distill_args(ws, run, "--iterations", 100_000, "--save-every", 2),
                         env={"LD3M_FAST_DIST_TIMEOUT": str(FROZEN_TIMEOUT)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_iterations(run, 3, ranks)
        os.kill(ranks[1].pid, signal.SIGSTOP)
        frozen = time.monotonic()
        _, err = ranks[0].communicate(timeout=HANG_GUARD_SECONDS)
        stopped_after = time.monotonic() - frozen
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()  # SIGKILL ends a stopped process too
                p.wait()
    assert ranks[0].returncode == 2, err
    assert "Traceback" not in err, err
    # The bound is the heartbeat's timeout plus a beat; the assertion only guards against a hang.
    line = assert_stopped_after_a_kill(run, err, stopped_after, HANG_GUARD_SECONDS, "freezing rank 1")
    assert f"rank 1 did not answer the heartbeat within {FROZEN_TIMEOUT} s" in line


def test_a_killed_rank_during_eval_leaves_no_eval_json_and_says_which_jobs_finished(ws, runs, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", runs / "dm-1", "--data", ws / "data", "--cache-dir", ws / "cache", "--archs", "convnet",
            "--epochs", 400, "--seeds", 4, "--threads", 1, "--no-progress", "--out", out]
    ranks = launch_ranks(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for line in ranks[0].stdout:  # rank 0 says when the jobs are handed out
            if line.startswith("distributed:"):
                break
        time.sleep(1.0)  # rank 1 is inside its first job
        ranks[1].kill()
        _, err = ranks[0].communicate(timeout=HANG_GUARD_SECONDS)
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert ranks[0].returncode == 2, err
    assert "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert "another process of the run has stopped" in lines[0] and "No eval.json was written" in lines[0]
    assert "this rank finished" in lines[0] and "of its 4 jobs" in lines[0], lines[0]
    assert not (out / "eval.json").exists() and not (out / "eval.md").exists()


def test_the_error_line_is_said_once_and_ends_torchruns_report(tmp_path, monkeypatch, capsys):
    """The main thread's line and the heartbeat's may race: one is said. Under torchrun it also goes
    into the worker's error file, whose message torchrun's report prints as its last entry."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    distributed.name_program("ld3m-fast distill")
    assert distributed.report("rank 0 of 2: stopped") and not distributed.report("said second")
    line = "ld3m-fast distill: error: rank 0 of 2: stopped"
    assert capsys.readouterr().err == line + "\n"
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(error_file))
    text = ChildFailedError("ld3m_fast", {0: failure}).format_msg()
    assert f"traceback : {line}" in text and text.rstrip().splitlines()[-2].endswith(line)
    distributed.name_program("ld3m-fast")  # a new command may say its own line


def torchrun_workers(launcher) -> dict[int, int]:
    """{rank: pid} of the workers torchrun started (their RANK in their environment)."""
    workers = {}
    for pid in open(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read().split():
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        if b"RANK" in env:
            workers[int(env[b"RANK"])] = int(pid)
    return workers


def launch_torchrun(ws, run, *flags) -> subprocess.Popen:
    """A 2-process torchrun job of the tiny workspace's distill that runs until stopped."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return subprocess.Popen(
        [torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "ld3m_fast",
         *map(str, distill_args(ws, run, "--iterations", 100_000, *flags))],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"),
                    reason="finds torchrun's workers through /proc (Linux)")
def test_a_killed_rank_of_a_torchrun_job_stops_the_job_with_one_line(ws, tmp_path):
    """torchrun also notices the dead worker and sends the others SIGTERM: the same single line."""
    run = tmp_path / "run"
    launcher = launch_torchrun(ws, run, "--save-every", 2)
    try:
        wait_for_iterations(run, 3, [launcher])
        workers = torchrun_workers(launcher)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGKILL)
        killed = time.monotonic()
        _, err = launcher.communicate(timeout=HANG_GUARD_SECONDS)
        stopped_after = time.monotonic() - killed  # torchrun exits after its last worker
    finally:
        if launcher.poll() is None:
            launcher.kill()
    # Rank 0 exits 2 after its line, or by torchrun's SIGTERM when that lands after the loop.
    assert launcher.returncode != 0 and "SIGKILL" in err, err  # torchrun names the killed rank
    assert_stopped_after_a_kill(run, err, stopped_after)


def test_ctrl_c_on_torchrun_stops_every_rank_after_the_same_iteration(ws, tmp_path):
    run = tmp_path / "run"
    launcher = launch_torchrun(ws, run, "--save-seconds", 100_000)
    try:
        wait_for_iterations(run, 2, [launcher])
        launcher.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends to torchrun
        out, err = launcher.communicate(timeout=HANG_GUARD_SECONDS)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    lines = error_lines(err)  # ours; torchrun adds its own report of the signal
    assert len(lines) == 1, err
    stopped = int(lines[0].split("SIGINT at iteration ")[1].split()[0])
    assert "checkpoint saved" in lines[0]
    assert "Resume with: torchrun --nproc-per-node 2 -m ld3m_fast distill --resume" in lines[0]
    assert out.count("finishing iteration") == 1, out  # said once, by rank 0
    assert "distributed: 2 processes (gloo)" in out
    assert checkpoint_iteration(run) == stopped == metric_lines(run)


def test_eval_spreads_its_jobs_over_the_ranks_and_writes_the_same_report(ws, runs, tmp_path):
    args = ["eval", runs / "dm-1", "--data", ws / "data", "--cache-dir", ws / "cache", "--archs", "convnet",
            "--epochs", 2, "--seeds", 2, "--threads", 1, "--no-progress"]
    one = subprocess.run([sys.executable, "-m", "ld3m_fast", *map(str, args), "--out", str(tmp_path / "one")],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    ranks = launch_ranks([*args, "--out", tmp_path / "two"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    outputs = [p.communicate(timeout=HANG_GUARD_SECONDS) for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outputs
    assert outputs[1][0] == ""  # rank 1 says nothing; rank 0 reports
    assert "distributed: 2 processes (gloo)" in outputs[0][0]
    a = json.loads((tmp_path / "one" / "eval.json").read_text())
    b = json.loads((tmp_path / "two" / "eval.json").read_text())
    key = lambda r: (r["set"], r["arch"], r["seed"], r["accuracy"])  # noqa: E731
    assert [key(r) for r in b["jobs"]] == [key(r) for r in a["jobs"]] and len(a["jobs"]) == 4  # + random real
    assert b["sets"] == a["sets"] and b["complete"]


def test_planner_simulates_one_rank_of_several():
    from ld3m_fast.distill.config import DistillConfig
    from ld3m_fast.distill.planner.plan import planning_config
    from ld3m_fast.distill.planner.simulate import Walk, estimate

    config = planning_config(DistillConfig(prior="tiny", res=32, ipc=2, steps=2, chunk=2, batch_real=8, width=16,
                                           micro_batch=2, algorithm="dm"))
    spec = Walk.of(config, 4, world_size=2)
    assert spec.images == 4 and spec.total_images == 8
    direct = estimate(spec, direct=True)  # rank 0's real iteration: its 2 classes of the whole set
    planned = estimate(spec)  # rank 0's classes as one process + the other rank's rows of Z and c
    alone = estimate(spec.at(world_size=1, num_classes=2))
    assert planned.flops == pytest.approx(direct.flops, rel=0.01) and planned.flops == alone.flops
    assert direct.peak_bytes <= planned.peak_bytes <= 1.02 * direct.peak_bytes
    assert planned.peak_bytes > alone.peak_bytes
