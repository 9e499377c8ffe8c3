"""One line for every bad setting or run folder: exit code 2, no traceback, nothing half-written.

The prior and data halves of the table are in tests/test_bad_inputs_prior_data.py. Every
case runs `ld3m-fast ...` in this process (`run_cli`), which is what a user's shell runs.
"""
import json

import pytest

from ld3m_fast.distill.run import start_run

from _workspace import assert_one_line_error, distill_flags, make_workspace, run_cli


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = make_workspace(tmp_path_factory.mktemp("badrun"))
    (root / "a-file").write_text("not a folder\n")
    (root / "not-a-run").mkdir()
    return root


def embedded(out, *extra):
    """`distill` on the embedded default prior (its checks of --res come before any data is read)."""
    return ["distill", "--out", out, "--threads", "1", "--no-progress", "--iterations", "1", *extra]


# (name, how to build argv from (ws, out, tmp_path), fragments of the one error line)
FLAG_CASES = [
    ("ipc word", lambda ws, out, t: distill_flags(ws, out, "--ipc", "three"), ["--ipc", "expected an integer"]),
    ("ipc zero", lambda ws, out, t: distill_flags(ws, out, "--ipc", 0), ["--ipc must be >= 1"]),
    ("steps zero", lambda ws, out, t: distill_flags(ws, out, "--steps", 0), ["--steps must be >= 1"]),
    ("iterations float", lambda ws, out, t: distill_flags(ws, out, "--iterations", 2.5), ["expected an integer"]),
    ("iterations negative", lambda ws, out, t: distill_flags(ws, out, "--iterations", -1), [">= 0"]),
    ("algorithm", lambda ws, out, t: distill_flags(ws, out, "--algorithm", "gm"), ["unknown --algorithm 'gm'"]),
    ("skip", lambda ws, out, t: distill_flags(ws, out, "--skip", "both"), ["unknown --skip"]),
    ("grad mode", lambda ws, out, t: distill_flags(ws, out, "--grad-mode", "fast"), ["unknown --grad-mode"]),
    ("chunk word", lambda ws, out, t: distill_flags(ws, out, "--chunk", "many"), ["'auto'"]),
    ("chunk zero", lambda ws, out, t: distill_flags(ws, out, "--chunk", 0), ["--chunk must be >= 1 or auto"]),
    ("dtype", lambda ws, out, t: distill_flags(ws, out, "--dtype", "fp8"), ["unknown --dtype 'fp8'"]),
    ("eta negative", lambda ws, out, t: distill_flags(ws, out, "--eta", -0.5), ["--eta must be >= 0"]),
    ("lr word", lambda ws, out, t: distill_flags(ws, out, "--lr-latent", "big"), ["expected a number"]),
    ("lr nan", lambda ws, out, t: distill_flags(ws, out, "--lr-latent", "nan"), ["finite number"]),
    ("guidance inf", lambda ws, out, t: distill_flags(ws, out, "--guidance", "inf"), ["finite number"]),
    ("save every zero", lambda ws, out, t: distill_flags(ws, out, "--save-every", 0), ["--save-every must be >= 1"]),
    ("save seconds negative", lambda ws, out, t: distill_flags(ws, out, "--save-seconds", -1), [">= 0"]),
    ("threads zero", lambda ws, out, t: distill_flags(ws, out, "--threads", 0), ["--threads must be >= 1"]),
    ("device", lambda ws, out, t: distill_flags(ws, out, "--device", "tpu"), ["unknown --device 'tpu'"]),
    ("cuda missing", lambda ws, out, t: distill_flags(ws, out, "--device", "cuda"), ["no CUDA device"]),
    ("norm", lambda ws, out, t: distill_flags(ws, out, "--norm", "group"), ["unknown --norm 'group'"]),
    ("dsa", lambda ws, out, t: distill_flags(ws, out, "--dsa", "color_blur"), ["--dsa"]),
    ("depth too deep", lambda ws, out, t: distill_flags(ws, out, "--depth", 9), ["depth 9 does not fit"]),
    ("eval archs", lambda ws, out, t: distill_flags(ws, out, "--eval-every", 1, "--eval-archs", "lenet"),
     ["unknown architecture 'lenet'"]),
    ("memory budget", lambda ws, out, t: distill_flags(ws, out, "--chunk", "auto", "--memory-budget", "lots"),
     ["cannot read the --memory-budget"]),
    ("mtt without buffer", lambda ws, out, t: distill_flags(ws, out, "--algorithm", "mtt"), ["needs --buffer"]),
    ("mtt missing buffer", lambda ws, out, t: distill_flags(ws, out, "--algorithm", "mtt", "--buffer", t / "nope"),
     ["nope"]),
    ("max per class zero", lambda ws, out, t: distill_flags(ws, out, "--max-per-class", 0), [">= 1"]),
    ("ipc above the data", lambda ws, out, t: distill_flags(ws, out, "--ipc", 5), ["at least 5 images per class"]),
    ("res not a multiple", lambda ws, out, t: distill_flags(ws, out, "--res", 18), ["latent factor 4"]),
    ("unknown flag", lambda ws, out, t: distill_flags(ws, out, "--learning-rate", 1), ["unrecognized arguments"]),
    ("out is under a file", lambda ws, out, t: distill_flags(ws, ws / "a-file" / "run"), ["cannot create run folder"]),
    ("out unwritable", lambda ws, out, t: distill_flags(ws, "/proc/ld3m-run"), ["cannot create run folder"]),
    ("resume missing", lambda ws, out, t: ["distill", "--resume", t / "nope"], ["does not exist"]),
    ("resume not a run", lambda ws, out, t: ["distill", "--resume", ws / "not-a-run"], ["not an ld3m-fast run folder"]),
    ("config missing", lambda ws, out, t: distill_flags(ws, out, "--config", t / "nope.toml"), ["does not exist"]),
]
# --res values the embedded prior's denoiser cannot take (latents of 2, 3, 5, 6, 7 pixels)
FLAG_CASES += [(f"res {res} on the embedded prior", lambda ws, out, t, res=res: embedded(out, "--res", res),
                [f"--res {res}", "divisible by 4"]) for res in (8, 12, 20, 24, 28)]

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
]


@pytest.mark.parametrize("name, make_argv, fragments", FLAG_CASES, ids=[c[0] for c in FLAG_CASES])
def test_bad_flag_is_one_line(ws, tmp_path, capsys, name, make_argv, fragments):
    out = tmp_path / "run"
    code, _, err = run_cli(make_argv(ws, out, tmp_path), capsys)
    assert_one_line_error(code, err, *fragments)
    assert not out.exists()


@pytest.mark.parametrize("name, text, fragments", TOML_CASES, ids=[c[0] for c in TOML_CASES])
def test_bad_config_file_is_one_line(ws, tmp_path, capsys, name, text, fragments):
    path = tmp_path / "run.toml"
    path.write_text(text)
    out = tmp_path / "run"
    code, _, err = run_cli(distill_flags(ws, out, "--config", path), capsys)
    assert_one_line_error(code, err, *fragments)
    assert not out.exists()


@pytest.fixture(scope="module")
def finished_run(ws, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    from ld3m_fast.distill.config import DistillConfig

    start_run(DistillConfig(data=str(ws / "data"), prior=str(ws / "prior"), ipc=1, steps=2, guidance=1.0,
                            res=16, width=8, batch_real=4, iterations=1, progress=False,
                            cache_dir=str(ws / "cache"), max_per_class=4, out=str(run), threads=1),
              log=lambda *a: None)
    return run


RUN_CASES = [
    ("existing non-empty out", lambda run: distill_flags(run.parent.parent, run), ["already exists and is not empty",
                                                                                   "--resume"]),
    ("resume changes ipc", lambda run: ["distill", "--resume", run, "--ipc", 2], ["cannot change ipc"]),
    ("resume with a bad type", lambda run: ["distill", "--resume", run, "--iterations", "x"], ["expected an integer"]),
    ("resume zero threads", lambda run: ["distill", "--resume", run, "--threads", 0], ["--threads must be >= 1"]),
]


@pytest.mark.parametrize("name, make_argv, fragments", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_bad_use_of_an_existing_run_is_one_line(finished_run, capsys, name, make_argv, fragments):
    before = {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file() and p.name != ".lock"}
    code, _, err = run_cli(make_argv(finished_run), capsys)
    assert_one_line_error(code, err, *fragments)
    after = {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # nothing of the run was touched


def test_a_damaged_run_config_is_one_line(finished_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    (run / "config.json").write_text(json.dumps({"ipc": "three"}))
    code, _, err = run_cli(["distill", "--resume", run], capsys)
    assert_one_line_error(code, err, "ipc in", "must be an integer")


def test_the_table_is_large():
    assert len(FLAG_CASES) + len(TOML_CASES) + len(RUN_CASES) + 1 >= 30
