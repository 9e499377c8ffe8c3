"""One line for every bad setting or run folder of `distill`: exit code 2, no traceback, nothing written.

The prior and data halves of the table are in tests/test_bad_inputs_prior_data.py, the other
subcommands in tests/test_bad_inputs_commands.py, faults (a full disk, memory) in
tests/test_faults.py. Every case runs `ld3m-fast ...` in this process (`run_cli`), which is what
a user's shell runs.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file

from ld3m_fast.distill.checkpoints import CHECKPOINT, PREVIOUS
from ld3m_fast.distill.run import start_run

from _workspace import assert_one_line_error, distill_flags, files_under, make_workspace, run_cli


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = make_workspace(tmp_path_factory.mktemp("badrun"))
    (root / "a-file").write_text("not a folder\n")
    (root / "not-a-run").mkdir()
    (root / "not-a-buffer.safetensors").write_bytes(b"not a buffer")
    _nan_expert(root / "nan-buffer")
    return root


def _nan_expert(folder):
    """A buffer whose one expert trajectory holds NaN (otherwise well-formed)."""
    from ld3m_fast.distill.buffers import write_trajectory_atomic

    epochs = torch.zeros(3, 4)
    epochs[1, 2] = float("nan")
    write_trajectory_atomic(folder / "expert_0000.safetensors", epochs,
                            {"names": ["w"], "shapes": [[4]], "arch": "convnet"})


def embedded(out, *extra):
    """`distill` on the embedded default prior (its checks of --res come before any data is read)."""
    return ["distill", "--out", out, "--threads", "1", "--no-progress", "--iterations", "1", *extra]


def flags(*extra):
    """A row's argv from (ws, out, tmp_path): the workspace's seconds-long run with `extra`."""
    return lambda ws, out, t: distill_flags(ws, out, *extra)


# (name, how to build argv from (ws, out, tmp_path), fragments of the one error line)
FLAG_CASES = [
    ("ipc word", flags("--ipc", "three"), ["--ipc", "expected an integer"]),
    ("ipc zero", flags("--ipc", 0), ["--ipc must be >= 1"]),
    ("ipc above the data", flags("--ipc", 5), ["at least 5 images per class"]),
    ("ipc huge", flags("--ipc", 10**6), ["one class's 1000000 synthetic images at 16² cannot fit"]),
    ("ipc above a small memory budget", flags("--ipc", 100000, "--memory-budget", "2GiB", "--memory-reserve", "0"),
     ["one class's 100000 synthetic images at 16² cannot fit", "2.00 GiB usable"]),
    ("steps zero", flags("--steps", 0), ["--steps must be >= 1"]),
    ("steps 1000", flags("--steps", 1000), ["--steps 1000 is not below the prior's 1000 training timesteps",
                                            "--steps 999 or fewer"]),
    ("steps 1001", flags("--steps", 1001), ["--steps 1001 is not below the prior's 1000 training timesteps"]),
    ("steps the released sampler fails at", flags("--released-compat", "--steps", 3), ["--released-compat",
                                                                                       "use --steps 2 or 4"]),
    ("iterations float", flags("--iterations", 2.5), ["expected an integer"]),
    ("iterations exponent", flags("--iterations", "1e3"), ["expected an integer"]),
    ("iterations negative", flags("--iterations", -1), [">= 0"]),
    ("algorithm", flags("--algorithm", "gm"), ["unknown --algorithm 'gm'"]),
    ("skip", flags("--skip", "both"), ["unknown --skip"]),
    ("grad mode", flags("--grad-mode", "fast"), ["unknown --grad-mode"]),
    ("mtt gradient", flags("--mtt-gradient", "exact"), ["unknown --mtt-gradient 'exact'"]),
    ("checkpoint attention", flags("--checkpoint-attention", "maybe"), ["unknown --checkpoint-attention"]),
    ("chunk word", flags("--chunk", "many"), ["'auto'"]),
    ("chunk zero", flags("--chunk", 0), ["--chunk must be >= 1 or auto"]),
    ("chunk negative", flags("--chunk", -1), ["--chunk must be >= 1 or auto"]),
    ("decoder chunk zero", flags("--decoder-chunk", 0), ["--decoder-chunk must be >= 1"]),
    ("store steps negative", flags("--store-steps", -1), ["--store-steps must be >= 0"]),
    ("store steps above the chain", flags("--store-steps", 3), ["--store-steps 3 is more than the chain's 2 steps"]),
    ("store steps without recompute", flags("--grad-mode", "autograd", "--store-steps", 1), ["need --grad-mode"]),
    ("sac min flops negative", flags("--sac-min-flops", -1), ["--sac-min-flops must be >= 0"]),
    ("sac min flops nan", flags("--sac-min-flops", "nan"), ["finite number"]),
    ("dtype", flags("--dtype", "fp8"), ["unknown --dtype 'fp8'"]),
    ("eta negative", flags("--eta", -0.5), ["--eta must be >= 0"]),
    ("eta 100", flags("--eta", 100), ["--eta must be <= 1, got 100"]),
    ("eta just above 1", flags("--eta", 1.01), ["--eta must be <= 1"]),
    ("eta inf", flags("--eta", "inf"), ["finite number"]),
    ("lr word", flags("--lr-latent", "big"), ["expected a number"]),
    ("lr nan", flags("--lr-latent", "nan"), ["finite number"]),
    ("lr zero", flags("--lr-latent", 0), ["--lr-latent must be > 0"]),
    ("lr negative", flags("--lr-latent", -1), ["--lr-latent must be > 0"]),
    ("lr class zero", flags("--lr-class", 0), ["--lr-class must be > 0"]),
    ("lr class inf", flags("--lr-class", "inf"), ["finite number"]),
    ("lr student negative", flags("--lr-student", -1), ["--lr-student must be >= 0"]),
    ("student lr zero", flags("--student-lr", 0), ["--student-lr must be > 0"]),
    ("momentum one", flags("--momentum", 1), ["--momentum must be < 1"]),
    ("momentum negative", flags("--momentum", -0.1), ["--momentum must be >= 0"]),
    ("guidance inf", flags("--guidance", "inf"), ["finite number"]),
    ("guidance nan", flags("--guidance", "nan"), ["finite number"]),
    ("seed negative", flags("--seed", -1), ["--seed must be >= 0"]),
    ("seed above 64 bits", flags("--seed", 2**64), ["--seed must be <= 9223372036854775807"]),
    ("save every zero", flags("--save-every", 0), ["--save-every must be >= 1"]),
    ("save seconds negative", flags("--save-seconds", -1), [">= 0"]),
    ("save seconds nan", flags("--save-seconds", "nan"), ["finite number"]),
    ("image every zero", flags("--image-every", 0), ["--image-every must be >= 1"]),
    ("eval every negative", flags("--eval-every", -1), ["--eval-every must be >= 0"]),
    ("eval epochs zero", flags("--eval-epochs", 0), ["--eval-epochs must be >= 1"]),
    ("eval seeds zero", flags("--eval-seeds", 0), ["--eval-seeds must be >= 1"]),
    ("profile negative", flags("--profile", -1), ["--profile must be >= 0"]),
    ("threads zero", flags("--threads", 0), ["--threads must be >= 1"]),
    ("threads 10000", flags("--threads", 10000), ["--threads 10000 is more than the", "core(s) this process may use"]),
    ("device", flags("--device", "tpu"), ["unknown --device 'tpu'"]),
    ("cuda missing", flags("--device", "cuda"), ["no CUDA device"]),
    ("norm", flags("--norm", "group"), ["unknown --norm 'group'"]),
    ("dsa", flags("--dsa", "color_blur"), ["--dsa", "unknown DSA augmentation 'blur'"]),
    ("dsa garbage", flags("--dsa", "garbage"), ["--dsa", "unknown DSA augmentation 'garbage'"]),
    ("width zero", flags("--width", 0), ["--width must be >= 1"]),
    ("depth zero", flags("--depth", 0), ["--depth must be >= 1"]),
    ("depth too deep", flags("--depth", 9), ["depth 9 does not fit"]),
    ("batch real zero", flags("--batch-real", 0), ["--batch-real must be >= 1"]),
    ("batch syn zero", flags("--batch-syn", 0), ["--batch-syn must be >= 1"]),
    ("micro batch zero", flags("--micro-batch", 0), ["--micro-batch must be >= 1"]),
    ("syn steps zero", flags("--syn-steps", 0), ["--syn-steps must be >= 1"]),
    ("expert epochs zero", flags("--expert-epochs", 0), ["--expert-epochs must be >= 1"]),
    ("max start epoch zero", flags("--max-start-epoch", 0), ["--max-start-epoch must be >= 1"]),
    ("prune percent zero", flags("--prune-percent", 0), ["--prune-percent must be >= 1"]),
    ("prune percent 101", flags("--prune-percent", 101), ["--prune-percent must be <= 100"]),
    ("prune order", flags("--prune-order", "middle"), ["unknown --prune-order 'middle'"]),
    ("eval archs", flags("--eval-every", 1, "--eval-archs", "lenet"), ["unknown architecture 'lenet'"]),
    ("memory budget", flags("--chunk", "auto", "--memory-budget", "lots"), ["cannot read the --memory-budget"]),
    ("memory budget negative", flags("--memory-budget", "-1GiB"), ["--memory-budget"]),
    ("memory budget nan", flags("--memory-budget", "nanGiB"), ["--memory-budget"]),
    ("memory reserve above the budget", flags("--memory-budget", "1GiB", "--memory-reserve", "150%"),
     ["--memory-reserve"]),
    ("mtt without buffer", flags("--algorithm", "mtt"), ["needs --buffer"]),
    ("mtt missing buffer", lambda ws, out, t: distill_flags(ws, out, "--algorithm", "mtt", "--buffer", t / "nope"),
     ["nope"]),
    ("mtt buffer not a buffer", lambda ws, out, t: distill_flags(ws, out, "--algorithm", "mtt", "--buffer",
                                                                 ws / "not-a-buffer.safetensors"), ["expert trajectory"]),
    ("mtt buffer with NaN", lambda ws, out, t: distill_flags(ws, out, "--algorithm", "mtt", "--buffer",
                                                             ws / "nan-buffer"), ["NaN or inf"]),
    ("released compat full mtt", flags("--released-compat", "--algorithm", "mtt", "--mtt-gradient", "full"),
     ["no released counterpart"]),
    ("max per class zero", flags("--max-per-class", 0), [">= 1"]),
    ("res zero", flags("--res", 0), ["--res must be >= 1"]),
    ("res not a multiple", flags("--res", 18), ["latent factor 4"]),
    ("unknown flag", flags("--learning-rate", 1), ["unrecognized arguments"]),
    ("unknown preset", flags("--preset", "ld3m-nope"), ["ld3m-nope"]),
    ("subset on an ImageFolder tree", flags("--subset", "imagezoo"), ["--subset needs an ImageNet tree"]),
    ("data missing", lambda ws, out, t: distill_flags(ws, out, "--data", t / "no-data"), ["does not exist"]),
    ("prior missing", lambda ws, out, t: distill_flags(ws, out, "--prior", t / "no-prior"), ["does not exist"]),
    ("out is under a file", lambda ws, out, t: distill_flags(ws, ws / "a-file" / "run"),
     ["cannot write --out", "is not a folder"]),
    ("out is a file", lambda ws, out, t: distill_flags(ws, ws / "a-file"), ["--out", "exists and is not a folder"]),
    ("out unwritable", lambda ws, out, t: distill_flags(ws, "/proc/ld3m-run"), ["cannot write --out"]),
    ("out with a newline under a file", lambda ws, out, t: distill_flags(ws, ws / "a-file" / "new\nline"),
     ["new\\nline"]),
    ("resume missing", lambda ws, out, t: ["distill", "--resume", t / "nope"], ["does not exist"]),
    ("resume not a run", lambda ws, out, t: ["distill", "--resume", ws / "not-a-run"], ["not an ld3m-fast run folder"]),
    ("config missing", lambda ws, out, t: distill_flags(ws, out, "--config", t / "nope.toml"), ["does not exist"]),
]
# --res values the embedded prior's denoiser cannot take (latents of 2, 3, 5, 6, 7 pixels)
FLAG_CASES += [(f"res {res} on the embedded prior", lambda ws, out, t, res=res: embedded(out, "--res", res),
                [f"--res {res}", "divisible by 4"]) for res in (8, 12, 20, 24, 28)]
# Settings whose iteration cannot fit: refused before any data is read (a lower bound of its memory).
FLAG_CASES += [
    ("res 4096 on the embedded prior", lambda ws, out, t: embedded(out, "--res", 4096, "--memory-budget", "16GiB"),
     ["one class's 1 synthetic image at 4096² cannot fit", "more than"]),
    ("res 2048 with a wide ConvNet", lambda ws, out, t: embedded(out, "--res", 2048, "--width", 1024,
                                                                 "--memory-budget", "16GiB"), ["at 2048² cannot fit"]),
]

TOML_CASES = [
    ("toml ipc word", 'ipc = "three"\n', ["ipc in config file", "must be an integer", "'three'"]),
    ("toml ipc list", "ipc = [1, 2]\n", ["ipc in config file", "must be an integer"]),
    ("toml lr word", 'lr_latent = "big"\n', ["lr_latent in config file", "must be a number"]),
    ("toml iterations float", "iterations = 2.5\n", ["iterations in config file", "must be an integer", "2.5"]),
    ("toml bool for int", "ipc = true\n", ["ipc in config file", "must be an integer"]),
    ("toml unknown key", "learning_rate = 3\n", ["unknown key 'learning_rate'"]),
    ("toml progress key", "progress = false\n", ["unknown key 'progress'"]),
    ("toml unparsable", "ipc = = 1\n", ["cannot parse config file"]),
    ("toml string for str", "data = 5\n", ["data in config file", "must be a string"]),
    ("toml guidance nan", "guidance = nan\n", ["guidance in config file", "finite number"]),
    ("toml eta 100", "eta = 100\n", ["--eta must be <= 1"]),
    ("toml store steps negative", "store_steps = -1\n", ["--store-steps must be >= 0"]),
    ("toml save every zero", "save-every = 0\n", ["--save-every must be >= 1"]),
    ("toml seed negative", "seed = -3\n", ["--seed must be >= 0"]),
    ("toml momentum one", "momentum = 1.0\n", ["--momentum must be < 1"]),
    ("toml dsa garbage", 'dsa = "garbage"\n', ["--dsa", "garbage"]),
    ("toml algorithm", 'algorithm = "gm"\n', ["unknown --algorithm 'gm'"]),
]


@pytest.mark.parametrize("name, make_argv, fragments", FLAG_CASES, ids=[c[0] for c in FLAG_CASES])
def test_bad_flag_is_one_line(ws, tmp_path, capsys, name, make_argv, fragments):
    out = tmp_path / "run"
    before = files_under(ws)
    code, _, err = run_cli(make_argv(ws, out, tmp_path), capsys)
    assert_one_line_error(code, err, *fragments)
    assert not out.exists() and not list(tmp_path.iterdir())
    assert {p: b for p, b in files_under(ws).items() if "cache" not in p.parts} == \
        {p: b for p, b in before.items() if "cache" not in p.parts}


@pytest.mark.parametrize("name, text, fragments", TOML_CASES, ids=[c[0] for c in TOML_CASES])
def test_bad_config_file_is_one_line(ws, tmp_path, capsys, name, text, fragments):
    path = tmp_path / "run.toml"
    path.write_text(text)
    out = tmp_path / "run"
    code, _, err = run_cli(distill_flags(ws, out, "--config", path), capsys)
    assert_one_line_error(code, err, *fragments)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["run.toml"]


# ----------------------------------------------------------------------------- resuming

@pytest.fixture(scope="module")
def finished_run(ws, tmp_path_factory):
    """A finished one-iteration run: checkpoint.safetensors at iteration 1, the previous at 0."""
    run = tmp_path_factory.mktemp("finished") / "run"
    from ld3m_fast.distill.config import DistillConfig

    start_run(DistillConfig(data=str(ws / "data"), prior=str(ws / "prior"), ipc=1, steps=2, guidance=1.0,
                            res=16, width=8, batch_real=4, iterations=1, progress=False,
                            cache_dir=str(ws / "cache"), max_per_class=4, out=str(run), threads=1))
    return run


def edit_config(change):
    def damage(run):
        values = json.loads((run / "config.json").read_text())
        change(values)
        (run / "config.json").write_text(json.dumps(values))
    return damage


def edit_checkpoints(change_tensors=None, change_metadata=None):
    """Rewrite both checkpoints (the newest and the previous) with their tensors or metadata changed."""
    def damage(run):
        for name in (CHECKPOINT, PREVIOUS):
            with safe_open(str(run / name), framework="pt") as f:
                metadata = f.metadata()
            tensors = load_file(run / name)
            if change_tensors is not None:
                change_tensors(tensors)
            if change_metadata is not None:
                change_metadata(metadata)
            save_file(tensors, run / name, metadata=metadata)
    return damage


def _poison(key, value):
    def change(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value
    return change


def _retype(key, dtype):
    def change(tensors):
        tensors[key] = tensors[key].to(dtype)
    return change


def _reshape(key):
    def change(tensors):
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:], dtype=tensors[key].dtype)
    return change


def _remove_files(*names):
    def damage(run):
        for name in names:
            (run / name).unlink()
    return damage


def _newest_only(change_tensors):
    """Damage the newest checkpoint's momentum (the previous one, of iteration 0, has none yet) and
    remove the previous one, so nothing usable is left."""
    def damage(run):
        (run / PREVIOUS).unlink()
        tensors = load_file(run / CHECKPOINT)
        with safe_open(str(run / CHECKPOINT), framework="pt") as f:
            metadata = f.metadata()
        change_tensors(tensors)
        save_file(tensors, run / CHECKPOINT, metadata=metadata)
    return damage


def _truncate_checkpoints(run):
    for name in (CHECKPOINT, PREVIOUS):
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[: len(data) // 2])


def resume(*extra):
    return lambda run: ["distill", "--resume", run, *extra]


# (name, damage applied to a copy of the finished run or None, argv from the run, fragments)
RUN_CASES = [
    ("existing non-empty out", None, lambda run: distill_flags(run.parent.parent, run),
     ["already exists and is not empty", "--resume"]),
    ("resume changes ipc", None, resume("--ipc", 2), ["cannot change ipc"]),
    ("resume changes the algorithm", None, resume("--algorithm", "dc"), ["cannot change algorithm"]),
    ("resume changes eta", None, resume("--eta", 0.5), ["cannot change eta"]),
    ("resume with a bad type", None, resume("--iterations", "x"), ["expected an integer"]),
    ("resume zero threads", None, resume("--threads", 0), ["--threads must be >= 1"]),
    ("resume 10000 threads", None, resume("--threads", 10000), ["--threads 10000 is more than"]),
    ("resume lr zero", None, resume("--lr-latent", 0), ["--lr-latent must be > 0"]),
    ("resume lr nan", None, resume("--lr-class", "nan"), ["finite number"]),
    ("resume iterations 0 on a finished run", None, resume("--iterations", 0),
     ["--iterations 0 is below the 1 iterations the run has done", "cannot go back"]),
    ("resume unknown preset", None, resume("--preset", "ld3m-nope"), ["ld3m-nope"]),
    ("config.json edited dm to dc", edit_config(lambda c: c.update(algorithm="dc")), resume(),
     ["config.json does not match its checkpoint", "algorithm is 'dc' in config.json but 'dm'"]),
    ("config.json without steps", edit_config(lambda c: c.pop("steps")), resume(),
     ["steps is 10 in config.json but 2 in the checkpoint"]),
    ("config.json edited ipc", edit_config(lambda c: c.update(ipc=2)), resume(), ["ipc is 2 in config.json"]),
    ("config.json edited guidance", edit_config(lambda c: c.update(guidance=3.0)), resume(),
     ["guidance is 3.0 in config.json"]),
    ("config.json edited seed", edit_config(lambda c: c.update(seed=7)), resume(), ["seed is 7 in config.json"]),
    ("config.json wrong type", edit_config(lambda c: c.update(ipc="three")), resume(),
     ["ipc in", "must be an integer"]),
    ("config.json unknown key", edit_config(lambda c: c.update(speed=3)), resume(), ["unknown key 'speed'"]),
    ("config.json not json", lambda run: (run / "config.json").write_text("{"), resume(), ["cannot read"]),
    ("config.json a list", lambda run: (run / "config.json").write_text("[]"), resume(),
     ["is not an ld3m-fast run config"]),
    ("run.json missing", _remove_files("run.json"), resume(), ["has no run.json"]),
    ("run.json garbage", lambda run: (run / "run.json").write_text("{"), resume(), ["cannot read"]),
    ("checkpoints missing", _remove_files(CHECKPOINT, PREVIOUS), resume(), ["has no checkpoint.safetensors"]),
    ("checkpoints truncated", _truncate_checkpoints, resume(), ["corrupt", "no usable checkpoint is left"]),
    ("checkpoint of another run", edit_checkpoints(change_metadata=lambda m: m.update(run_id="0" * 32)), resume(),
     ["belongs to another run"]),
    ("checkpoint format", edit_checkpoints(change_metadata=lambda m: m.update(format="other")), resume(),
     ["not an ld3m-fast checkpoint"]),
    ("checkpoint iteration -5", edit_checkpoints(change_metadata=lambda m: m.update(iteration="-5")), resume(),
     ["its iteration -5 is outside [0, 1]"]),
    ("checkpoint iteration 999999", edit_checkpoints(change_metadata=lambda m: m.update(iteration="999999")),
     resume(), ["its iteration 999999 is outside [0, 1]"]),
    ("checkpoint iteration a word", edit_checkpoints(change_metadata=lambda m: m.update(iteration="ten")), resume(),
     ["corrupt"]),
    ("checkpoint config edited", edit_checkpoints(change_metadata=lambda m: m.update(
        config=json.dumps({**json.loads(m["config"]), "skip": "mean"}))), resume(),
     ["skip is 'x0' in config.json but 'mean' in the checkpoint"]),
    ("checkpoint Z NaN", edit_checkpoints(_poison("Z", float("nan"))), resume(), ["Z holds NaN or inf"]),
    ("checkpoint c inf", edit_checkpoints(_poison("c", float("inf"))), resume(), ["c holds NaN or inf"]),
    ("checkpoint momentum NaN", _newest_only(_poison("optimizer.0.momentum_buffer", float("nan"))), resume(),
     ["optimizer.0.momentum_buffer holds NaN or inf"]),
    ("checkpoint Z float64", edit_checkpoints(_retype("Z", torch.float64)), resume(), ["Z is float64, expected float32"]),
    ("checkpoint c float16", edit_checkpoints(_retype("c", torch.float16)), resume(), ["c is float16"]),
    ("checkpoint labels float", edit_checkpoints(_retype("labels", torch.float32)), resume(),
     ["labels is float32, expected int64"]),
    ("checkpoint Z shape", edit_checkpoints(_reshape("Z")), resume(), ["does not fit this run: Z is"]),
    ("checkpoint momentum shape", _newest_only(_reshape("optimizer.1.momentum_buffer")), resume(),
     ["optimizer.1.momentum_buffer is"]),
    ("checkpoint without c", edit_checkpoints(lambda t: t.pop("c")), resume(), ["c is missing"]),
]


@pytest.mark.parametrize("name, damage, make_argv, fragments", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_bad_use_of_an_existing_run_is_one_line(finished_run, tmp_path, capsys, name, damage, make_argv, fragments):
    run = finished_run
    if damage is not None:
        run = tmp_path / "copy"
        shutil.copytree(finished_run, run)
        damage(run)
    before = files_under(run)
    code, _, err = run_cli(make_argv(run), capsys)
    assert_one_line_error(code, err, *fragments)
    assert files_under(run) == before  # nothing of the run was touched
