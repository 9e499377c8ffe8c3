"""The one distillation loop over a `Setup`, its run folder and its resumable checkpoints.

Per iteration k (1-based):
    noise  = per class, from the stream "iteration:k:noise:CLASS"   # drawn once, reused by every pass
    images = gen(Z, c, noise)                            # autograd-aware in every grad mode
    loss, dL/dimages = algorithm.image_gradient(images.detach(), labels, ctx)
    images.backward(dL/dimages)                          # back through the generator to Z, c
    SGD(momentum 0.5) step on Z, c (and MTT's student lr)

Randomness is stateless: every draw of iteration k comes from a generator of its own
(iteration, purpose, class or student step), derived from the seed (`StepContext.stream`).
A checkpoint needs only the iteration, and the result does not depend on the number of
processes.

Distributed (`torchrun ... -m ld3m_fast distill`, `ld3m_fast.distributed`): every rank
holds the whole Z, c and optimiser state and renders its own classes (`distill_iteration`);
rank 0 alone holds the run-folder lock and writes (checkpoints after a barrier, metrics,
images, TensorBoard, the export). A stop (Ctrl-C, SIGTERM) is agreed by all ranks after each
iteration, so all stop after the same one; a rank that dies makes the others stop at
their next collective, and one that freezes makes them stop at the heartbeat's timeout, each
with one line that names the intact checkpoint (`stopped_by`). docs/distributed.md.

Run folder (RUN_DIR):
    config.json              the resolved configuration (`ld3m_fast.distill.config`)
    run.json, .lock          the run's identity and its one-process lock (`runfolder`)
    metrics.jsonl            one JSON object per iteration (and per inline evaluation)
    tb/                      TensorBoard scalars
    images/iter_XXXXXX.png   image grids (rows = classes) every `image_every` iterations
    checkpoint.safetensors   Z, c, labels, optimiser state, student lr, iteration, the run id and
                             the run's config (the random streams are stateless); atomic
    checkpoint.previous.safetensors   the checkpoint before it (`checkpoints`: a resume takes the
                             newest that can be used)
    final/                   the export (`ld3m_fast.distill.export`)

Never losing work: a checkpoint is written every `save_seconds` of work (and every
`save_every` iterations when set), and SIGINT / SIGTERM finish the current iteration,
write one and print the command that resumes. A second Ctrl-C stops at once and prints the
command that resumes from the last checkpoint, which stays intact.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import distributed
from .._files import check_writable_folder, shell_quote, write_text_atomic
from .._threads import apply_threads
from ..errors import LD3MError
from . import runfolder
from .algorithms import class_noise, class_rows
from .assemble import build_context, build_optimizer
from .checkpoints import (CHECKPOINT, FORMAT, PREVIOUS, Checkpoint, check_fits, choose_checkpoint,
                          last_finite_checkpoint, write_checkpoint)
from .config import RESUMABLE, DistillConfig, load_config, resolve_defaults
from .export import export_final, render_final, save_image_grid, to_uint8_images
from .setup import Setup, build_setup

logger = logging.getLogger(__name__)

# The fp16 gradient scaler's first scale. PyTorch's default 2**16 suits losses of order 1; an image
# gradient pushed back through a decoder and a chain of denoiser steps overflows fp16 at it for the
# first several iterations (all skipped); the scaler still doubles it every 2000 clean steps.
FP16_INIT_SCALE = 2.0 ** 10


class Interrupted(LD3MError):
    """The run stopped on SIGINT/SIGTERM after saving a checkpoint (exit code 128 + signal)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def resume_command(run_dir) -> str:
    """The command that continues the run (under torchrun: with this launch's process count;
    any other count resumes it too)."""
    comm = distributed.current()
    if comm.world_size == 1:
        return f"ld3m-fast distill --resume {shell_quote(run_dir)}"
    nodes = comm.world_size // max(comm.local_world_size, 1)
    launch = (f"torchrun --nproc-per-node {comm.local_world_size}" if nodes <= 1 else
              f"torchrun --nnodes {nodes} --nproc-per-node {comm.local_world_size} <rendezvous flags>")
    return f"{launch} -m ld3m_fast distill --resume {shell_quote(run_dir)}"


def out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError ('DefaultCPUAllocator: can't
    allocate memory'), which torch does not raise as one."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


class Distiller:
    """One distillation run over a `Setup`, writing into `run_dir`."""

    def __init__(self, setup: Setup, run_dir, *, run_id: str | None = None, comm=None):
        self.setup = setup
        self.config = setup.config
        self.run_dir = Path(run_dir)
        self.run_id = run_id or runfolder.new_run_id()  # none: a run outside a run folder (benchmarks)
        self.comm = distributed.current() if comm is None else comm
        config = self.config
        syn = setup.synthetic
        self.optimizer = build_optimizer(config, syn, setup.algorithm, lr_latent=self.lr_latent,
                                         lr_class=self.lr_class)
        # This rank's classes (all of them in one process) and their rows of Z and c.
        self.classes = self.comm.class_share(len(syn.prior_classes))
        rows = None if self.comm.world_size == 1 else class_rows(syn.labels, self.classes)
        # Stateless random streams per (iteration, purpose, class), CPU generators (device-independent).
        self.context = build_context(setup.iteration, setup.real, seed=config.seed, device=setup.device,
                                     comm=self.comm, rows=rows, total_images=len(syn))
        self.iteration = 0
        self.last_checkpoint = None
        self._last_save_time = time.monotonic()
        self._stop_signal = None
        self._writer = None
        self._last_images = None
        # fp16: a gradient scaler on the image gradient (skipped steps are counted in the metrics).
        self.scaler = (torch.amp.GradScaler(setup.device.type, init_scale=FP16_INIT_SCALE)
                       if config.dtype == "fp16" else None)
        self.skipped_steps = 0

    @property
    def lr_latent(self) -> float:
        c = self.config
        return self.setup.algorithm.default_lr_latent if c.lr_latent is None else c.lr_latent

    @property
    def lr_class(self) -> float:
        c = self.config
        return self.setup.algorithm.default_lr_class if c.lr_class is None else c.lr_class

    # -- state

    def state_tensors(self) -> tuple[dict, dict]:
        """(tensors, metadata) that fully determine the rest of the run."""
        syn = self.setup.synthetic
        tensors = {"Z": syn.Z.detach(), "c": syn.c.detach(), "labels": syn.labels}
        for i, p in enumerate(self.setup.algorithm.parameters()):
            tensors[f"algorithm.{i}"] = p.detach()
        optimizer_state = self.optimizer.state_dict()
        state_keys = {}
        for index, state in optimizer_state["state"].items():
            state_keys[str(index)] = sorted(state)
            for key, value in state.items():
                tensors[f"optimizer.{index}.{key}"] = value
        if self.scaler is not None:  # its scale and growth tracker: a resume steps as the run would have
            state = self.scaler.state_dict()
            tensors["grad_scaler.scale"] = torch.tensor(float(state.get("scale", self.scaler.get_scale())))
            tensors["grad_scaler.growth_tracker"] = torch.tensor(int(state.get("_growth_tracker", 0)))
            tensors["grad_scaler.skipped_steps"] = torch.tensor(self.skipped_steps)
        metadata = {"format": FORMAT, "iteration": str(self.iteration), "run_id": self.run_id,
                    "random_streams": "stateless", "world_size": str(self.comm.world_size),
                    "optimizer_groups": json.dumps(optimizer_state["param_groups"]),
                    "optimizer_state_keys": json.dumps(state_keys),
                    "config": json.dumps(self.config.to_dict())}
        return tensors, metadata

    def save_checkpoint(self) -> Path:
        """Every rank calls it: after a barrier (every rank finished this iteration), rank 0
        writes the one checkpoint (every rank holds the same state; the newest so far is kept as
        the previous one, `checkpoints`); a failed write is the same error on every rank."""
        path = self.run_dir / CHECKPOINT
        self.comm.barrier()

        def write():
            tensors, metadata = self.state_tensors()
            with self.writing(path):
                write_checkpoint(self.run_dir, tensors, metadata)
            # Now, before on_main's broadcast: should another process die during it, rank 0's
            # line names the checkpoint it has just written, the one a resume takes.
            self.last_checkpoint = self.iteration

        self.comm.on_main(write)
        self.last_checkpoint = self.iteration
        self._last_save_time = time.monotonic()
        return path

    def load_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Restore the state of a checkpoint `checkpoints.choose_checkpoint` chose (and rank 0
        read and sent to every rank, whatever the world size that wrote it); a tensor whose shape
        does not fit this run is an LD3MError naming it."""
        syn = self.setup.synthetic
        expected = {"Z": syn.Z.shape, "c": syn.c.shape, "labels": syn.labels.shape,
                    **{f"algorithm.{i}": p.shape for i, p in enumerate(self.setup.algorithm.parameters())}}
        check_fits(checkpoint, expected, self.optimizer)
        try:
            self._restore(checkpoint.tensors, checkpoint.groups, checkpoint.state_keys)
        except (KeyError, ValueError, RuntimeError) as error:
            raise LD3MError(f"checkpoint {checkpoint.path} is corrupt or does not fit this run "
                            f"({error})") from None
        self.iteration = checkpoint.iteration
        self.last_checkpoint = checkpoint.iteration

    def _restore(self, tensors, groups, state_keys) -> None:
        syn = self.setup.synthetic
        with torch.no_grad():
            syn.Z.copy_(tensors["Z"])
            syn.c.copy_(tensors["c"])
            for i, p in enumerate(self.setup.algorithm.parameters()):
                p.copy_(tensors[f"algorithm.{i}"])
        if not torch.equal(syn.labels.cpu(), tensors["labels"]):
            raise ValueError("labels differ")
        state = {int(i): {k: tensors[f"optimizer.{i}.{k}"].to(self.setup.device) for k in keys}
                 for i, keys in state_keys.items()}
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        # The learning rates may change on resume (the advice after a NaN stop).
        self.optimizer.param_groups[0]["lr"] = self.lr_latent
        self.optimizer.param_groups[1]["lr"] = self.lr_class
        if self.scaler is not None and "grad_scaler.scale" in tensors:
            self.scaler.load_state_dict({**self.scaler.state_dict(),
                                         "scale": float(tensors["grad_scaler.scale"]),
                                         "_growth_tracker": int(tensors["grad_scaler.growth_tracker"])})
            self.skipped_steps = int(tensors["grad_scaler.skipped_steps"])

    @contextmanager
    def writing(self, what):
        """A failed write (disk full, permissions) becomes one line that says what is safe."""
        try:
            yield
        except OSError as error:
            kept = ("no checkpoint was written yet" if self.last_checkpoint is None else
                    f"the checkpoint of iteration {self.last_checkpoint} is intact")
            raise LD3MError(f"cannot write {what} ({error.strerror or error}); {kept}. Free space or fix "
                            f"permissions, then resume with: {resume_command(self.run_dir)}") from None

    # -- logging

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tb"))
        return self._writer

    def log_metrics(self, record: dict) -> None:
        with self.writing(self.run_dir / "metrics.jsonl"):
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        step = record["iteration"]
        for key, value in record.items():
            if key != "iteration" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def trim_metrics(self) -> None:
        """Drop metric lines written after the checkpoint we resume from (no duplicates)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("iteration", 0) <= self.iteration:
                    kept.append(line)
            except ValueError:
                continue  # a line cut by a kill
        write_text_atomic(path, "".join(line + "\n" for line in kept))

    # -- one iteration

    def step(self) -> dict:
        """Run iteration `self.iteration + 1` (`distill_iteration`, the path the planner
        measures too); returns its metrics."""
        from .iteration import distill_iteration

        setup = self.setup
        syn = setup.synthetic
        started = time.perf_counter()
        k = self.iteration + 1
        self.context.iteration = k
        # This rank's classes' noise, one CPU stream per class, then moved: the same noise on
        # every device and in every process that draws the class.
        labels = syn.labels if self.context.rows is None else syn.labels[self.context.rows]
        noise = class_noise(setup.generator, labels.cpu(), self.config.seed, f"iteration:{k}:noise",
                            device=setup.device)
        scale_before = None if self.scaler is None else self.scaler.get_scale()
        while True:
            try:
                with setup.iteration.autocast(setup.device.type):
                    loss, images = distill_iteration(setup.generator, syn, setup.algorithm, self.context,
                                                     self.optimizer, noise, check=self._check_finite,
                                                     scaler=self.scaler)
                break
            except (torch.OutOfMemoryError, RuntimeError) as error:
                if not out_of_memory(error):
                    raise
                # The same iteration again, in smaller pieces (its noise and streams are stateless).
                self._replan_after_oom(error)
        # A finite loss can still send a non-finite gradient through the chain: then the
        # parameters (or the momentum) are no longer finite and this iteration must not be
        # checkpointed: every checkpoint written is finite.
        if not all(bool(torch.isfinite(p).all()) for group in self.optimizer.param_groups
                   for p in group["params"]):
            self._stop("the latents became non-finite")
        if not all(bool(torch.isfinite(v).all()) for state in self.optimizer.state.values()
                   for v in state.values() if torch.is_tensor(v) and v.is_floating_point()):
            self._stop("the optimiser's momentum became non-finite")
        self.iteration += 1
        self._last_images = images
        record = {"iteration": self.iteration, "loss": float(loss),
                  "grad_norm_Z": float(syn.Z.grad.norm()) if syn.Z.grad is not None else 0.0,
                  "grad_norm_c": float(syn.c.grad.norm()) if syn.c.grad is not None else 0.0,
                  "seconds": time.perf_counter() - started}
        if self.scaler is not None:  # the scaler lowers its scale exactly when it skips a step
            skipped = self.scaler.get_scale() < scale_before
            self.skipped_steps += int(skipped)
            record.update(loss_scale=self.scaler.get_scale(), skipped_step=skipped, skipped_steps=self.skipped_steps)
        for i, p in enumerate(setup.algorithm.parameters()):
            record["student_lr" if i == 0 else f"algorithm_param_{i}"] = float(p.detach())
        return record

    def _replan_after_oom(self, error: BaseException) -> None:
        """Drop the failed iteration's partial state, plan again for the memory known to be there
        now (and below what the failed plan was predicted to need), and say so; one line and the
        checkpoint intact when nothing fits, or when other processes wait in a collective."""
        import gc

        from .planner.memory import format_bytes
        from .planner.plan import replan_after_oom

        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.setup.device.type == "cuda":
            torch.cuda.empty_cache()
        k = self.iteration + 1
        kept = self.intact(sentence=False)
        first = (str(error).strip().splitlines() or ["out of memory"])[0][:200]
        if self.comm.world_size > 1:  # the other processes wait in a collective: no agreed re-plan
            raise LD3MError(f"out of memory at iteration {k} ({first}); stopped, {kept}. Resume with a lower "
                            f"--memory-budget and --chunk auto: {resume_command(self.run_dir)}")
        plan = replan_after_oom(self.setup, error_line=first, kept=kept,
                                resume=resume_command(self.run_dir), iteration=k)
        self.setup.plan = plan
        logger.warning(f"out of memory at iteration {k} ({first}); planned again for "
                       f"{format_bytes(plan['usable_bytes'])}: {plan['flags']} ({plan['mode']}, planned peak "
                       f"{format_bytes(plan['planned_peak_bytes'])}); redoing iteration {k}")
        if self.comm.is_main:
            self.log_metrics({"iteration": k, "replanned_after": first, "plan": plan})

    def _check_finite(self, loss, image_grad) -> None:
        """Stop before anything is pushed back when the loss or dL/dimages is NaN/inf (on any
        rank: the ranks agree, so all stop at the same iteration with the same line)."""
        bad_loss = not math.isfinite(float(loss))
        bad_grad = not bool(torch.isfinite(image_grad).all())
        bad_loss, bad_grad = self.comm.agree_max(bad_loss, bad_grad)
        if bad_loss:
            self._stop(f"the loss became {float(loss)}")
        if bad_grad:
            self._stop("the image gradient became non-finite")

    def _stop(self, what: str):
        """Stop on a non-finite value with advice that works when followed: the checkpoint a resume
        takes (the newest finite one, read back from disk) and ten times lower learning rates."""
        rates = f"--lr-latent {self.lr_latent / 10:g} --lr-class {self.lr_class / 10:g}"
        advice = f"continue it with lower learning rates: {resume_command(self.run_dir)} {rates}"
        kept, problems = last_finite_checkpoint(self.run_dir) if self.comm.is_main else (None, ["not read"])
        if kept is not None and not problems:
            where = f"The last good checkpoint (iteration {kept.iteration}) is in {kept.path}; {advice}"
        elif kept is not None:
            where = (f"The newest checkpoint is not finite either ({'; '.join(problems)}); the last finite "
                     f"one, which a resume takes, is {kept.path} (iteration {kept.iteration}); {advice}")
        else:
            where = (f"No finite checkpoint is left ({'; '.join(problems) or 'none was written'}); start a new "
                     f"run with lower learning rates ({rates})")
        raise LD3MError(f"{what} at iteration {self.iteration + 1}; stopped. {where}")

    # -- the loop

    def run(self, *, on_iteration=None) -> None:
        """Iterate up to `config.iterations`, checkpointing and logging as configured."""
        config = self.config
        total = config.iterations
        bar = None
        # Opened before the first step: TensorBoard drops events of iterations a killed run
        # logged after its last checkpoint (purge_step), so curves have no duplicates.
        main = self.comm.is_main
        if self._writer is None and main:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.iteration + 1)
        if config.progress and main:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.iteration, desc="distill", unit="it", dynamic_ncols=True)
        profiler = self._profiler()
        stop = 0
        try:
            with self._stop_requests(), self._rank_failures():
                if self.comm.world_size > 1:
                    placement = self._placement()  # a collective: every rank takes part
                    logger.info(f"distributed: {self.comm.describe()}; {placement}")
                while self.iteration < total and not stop:
                    record = self.step()
                    if profiler is not None:
                        profiler.step()
                    stop = self._after_step(record, total)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{record['loss']:.4g}")
                    if on_iteration is not None:
                        on_iteration(self.iteration)
        finally:
            if profiler is not None:
                profiler.stop()
            if bar is not None:
                bar.close()
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        if stop and self.iteration < total:
            self._stop_signal = stop
            name = signal.Signals(self._stop_signal).name
            raise Interrupted(f"{name} at iteration {self.iteration} of {total}; checkpoint saved in "
                              f"{self.run_dir / CHECKPOINT}. Resume with: {resume_command(self.run_dir)}",
                              self._stop_signal)

    def _after_step(self, record: dict, total: int) -> int:
        """Log, draw, evaluate and checkpoint after iteration `self.iteration`; returns the
        signal the ranks agreed to stop on (0: go on). Rank 0 writes; a checkpoint is due on
        every rank when it is due on one, and written after a stop request."""
        config, k = self.config, self.iteration
        main = self.comm.is_main
        if main:
            self.log_metrics(record)
        if k % config.image_every == 0 or k == total:
            pixels = self.comm.gather_to_main(to_uint8_images(self._last_images))
            if main:
                path = self.run_dir / "images" / f"iter_{k:06d}.png"
                with self.writing(path):
                    save_image_grid(torch.cat(pixels), path, self.setup.synthetic.ipc)
        if config.eval_every and k % config.eval_every == 0:
            self.inline_eval()
        due = (config.save_every is not None and k % config.save_every == 0
               or time.monotonic() - self._last_save_time >= config.save_seconds)
        stop, due = self.comm.agree_max(self._stop_signal or 0, due)
        if due or k == total or stop:
            self.save_checkpoint()
        return stop

    def _placement(self) -> str:
        """Per rank: its device and classes (gathered, said once by rank 0)."""
        mine = f"{self.setup.device} classes {self.classes.start}-{self.classes.stop - 1}"
        return ", ".join(f"rank {r}: {text}" for r, text in enumerate(self.comm.all_gather_object(mine)))

    def intact(self, *, sentence: bool = True) -> str:
        """What is safe on disk, for a line that says why the run stopped (`sentence`: capitalised,
        to start one)."""
        text = ("no checkpoint was written yet" if self.last_checkpoint is None else
                f"the checkpoint of iteration {self.last_checkpoint} in {self.run_dir / CHECKPOINT} is intact")
        return text[0].upper() + text[1:] if sentence else text

    def stopped_by(self, what: str) -> str:
        """The line for a run stopped by another process (`what`: which rank saw what)."""
        where = (f"at iteration {self.iteration + 1}" if self.iteration < self.config.iterations
                 else "after the last iteration")
        return f"{what} {where}; stopped. {self.intact()}; resume with: {resume_command(self.run_dir)}"

    @contextmanager
    def _rank_failures(self):
        """Another rank that dies (a failed collective) or goes silent (the heartbeat, which ends
        this process from its own thread) becomes one line that says what is safe."""
        try:
            with self.comm.on_unheard(self.stopped_by):
                yield
        except distributed.RankFailure as error:
            raise distributed.RankFailure(self.stopped_by(str(error))) from None

    @contextmanager
    def stopped_at_once(self):
        """A Ctrl-C that stops at once (the second one, or one after the loop) still says which
        checkpoint is intact and how to resume, in one line (exit code 130)."""
        try:
            yield
        except KeyboardInterrupt:
            total = self.config.iterations
            when = (f"after {self.iteration} of {total} iterations: stopped at once" if self.iteration < total
                    else f"after all {total} iterations: stopped at once, during the export")
            again = " again" if self._stop_signal else ""
            raise Interrupted(f"SIGINT{again} {when}. {self.intact()}. Resume with: {resume_command(self.run_dir)}",
                              signal.SIGINT) from None

    @contextmanager
    def _stop_requests(self):
        """SIGINT/SIGTERM ask the loop to stop after this iteration; a second Ctrl-C stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signum
            logger.info(f"\n{signal.Signals(signum).name}: finishing iteration {self.iteration + 1}, then "
                        "saving a checkpoint (Ctrl-C again to stop at once, losing this iteration)")

        previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _profiler(self):
        """--profile N: a torch.profiler trace of N iterations after one warm-up, written to
        RUN_DIR/profile for TensorBoard's profiler plugin (pip install torch-tb-profiler)."""
        if not self.config.profile or not self.comm.is_main:
            return None
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.setup.device.type == "cuda" else [])
        profiler = profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=self.config.profile,
                                                                    repeat=1),
                           on_trace_ready=tensorboard_trace_handler(str(self.run_dir / "profile")),
                           record_shapes=True, profile_memory=True)
        profiler.start()
        return profiler

    def inline_eval(self) -> dict:
        from .evaluation import EvalConfig, evaluate_synthetic
        from .setup import load_inline_eval_data

        config = self.config
        if self.setup.test_set is None:  # evaluation switched on by a resume
            self.setup.test_set = load_inline_eval_data(config, self.setup.res)
        test = self.setup.test_set
        rendered = render_final(self.setup, config.seed, self.comm)
        if not self.comm.is_main:
            return {}  # rank 0 evaluates; the others wait for it at the next collective
        images, labels, _ = rendered
        eval_config = EvalConfig(archs=tuple(a.strip() for a in config.eval_archs.split(",")), epochs=config.eval_epochs,
                                 seeds=config.eval_seeds, width=config.width, depth=config.depth,
                                 norm=config.norm)
        result = evaluate_synthetic(images, labels, test.images, test.labels,
                                    num_classes=self.setup.real.num_classes, config=eval_config,
                                    seed=config.seed, device=self.setup.device)
        self.log_metrics({"iteration": self.iteration, "eval": result})
        for arch, row in result["per_arch"].items():
            self.writer.add_scalar(f"eval/{arch}", row["mean"], self.iteration)
        return result

    def export(self) -> Path:
        """Every rank renders its classes; rank 0 writes the export."""
        rendered = render_final(self.setup, self.config.seed, self.comm)

        def write():
            with self.writing(self.run_dir / "final"):
                return export_final(self.setup, self.run_dir, seed=self.config.seed, iteration=self.iteration,
                                    config=self.config.to_dict(), rendered=rendered)

        return self.comm.on_main(write)


# --------------------------------------------------------------------------- entry points


def _write_config(run_dir: Path, config: DistillConfig) -> None:
    write_text_atomic(run_dir / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")


def _create_run_folder(run_dir: Path) -> bool:
    """mkdir -p `run_dir`; True if this call created it. Unwritable places are one line."""
    existed = run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LD3MError(f"cannot create run folder {run_dir} ({error.strerror or error}); "
                        "choose a writable --out") from None
    return not existed


def _refuse_used_folder(run_dir: Path) -> None:
    if run_dir.exists() and (not run_dir.is_dir() or not runfolder.is_empty(run_dir)):
        raise LD3MError(f"{run_dir} already exists and is not empty; continue it with "
                        f"`{resume_command(run_dir)}` or choose another --out")


def start_run(config: DistillConfig, *, on_iteration=None) -> "Distiller":
    """Validate everything, then create the run folder and distill to the end.

    Under torchrun (or inside a caller's torch.distributed group) every rank calls this:
    rank 0's resolved settings (run folder, threads) hold for all, and rank 0 alone creates
    and locks the folder."""
    comm = distributed.from_environment(config.device)
    config = resolve_defaults(config)
    config = DistillConfig.from_dict(comm.broadcast_object(config.to_dict()))
    config.validate()
    run_dir = Path(config.out)
    comm.on_main(lambda: _refuse_used_folder(check_writable_folder(run_dir, "--out")))
    apply_threads(config.threads)
    setup = build_setup(config)
    folder = {}

    def create() -> str:
        folder["created"] = _create_run_folder(run_dir)
        folder["lock"] = runfolder.RunLock(run_dir).acquire()
        try:
            _refuse_used_folder(run_dir)  # again, under the lock: two starts into one --out
            run_id = runfolder.create_identity(run_dir)
            _write_config(run_dir, config)
        except BaseException:
            folder.pop("lock").release()
            _undo_start(run_dir, folder["created"])
            raise
        return run_id

    run_id = comm.on_main(create)
    lock = folder.get("lock")
    try:
        try:
            distiller = Distiller(setup, run_dir, run_id=run_id, comm=comm)
            distiller.save_checkpoint()  # iteration 0: a NaN at iteration 1 still leaves a checkpoint
        except BaseException:
            if lock is not None:
                lock.release()
                _undo_start(run_dir, folder["created"])  # nothing resumable was written: leave nothing behind
            raise
        return _finish(distiller, on_iteration)
    finally:
        if lock is not None:
            lock.release()


def _undo_start(run_dir: Path, created: bool) -> None:
    import shutil

    if created:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for name in (runfolder.IDENTITY, "config.json", CHECKPOINT, PREVIOUS, runfolder.LOCK):
        (run_dir / name).unlink(missing_ok=True)
    runfolder.remove_leftovers(run_dir)


def resume_run(run_dir, overrides: dict | None = None, *, on_iteration=None) -> "Distiller":
    """Continue a run from its checkpoint (same seed, same tensors as an uninterrupted run)."""
    run_dir = Path(run_dir)
    overrides = overrides or {}
    comm = distributed.from_environment(overrides.get("device") or _recorded_device(run_dir))
    folder = {}

    def open_run():
        if not run_dir.is_dir():
            raise LD3MError(f"cannot resume: {run_dir} does not exist")
        folder["lock"] = runfolder.RunLock(run_dir).acquire()
        try:
            recorded = load_config(run_dir)
            config = _apply_overrides(recorded, overrides)
            config.validate()
            run_id = runfolder.read_identity(run_dir)
            checkpoint = choose_checkpoint(run_dir, run_id=run_id, recorded=recorded)
            _refuse_going_back(checkpoint, config)
            _warn_of_other_threads(recorded, config)  # once the resume is accepted: no warning before an error
            return recorded.to_dict(), config.to_dict(), run_id, checkpoint
        except BaseException:
            folder.pop("lock").release()
            raise

    recorded, values, run_id, checkpoint = comm.on_main(open_run)
    lock = folder.get("lock")
    try:
        config = DistillConfig.from_dict(values)
        apply_threads(config.threads)
        setup = build_setup(config)

        def tidy():
            removed = runfolder.remove_leftovers(run_dir)
            if removed:
                logger.info(f"removed {len(removed)} temporary file(s) left by an interrupted write")

        comm.on_main(tidy)
        distiller = Distiller(setup, run_dir, run_id=run_id, comm=comm)
        distiller.load_checkpoint(checkpoint)

        def update_folder():
            if values != recorded:
                with distiller.writing(run_dir / "config.json"):
                    _write_config(run_dir, config)
            distiller.trim_metrics()

        comm.on_main(update_folder)
        logger.info(f"resuming {run_dir} at iteration {distiller.iteration} of {config.iterations}")
        return _finish(distiller, on_iteration)
    finally:
        if lock is not None:
            lock.release()


def _refuse_going_back(checkpoint: Checkpoint, config: DistillConfig) -> None:
    """A resume never ends before the iterations the run has done (--iterations 0 on a finished
    run would otherwise record a run of 0 iterations beside a final/ of all of them)."""
    if config.iterations < checkpoint.iteration:
        raise LD3MError(f"--iterations {config.iterations} is below the {checkpoint.iteration} iterations the run "
                        f"has done ({checkpoint.path}); a run cannot go back: give --iterations "
                        f"{checkpoint.iteration} or more, or start a new run")


def _recorded_device(run_dir: Path) -> str:
    """The run's --device, read early to choose the process group's backend (cpu if unreadable:
    the error comes with the full check)."""
    try:
        return str(json.loads((Path(run_dir) / "config.json").read_text()).get("device") or "cpu")
    except (OSError, ValueError, AttributeError):
        return "cpu"


def _apply_overrides(recorded: DistillConfig, overrides: dict) -> DistillConfig:
    """The recorded config with the resumable settings the user changed."""
    values = recorded.to_dict()
    for key, value in overrides.items():
        if key not in values:
            raise LD3MError(f"unknown setting {key!r}")
        if value == values[key]:
            continue
        if key not in RESUMABLE:
            raise LD3MError(f"cannot change {key} when resuming (run has {values[key]!r}, got {value!r}); "
                            f"only {', '.join(RESUMABLE)} may change")
        values[key] = value
    return DistillConfig.from_dict(values, where="the resumed settings")


def _warn_of_other_threads(recorded: DistillConfig, config: DistillConfig) -> None:
    if recorded.threads is not None and config.threads != recorded.threads:
        logger.warning(f"resuming with {config.threads} threads instead of the run's {recorded.threads}: "
                       "floating-point reductions may add up in another order, so the result will not be "
                       "bit-identical to an uninterrupted run")


def _finish(distiller: Distiller, on_iteration) -> Distiller:
    with distiller.stopped_at_once():
        distiller.run(on_iteration=on_iteration)
        with distiller._rank_failures():
            distiller.export()
    run_dir = distiller.run_dir
    logger.info(f"done: {distiller.iteration} iterations in {run_dir}\n"
                f"  images:        {run_dir / 'final' / 'images.png'}\n"
                f"  synthetic set: {run_dir / 'final' / 'synthetic.safetensors'} (latents), "
                f"{run_dir / 'final' / 'images.safetensors'} (images + labels)\n"
                f"  metrics:       {run_dir / 'metrics.jsonl'} (TensorBoard: {run_dir / 'tb'})")
    return distiller


__all__ = ["CHECKPOINT", "PREVIOUS", "Distiller", "Interrupted", "resume_command", "resume_run", "start_run"]
