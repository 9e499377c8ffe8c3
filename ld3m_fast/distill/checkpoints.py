"""A run's checkpoints: the newest two, written atomically, taken back only when they fit the run.

    RUN_DIR/checkpoint.safetensors            the newest checkpoint
    RUN_DIR/checkpoint.previous.safetensors   the one before it

Writing (`write_checkpoint`): the new checkpoint goes to a temporary file; then the newest
becomes the previous one and the temporary file the newest (two renames). A failed write (a
full disk) leaves both as they were; a kill between the renames leaves the previous one only.

A checkpoint holds the tensors Z, c, labels, algorithm.<i> (MTT's student lr) and
optimizer.<index>.<key> (SGD's momentum buffers), and the metadata format, iteration, run_id,
world_size, random_streams ("stateless": the iteration is the whole random state),
optimizer_groups, optimizer_state_keys and config; under fp16 also grad_scaler.scale,
grad_scaler.growth_tracker and grad_scaler.skipped_steps (the run's whole config, as JSON).

Resuming (`choose_checkpoint`) takes the newest checkpoint that can be used. Refused outright
(one line naming the field): a checkpoint of another run (run id), and a config.json whose
settings a resume may not change (`RESUMABLE`) differ from the checkpoint's own record (an
edited config.json). Passed over for the one before it, with a line saying why, and refused
when neither can be used: a file that cannot be read, an iteration outside [0, the run's
iterations], a tensor of the wrong dtype, or one holding NaN or inf. `check_fits` then holds the
tensors' shapes against the run (one line naming the tensor).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from .._files import atomic_write, quoted_path, save_tensors
from ..errors import LD3MError
from .config import RESUMABLE, DistillConfig

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
PREVIOUS = "checkpoint.previous.safetensors"
NAMES = (CHECKPOINT, PREVIOUS)  # newest first
FORMAT = "ld3m-fast-checkpoint"


class Unusable(LD3MError):
    """A damaged checkpoint: unreadable, out of range, of the wrong dtype or not finite (the one
    before it may still serve)."""


@dataclass
class Checkpoint:
    """One checkpoint file read back (`read_checkpoint`)."""

    path: Path
    tensors: dict
    iteration: int
    groups: list
    state_keys: dict
    run_id: str | None
    config: dict | None  # the run's config when it was written (None in checkpoints before it was kept)


def write_checkpoint(run_dir, tensors: dict, metadata: dict) -> Path:
    """Write the newest checkpoint; the newest so far becomes the previous one (module docstring)."""
    run_dir = Path(run_dir)
    newest, previous = run_dir / CHECKPOINT, run_dir / PREVIOUS
    with atomic_write(newest, suffix=".safetensors") as tmp:
        save_tensors(tensors, tmp, metadata)
        if newest.exists():
            os.replace(newest, previous)
    return newest


def read_checkpoint(path) -> Checkpoint:
    """A checkpoint file and its metadata; `Unusable` when it cannot be read as one."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
        if metadata.get("format") != FORMAT:
            raise ValueError("not an ld3m-fast checkpoint")
        iteration = int(metadata["iteration"])
        groups = json.loads(metadata["optimizer_groups"])
        state_keys = json.loads(metadata["optimizer_state_keys"])
        config = json.loads(metadata["config"]) if "config" in metadata else None
        state_keys_fit = isinstance(state_keys, dict) and all(
            str(index).isdigit() and isinstance(keys, list) for index, keys in state_keys.items())
        if not state_keys_fit or not isinstance(groups, list) or not (config is None or isinstance(config, dict)):
            raise ValueError("its metadata has the wrong layout")
    except (SafetensorError, OSError, ValueError, KeyError) as error:
        raise Unusable(f"checkpoint {quoted_path(path)} is corrupt or unreadable ({error})") from None
    # Generator states of checkpoints written before the streams became stateless: unused.
    tensors = {k: v for k, v in tensors.items() if not k.startswith("rng.")}
    return Checkpoint(path, tensors, iteration, groups, state_keys, metadata.get("run_id"), config)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


INTEGER_TENSORS = ("labels", "grad_scaler.growth_tracker", "grad_scaler.skipped_steps")


def expected_dtype(key: str) -> torch.dtype:
    """Labels and the fp16 scaler's counters are int64; Z, c, the algorithm's parameters, the
    optimiser's state and the scaler's scale are float32."""
    return torch.int64 if key in INTEGER_TENSORS else torch.float32


def tensor_problem(key: str, tensor: torch.Tensor) -> str | None:
    """What is wrong with one checkpoint tensor (its dtype, non-finite values), or None."""
    if tensor.dtype != expected_dtype(key):
        return f"{key} is {_dtype_name(tensor.dtype)}, expected {_dtype_name(expected_dtype(key))}"
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        return f"{key} holds NaN or inf"
    return None


def check_checkpoint(checkpoint: Checkpoint, *, run_id: str, recorded: DistillConfig) -> None:
    """Hold a checkpoint against its run: `LD3MError` for another run's checkpoint or an edited
    config.json, `Unusable` for damage (module docstring)."""
    path = quoted_path(checkpoint.path)
    if checkpoint.run_id != run_id:
        raise LD3MError(f"checkpoint {path} belongs to another run (run id {checkpoint.run_id or 'missing'}, "
                        f"this run is {run_id}); put back this run's own checkpoint or start a new run")
    if checkpoint.config is not None:
        values = recorded.to_dict()
        for name in values:
            if name in RESUMABLE or name not in checkpoint.config or checkpoint.config[name] == values[name]:
                continue
            raise LD3MError(f"the run's config.json does not match its checkpoint {path}: {name} is "
                            f"{values[name]!r} in config.json but {checkpoint.config[name]!r} in the checkpoint "
                            f"(config.json was edited?); put back {name} = {checkpoint.config[name]!r} or start "
                            "a new run")
    iterations = (checkpoint.config or {}).get("iterations", recorded.iterations)
    if not 0 <= checkpoint.iteration <= iterations:
        raise Unusable(f"checkpoint {path} cannot be resumed: its iteration {checkpoint.iteration} is outside "
                       f"[0, {iterations}], the run's iterations")
    for key, tensor in checkpoint.tensors.items():
        problem = tensor_problem(key, tensor)
        if problem is not None:
            raise Unusable(f"checkpoint {path} cannot be resumed: {problem}")


def choose_checkpoint(run_dir, *, run_id: str, recorded: DistillConfig) -> Checkpoint:
    """The newest checkpoint of `run_dir` that can be used (module docstring), warning which newer
    one was passed over and why; one line when there is none."""
    run_dir = Path(run_dir)
    problems = []
    for name in NAMES:
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            checkpoint = read_checkpoint(path)
            check_checkpoint(checkpoint, run_id=run_id, recorded=recorded)
        except Unusable as problem:
            problems.append(str(problem))
            continue
        if problems:
            logger.warning(f"{'; '.join(problems)}: resuming from the one before it, {path} "
                           f"(iteration {checkpoint.iteration})")
        return checkpoint
    if not problems:
        raise LD3MError(f"{quoted_path(run_dir)} has no {CHECKPOINT} to resume from")
    raise LD3MError(f"{'; '.join(problems)}; no usable checkpoint is left: delete the run folder and start again")


def last_finite_checkpoint(run_dir) -> tuple[Checkpoint | None, list[str]]:
    """(the newest checkpoint whose tensors are readable, of the right dtype and finite, or None;
    what is wrong with each newer one)."""
    problems = []
    for name in NAMES:
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        try:
            checkpoint = read_checkpoint(path)
        except Unusable as problem:
            problems.append(str(problem))
            continue
        problem = next(filter(None, (tensor_problem(k, v) for k, v in checkpoint.tensors.items())), None)
        if problem is None:
            return checkpoint, problems
        problems.append(f"{quoted_path(path)} (iteration {checkpoint.iteration}): {problem}")
    return None, problems


def check_fits(checkpoint: Checkpoint, expected: dict, optimizer: torch.optim.Optimizer) -> None:
    """The checkpoint's tensors have the shapes of this run's (`expected`: name -> shape, and the
    optimiser's parameters for its state); one line naming the first that does not."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    expected = dict(expected)
    for index, keys in checkpoint.state_keys.items():
        if int(index) < len(params):
            expected.update({f"optimizer.{index}.{key}": params[int(index)].shape for key in keys})
    for key, shape in expected.items():
        tensor = checkpoint.tensors.get(key)
        if tensor is None or tensor.shape != shape:
            found = "missing" if tensor is None else tuple(tensor.shape)
            raise LD3MError(f"checkpoint {quoted_path(checkpoint.path)} does not fit this run: {key} is {found}, "
                            f"expected {tuple(shape)}")


__all__ = ["CHECKPOINT", "FORMAT", "NAMES", "PREVIOUS", "Checkpoint", "Unusable", "check_checkpoint",
           "check_fits", "choose_checkpoint", "last_finite_checkpoint", "read_checkpoint", "tensor_problem",
           "write_checkpoint"]
