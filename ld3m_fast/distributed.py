"""Process groups for `torchrun`: the one object the distillation loop talks to.

    torchrun --nproc-per-node 2 -m ld3m_fast distill ...          (docs/distributed.md)

`current()` is this process's group: `Single` (one process; every collective is a no-op:
a plain `ld3m-fast distill`, the planner, the Python API) or `Group` (torch.distributed:
NCCL on CUDA, gloo on CPU), set up by `from_environment(device)` from torchrun's RANK,
WORLD_SIZE and LOCAL_RANK, or wrapping a process group the caller initialised. The loop
calls the same methods either way, so it holds no `if distributed` branches.

The work split (`class_share`): each rank owns a contiguous block of classes (the first
`K mod W` ranks one class more). Every rank keeps the whole, identical Z, c and optimiser
state; it renders and differentiates only its own classes' images, so the gradient rows
of the other ranks' images are exact zeros, and the all-reduce (sum) before the identical
optimiser step adds x + 0 = x: every rank stays identical, and equal to one process.

Processes never wait forever. A collective that fails because another process died raises
`RankFailure` (one line, on every rank that sees it). A process that is alive but frozen
(stopped, swapped out, its machine unreachable) fails nothing: it is found by a heartbeat.
Every process of a group set up here beats every `heartbeat_period()` seconds over a gloo
group of its own (a monitored barrier, which names on rank 0 the ranks that did not answer,
then an all-reduce that says whether a process is leaving); a beat that gets no answer
within `LD3M_FAST_DIST_TIMEOUT` seconds (default 60) ends the process with one line, from
the heartbeat's thread even while the main thread waits inside a collective:
`on_unheard` lets the caller word that line (the distillation loop names its intact
checkpoint). Joining the group is bounded by the same timeout; once joined, the collectives
themselves may wait up to `COLLECTIVE_TIMEOUT` (a rank may wait for rank 0's inline
evaluation or the slowest rank's evaluation jobs: long, but alive, as the heartbeat says).
"""
from __future__ import annotations

import atexit
import datetime
import json
import os
import sys
import threading
import time
from contextlib import contextmanager

import torch

from .errors import LD3MError, one_line

TIMEOUT_ENV = "LD3M_FAST_DIST_TIMEOUT"
DEFAULT_TIMEOUT_SECONDS = 60.0
# Once every process has joined, what a collective may wait for a live peer (the heartbeat
# ends the wait for a frozen or dead one): a backstop for a bug that leaves every process
# waiting on another, and NCCL's watchdog limit.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=24)


class RankFailure(LD3MError):
    """A collective failed: another process of the run died, hung or disagreed.

    Unlike other errors (the same on every rank, so printed by rank 0 only), every rank
    that sees it reports it."""


def class_share(num_classes: int, rank: int, world_size: int) -> range:
    """The classes rank `rank` of `world_size` owns: a contiguous block, sizes differing by
    at most one (the first num_classes % world_size ranks hold one more)."""
    if world_size > num_classes:
        raise LD3MError(f"{world_size} processes for {num_classes} classes: every process needs at least "
                        f"one class; launch at most {num_classes} (--nproc-per-node)")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def largest_share(num_classes: int, world_size: int) -> int:
    """Classes of the busiest rank (rank 0): what one GPU must hold and compute."""
    return len(class_share(num_classes, 0, world_size))


class Single:
    """One process: every collective returns its input (no torch.distributed involved)."""

    rank = 0
    world_size = 1
    local_rank = 0
    local_world_size = 1
    backend = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def class_share(self, num_classes: int) -> range:
        return class_share(num_classes, self.rank, self.world_size)

    def device(self, requested: torch.device) -> torch.device:
        """The device this rank runs on for a run configured with `requested`."""
        return requested

    # -- collectives (no-ops here)

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce `tensor` over the ranks in place (op "sum" or "max"); returns it."""
        return tensor

    def sum_grads_(self, params) -> None:
        """All-reduce (sum) the `.grad` of every parameter, in place."""

    def agree_max(self, *values: int) -> tuple[int, ...]:
        """The element-wise maximum of small integers over the ranks (flags, signal numbers)."""
        return tuple(int(v) for v in values)

    def chain_sum(self, parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """Every rank's `parts` (tensors shaped like `like`) added in one order: rank 0's in
        order, then rank 1's onto that running sum, and so on (the order in which one process
        adds all of them); the total on every rank. An all-reduce would add the ranks' partial
        sums instead, which rounds differently."""
        return _add_in_order(parts, None, like)

    def barrier(self) -> None:
        pass

    def broadcast_object(self, value):
        """Rank 0's `value` on every rank."""
        return value

    def gather_to_main(self, value) -> list | None:
        """[value of rank 0, value of rank 1, ...] on rank 0; None elsewhere."""
        return [value]

    def all_gather_object(self, value) -> list:
        return [value]

    def on_main(self, function):
        """Run `function()` on rank 0 only; every rank returns its result (broadcast) or raises its
        LD3MError (the same line on every rank, printed once)."""
        return function()

    # -- differentiable pieces (MTT's student split across ranks)

    def sum_across_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """Forward: the sum of `x` over the ranks; backward: the gradient passes through."""
        return x

    def replicated(self, x: torch.Tensor) -> torch.Tensor:
        """Forward: `x` (identical on every rank); backward: the ranks' gradients summed."""
        return x

    @contextmanager
    def on_unheard(self, describe):
        """While inside, the line a process found silent by the heartbeat ends with (`Group`)."""
        yield

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return "one process"


class Group(Single):
    """A torch.distributed process group (the default group)."""

    def __init__(self, device: torch.device, *, owned: bool):
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        self.backend = str(dist.get_backend())
        self._device = device
        self._owned = owned
        self._heartbeat = None
        self._unheard = []  # callers' wording of the line the heartbeat prints (`on_unheard`)

    def start_heartbeat(self, seconds: float) -> None:
        """Beat with every other process (a collective: every rank calls it once, after joining)."""
        group = self._dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=seconds))
        self._heartbeat = _Heartbeat(self, group, seconds)
        self._heartbeat.start()

    @contextmanager
    def on_unheard(self, describe):
        """While inside: a frozen, unreachable or dead process found by the heartbeat ends this
        one with the line `describe(reason)` (a RankFailure's message; exit code 2)."""
        self._unheard.append(describe)
        try:
            yield
        finally:
            self._unheard.remove(describe)

    def _stop_unheard(self, reason: str) -> None:
        """The heartbeat's end of the run: one line (unless the main thread said one), exit 2."""
        what = f"rank {self.rank} of {self.world_size}: {reason}"
        message = self._unheard[-1](what) if self._unheard else f"{what}; stopped"
        if report(message):
            os._exit(2)  # the main thread may be waiting inside a collective that never ends

    def device(self, requested: torch.device) -> torch.device:
        return self._device

    @contextmanager
    def _collective(self, what: str):
        try:
            yield
        except RuntimeError as error:  # DistBackendError and gloo/NCCL failures
            raise RankFailure(f"rank {self.rank} of {self.world_size}: {what} failed, another process of the "
                              f"run has stopped or cannot be reached ({_reason(error)})") from None

    def _tensor(self, values, dtype=torch.float64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self._device)

    def all_reduce_(self, tensor, op="sum"):
        ops = {"sum": self._dist.ReduceOp.SUM, "max": self._dist.ReduceOp.MAX}
        with self._collective(f"all-reduce ({op})"):
            if tensor.device == self._device:
                self._dist.all_reduce(tensor, op=ops[op])
            else:  # e.g. a CPU scalar under NCCL
                moved = tensor.to(self._device)
                self._dist.all_reduce(moved, op=ops[op])
                tensor.copy_(moved)
        return tensor

    def sum_grads_(self, params):
        grads = [p.grad for p in params if p.grad is not None]
        if len(grads) != len(params):
            raise RuntimeError("every rank must hold a gradient for every parameter it all-reduces")
        with self._collective("the gradient all-reduce"):
            for g in grads:
                self._dist.all_reduce(g)

    def agree_max(self, *values):
        flags = self._tensor([float(v) for v in values])
        self.all_reduce_(flags, "max")
        return tuple(int(v) for v in flags.tolist())

    def chain_sum(self, parts, like):
        with self._collective("the ordered sum of a gradient"):
            running = None
            if self.rank > 0:
                running = torch.empty_like(like, memory_format=torch.contiguous_format)
                self._dist.recv(running, src=self.rank - 1)
            total = _add_in_order(parts, running, like).contiguous()
            if self.rank < self.world_size - 1:
                self._dist.send(total, dst=self.rank + 1)
            self._dist.broadcast(total, src=self.world_size - 1)
        return total

    def barrier(self):
        with self._collective("a barrier"):
            if self.backend == "nccl":
                self._dist.barrier(device_ids=[self._device.index])
            else:
                self._dist.barrier()

    def broadcast_object(self, value):
        box = [value if self.rank == 0 else None]
        with self._collective("a broadcast"):
            self._dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_to_main(self, value):
        gathered = [None] * self.world_size if self.rank == 0 else None
        with self._collective("a gather"):
            self._dist.gather_object(value, gathered, dst=0)
        return gathered

    def all_gather_object(self, value):
        gathered = [None] * self.world_size
        with self._collective("an all-gather"):
            self._dist.all_gather_object(gathered, value)
        return gathered

    def on_main(self, function):
        outcome = None
        if self.rank == 0:
            try:
                outcome = ("ok", function())
            except LD3MError as error:
                outcome = ("error", str(error))
            except BaseException:
                self.broadcast_object(("failed", "rank 0 failed (see its traceback)"))
                raise
        kind, value = self.broadcast_object(outcome)
        if kind == "error":
            raise LD3MError(value)
        if kind == "failed":
            raise RankFailure(f"rank {self.rank} of {self.world_size}: {value}")
        return value

    def sum_across_ranks(self, x):
        return _SumAcrossRanks.apply(x, self)

    def replicated(self, x):
        return _Replicated.apply(x, self)

    def close(self):
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self._owned and self._dist.is_initialized():
            self._dist.destroy_process_group()

    def describe(self) -> str:
        return f"{self.world_size} processes ({self.backend})"


def _reason(error: BaseException) -> str:
    """The gist of a backend's error: its first line, without a source-location prefix."""
    import re

    text = (str(error).strip().splitlines() or ["no reason given"])[0]
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text)
    return text.split(". ")[0][:200]


def _add_in_order(parts, start, like) -> torch.Tensor:
    """((start + parts[0]) + parts[1]) + ...; zeros like `like` when there is nothing to add."""
    from .losses import add_in_order

    total = add_in_order(parts, start)
    return torch.zeros_like(like) if total is None else total


class _Heartbeat(threading.Thread):
    """Every `period` seconds: a monitored barrier over the heartbeat's own gloo group (rank 0
    learns which ranks did not answer), then an all-reduce of "leaving" flags. A process that
    leaves (`stop`) says so in its next beat and every process stops beating after it: the
    others' beats would otherwise find nobody. A beat that fails while nobody is leaving ends
    the process (`Group._stop_unheard`)."""

    def __init__(self, group: Group, beat_group, seconds: float):
        super().__init__(name="ld3m-fast heartbeat", daemon=True)
        self.group, self.beat_group, self.seconds = group, beat_group, seconds
        self.period = heartbeat_period(seconds)
        self.leaving = threading.Event()

    def run(self):
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=self.seconds)
        while True:
            leaving = self.leaving.is_set()
            flags = torch.tensor([float(leaving)])
            try:
                dist.monitored_barrier(group=self.beat_group, timeout=timeout, wait_all_ranks=True)
                dist.all_reduce(flags, group=self.beat_group)
            except Exception as error:  # noqa: BLE001 (gloo's errors: a timeout, a closed connection)
                if not self.leaving.is_set():
                    self.group._stop_unheard(_unheard_reason(error, self.seconds))
                return
            if leaving or flags.item() > 0:
                return
            self.leaving.wait(self.period)

    def stop(self) -> None:
        """Say goodbye in one last beat (bounded: a frozen peer makes it time out)."""
        self.leaving.set()
        self.join(self.seconds + self.period)


def heartbeat_period(seconds: float) -> float:
    """Seconds between two beats: often enough to notice a silent peer within `seconds`."""
    return min(2.0, seconds / 5)


def _unheard_reason(error: BaseException, seconds: float) -> str:
    """Why the heartbeat failed, in words, naming the silent rank where gloo's monitored barrier
    names it (on rank 0; the other ranks hear only rank 0)."""
    import re

    text = str(error)
    ranks = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", text)
    if ranks:
        silent = f"rank {ranks.group(1).strip()} did not answer the heartbeat within {seconds:g} s"
    elif "waiting for send/recv from rank 0" in text:
        silent = f"rank 0 did not answer the heartbeat within {seconds:g} s"
    else:
        silent = f"the heartbeat failed ({_reason(error)})"
    return f"{silent}: another process of the run has stopped or cannot be reached (killed, frozen, or on a lost machine)"


_REPORT_LOCK = threading.Lock()
_REPORT = {"program": "ld3m-fast", "said": False}


def name_program(name: str) -> None:
    """Start a command: the name its error line starts with (`ld3m-fast distill`); nothing said yet."""
    with _REPORT_LOCK:
        _REPORT.update(program=name, said=False)


def report(message: str) -> bool:
    """Print `PROGRAM: error: message` on stderr, once per command: the main thread's error and
    the heartbeat's may race, and only the first is said. Under torchrun the line also goes into
    the worker's error file, so torchrun's closing report repeats it. Returns whether this call
    printed."""
    with _REPORT_LOCK:
        if _REPORT["said"]:
            return False
        _REPORT["said"] = True
        line = f"{_REPORT['program']}: error: {one_line(message)}"  # a path's newline stays an escape
    # Straight to stderr, not through `logging`: this is the command's error contract (one line,
    # whatever --quiet or a caller's logging setup says), and the heartbeat's thread ends the
    # process with os._exit right after it.
    print(line, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file and not os.path.exists(error_file):
        try:
            with open(error_file, "w") as f:  # the layout torch's own `record` writes; the "callstack" is our line
                json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                      "timestamp": str(int(time.time()))}}}, f)
        except OSError:
            pass  # torchrun's report then says less; our line is already printed
    return True


class _SumAcrossRanks(torch.autograd.Function):
    """y = sum over ranks of x; dL/dx = dL/dy (each rank's upstream is its share of the graph)."""

    @staticmethod
    def forward(ctx, x, group):
        return group.all_reduce_(x.clone())

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Replicated(torch.autograd.Function):
    """y = x (x identical on every rank); dL/dx = sum over ranks of dL/dy (every rank's part of
    the graph uses y with its own images)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.all_reduce_(grad.clone()), None


_CURRENT: Single = Single()


def current() -> Single:
    """This process's group: the one `from_environment` set up, a caller's torch.distributed
    default group, or `Single`."""
    global _CURRENT
    if isinstance(_CURRENT, Group) or not _initialised():
        return _CURRENT
    _CURRENT = Group(_device_for_backend(), owned=False)
    return _CURRENT


def _initialised() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _device_for_backend() -> torch.device:
    import torch.distributed as dist

    if str(dist.get_backend()) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launched_by_torchrun() -> bool:
    """True when torchrun (or an equivalent launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def processes_per_node() -> int:
    """Processes torchrun started on this machine (1 without torchrun)."""
    if not launched_by_torchrun():
        return 1
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def timeout() -> datetime.timedelta:
    text = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_SECONDS
    except ValueError:
        raise LD3MError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from None
    if not seconds > 0:
        raise LD3MError(f"{TIMEOUT_ENV} must be > 0 seconds, got {text}")
    return datetime.timedelta(seconds=seconds)


def from_environment(device: str | torch.device = "cpu") -> Single:
    """The group of a process torchrun started (initialised here once), else `current()`.

    device: the run's --device. CUDA: NCCL, this rank on cuda:LOCAL_RANK; CPU: gloo.
    """
    global _CURRENT
    existing = current()
    if isinstance(existing, Group) or not launched_by_torchrun():
        return existing
    import torch.distributed as dist

    try:
        device = torch.device(device)
    except RuntimeError:
        raise LD3MError(f"unknown --device {device!r}; use cpu or cuda") from None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LD3MError("--device cuda asked for but no CUDA device is available; use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise LD3MError(f"local rank {local_rank} has no GPU (this node has {torch.cuda.device_count()}); "
                            "launch at most one process per GPU (--nproc-per-node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise LD3MError(f"--device {device} cannot run under torchrun; use cpu (gloo) or cuda (NCCL)")
    seconds = timeout().total_seconds()
    try:  # joining waits at most the timeout for the other processes
        dist.init_process_group(backend=backend, timeout=timeout(),
                                **({"device_id": device} if backend == "nccl" else {}))
        dist.group.WORLD.set_timeout(max(COLLECTIVE_TIMEOUT, timeout()))
        group = Group(device, owned=True)
        group.start_heartbeat(seconds)
    except (RuntimeError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [""])[0][:300]
        raise LD3MError(f"cannot join the process group ({backend}): {reason}") from None
    _CURRENT = group
    atexit.register(shutdown)  # leave the group (and stop the heartbeat) before the interpreter goes
    return _CURRENT


def shutdown() -> None:
    """Leave the process group this module created (a caller's own group is left alone)."""
    global _CURRENT
    group, _CURRENT = _CURRENT, Single()
    group.close()


def reports(error: BaseException) -> bool:
    """Whether this process prints `error`: rank 0 prints everything; the others only what
    they alone can see (a failed collective), since every other error is raised alike on
    every rank."""
    return current().is_main or isinstance(error, RankFailure)


__all__ = ["COLLECTIVE_TIMEOUT", "Group", "RankFailure", "Single", "class_share", "current", "from_environment",
           "heartbeat_period", "largest_share", "launched_by_torchrun", "name_program", "processes_per_node", "report",
           "reports", "shutdown", "timeout"]
