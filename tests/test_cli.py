"""The CLI in a subprocess: bad input is one line and exit code 2; buffer -> distill -> eval works."""
import json

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from ld3m_fast import build_tiny_prior, save_prior

from _workspace import RES as _RES
from _workspace import assert_one_line_error, cli_process, write_image_folder

RES = str(_RES)


def cli(*args, cwd=None):
    """`python -m ld3m_fast.cli.main ARGS` in a child process, no deadline (a busy machine is only slower)."""
    return cli_process(*args, cwd=cwd)


def assert_user_error(result, *fragments):
    assert_one_line_error(result.returncode, result.stderr, *fragments)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_prior(build_tiny_prior(num_classes=10, image_size=int(RES), seed=0), root / "prior")
    (root / "not-a-prior").mkdir()
    (root / "imagenet" / "train" / "n01440764").mkdir(parents=True)
    write_image_folder(root / "folder" / "train", 3, 4, seed=0)
    write_image_folder(root / "folder" / "test", 3, 3, seed=1)
    return root


def distill_args(ws, out, *extra):
    return ["distill", "--prior", ws / "prior", "--res", RES, "--ipc", "1", "--steps", "2",
            "--guidance", "1", "--width", "8", "--batch-real", "4", "--max-per-class", "4",
            "--cache-dir", ws / "cache", "--out", out, "--no-progress", *extra]


def test_missing_data_folder(ws, tmp_path):
    assert_user_error(cli(*distill_args(ws, tmp_path / "run", "--data", tmp_path / "nope")), "does not exist")
    assert not (tmp_path / "run").exists()


def test_unknown_subset(ws, tmp_path):
    assert_user_error(cli(*distill_args(ws, tmp_path / "run", "--data", ws / "imagenet", "--subset", "nope")),
                      "unknown subset")
    assert not (tmp_path / "run").exists()


def test_too_few_images_for_ipc(ws, tmp_path):
    result = cli(*distill_args(ws, tmp_path / "run", "--ipc", "5"))
    assert_user_error(result, "5 images per class")
    assert not (tmp_path / "run").exists()


def test_res_not_a_multiple_of_the_latent_factor(ws, tmp_path):
    assert_user_error(cli(*distill_args(ws, tmp_path / "run", "--res", "18")), "latent factor 4")
    assert not (tmp_path / "run").exists()


def test_missing_and_mismatched_prior(ws, tmp_path):
    args = distill_args(ws, tmp_path / "run")
    args[args.index("--prior") + 1] = tmp_path / "missing"
    assert_user_error(cli(*args), "does not exist")
    args[args.index("--prior") + 1] = ws / "not-a-prior"
    assert_user_error(cli(*args), "not an ld3m-fast prior")
    assert not (tmp_path / "run").exists()


def test_unknown_config_key(ws, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('ipc = 1\nlearning_rate = 3\n')
    assert_user_error(cli(*distill_args(ws, tmp_path / "run", "--config", bad)), "learning_rate")
    assert not (tmp_path / "run").exists()


def test_nan_loss_stops_and_keeps_checkpoint(ws, tmp_path):
    run = tmp_path / "run"
    result = cli(*distill_args(ws, run, "--data", ws / "folder", "--lr-latent", "1e38", "--iterations", "5",
                               "--save-every", "1"))
    assert_user_error(result, "at iteration", "last good checkpoint")
    with safe_open(str(run / "checkpoint.safetensors"), framework="pt") as f:
        kept = int(f.metadata()["iteration"])
        finite = all(f.get_tensor(k).isfinite().all() for k in ("Z", "c"))
    assert f"checkpoint (iteration {kept})" in result.stderr and f"at iteration {kept + 1}" in result.stderr
    assert finite and not (run / "final").exists()


def test_end_to_end_buffer_distill_eval_then_bad_buffer_and_corrupt_resume(ws, tmp_path):
    buffer, run = tmp_path / "buffer", tmp_path / "run"
    data = ws / "folder"
    result = cli("buffer", "--data", data, "--res", RES, "--out", buffer, "--experts", "1", "--width", "8",
                 "--batch", "20", "--max-start-epoch", "2", "--expert-epochs", "1", "--max-per-class", "4",
                 "--cache-dir", ws / "cache")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(load_file(buffer / "expert_0000.safetensors")["epochs"]) == 4  # epochs 0..3

    config = tmp_path / "run.toml"
    config.write_text('algorithm = "mtt"\niterations = 99\nsyn-steps = 2\nexpert_epochs = 1\n')
    result = cli(*distill_args(ws, run, "--data", data, "--config", config, "--buffer", buffer,
                               "--iterations", "2"))
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((run / "config.json").read_text())
    assert saved["iterations"] == 2 and saved["algorithm"] == "mtt" and saved["syn_steps"] == 2  # flags win
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run / "final" / "images.png").is_file()

    result = cli("eval", run, "--archs", "convnet,alexnet", "--epochs", "2", "--seeds", "1",
                 "--max-per-class", "4", "--batch", "16")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((run / "eval.json").read_text())
    assert set(report["per_arch"]) == {"convnet", "alexnet"}
    assert 0.0 <= report["unseen_mean"] <= 1.0 and "alexnet" in result.stdout

    # A buffer that does not fit the student names the mismatched field.
    result = cli(*distill_args(ws, tmp_path / "run2", "--data", data, "--algorithm", "mtt", "--buffer", buffer,
                               "--width", "16", "--expert-epochs", "1", "--iterations", "1"))
    assert_user_error(result, "width (buffer 8, student 16)")
    assert not (tmp_path / "run2").exists()

    # Damaged checkpoints (the newest and the one before it) are a clear error on resume.
    for name in ("checkpoint.safetensors", "checkpoint.previous.safetensors"):
        checkpoint = run / name
        checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    assert_user_error(cli("distill", "--resume", run, "--iterations", "3", "--no-progress"), "corrupt")


def test_embedded_default_runs_without_arguments(tmp_path):
    """`ld3m-fast distill` alone uses the shipped prior and Fashion-MNIST (here cut to 2 iterations)."""
    result = cli("distill", "--iterations", "2", "--no-progress", "--cache-dir", tmp_path / "cache",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "embedded default prior" in result.stdout
    (run,) = (tmp_path / "runs").iterdir()
    config = json.loads((run / "config.json").read_text())
    assert config["algorithm"] == "dm" and config["batch_real"] == 64 and config["iterations"] == 2
    assert (run / "final" / "images.png").is_file() and (run / "final" / "synthetic.safetensors").is_file()
    assert str(run.name) in result.stdout


def test_plan_command_on_a_prior_folder(ws, tmp_path):
    result = cli("plan", "--prior", ws / "prior", "--res", RES, "--ipc", "1", "--classes", "2",
                 "--steps", "2", "--store-steps", "0", "--memory-budget", "4GiB", "--json", tmp_path / "plan.json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "choice: --chunk" in result.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert set(plan) >= {"setting", "candidates", "choice", "released"}
    setting = plan["setting"]
    assert setting["res"] == int(RES) and setting["budget_bytes"] == 4 * 2**30
    # The default reserve (1 GiB + 5%) is left out of the budget; the plan fills what is usable.
    assert setting["reserve_bytes"] == int(2**30 + 0.05 * 4 * 2**30)
    assert setting["usable_bytes"] == setting["budget_bytes"] - setting["reserve_bytes"]
    keys = {"mode", "chunk", "decoder_chunk", "micro_batch", "dtype", "peak_bytes", "flops", "fits"}
    assert plan["candidates"] and all(keys <= set(c) for c in plan["candidates"])
    assert {c["dtype"] for c in plan["candidates"]} == {"fp32"} and setting["config"]["store_steps"] == 0
    choice = {k: v for k, v in plan["choice"].items() if k != "flags"}
    assert choice in plan["candidates"] and choice["fits"] and choice["peak_bytes"] <= setting["usable_bytes"]
    assert plan["choice"]["flags"].startswith("--chunk ")
    assert {"chunk", "peak_bytes", "flops"} <= set(plan["released"])


def test_chunk_auto_compile_bf16_profile_end_to_end(ws, tmp_path):
    """--compile with aot_eager traces every module and our ops (inductor's C++ codegen takes
    minutes on this CPU, so it is left to real runs)."""
    out = tmp_path / "run"
    result = cli(*distill_args(ws, out, "--data", ws / "folder", "--iterations", "2", "--chunk", "auto",
                               "--memory-budget", "2GiB", "--compile", "--compile-backend", "aot_eager",
                               "--dtype", "bf16", "--profile", "1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--chunk auto: --chunk" in result.stdout
    assert json.loads((out / "config.json").read_text())["chunk"] == "auto"
    assert list((out / "profile").glob("*.pt.trace.json"))
    assert (out / "final" / "synthetic.safetensors").is_file()


def test_chunk_rejects_words_other_than_auto(ws, tmp_path):
    result = cli(*distill_args(ws, tmp_path / "run", "--chunk", "many"))
    assert result.returncode == 2 and "auto" in result.stderr
