"""benchmarks/gpu_check.py, the GPU check kit, run here as its --cpu-smoke: the same code at tiny
size on CPU must write the whole report (every plan with a planner prediction and a measured
peak), record a failing part or plan instead of crashing, and skip what the deadline leaves out."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "benchmarks" / "gpu_check.py"
PLANS = ["released", "ours: recompute", "ours: stored steps + decoder pieces", "ours: planner's choice"]


@pytest.fixture(scope="module")
def kit():
    """The kit as a module (benchmarks/ is no package); registered while in use, as dataclasses need."""
    spec = importlib.util.spec_from_file_location("gpu_check_kit", KIT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One --cpu-smoke run as a GPU session would start it: the script, in its own process."""
    out = tmp_path_factory.mktemp("smoke")
    env = {k: v for k, v in os.environ.items() if k != "LD3M_FAST_BACKEND"}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([sys.executable, str(KIT), "--cpu-smoke", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    return report, out, done.stdout


def test_smoke_report_names_device_versions_and_parts(smoke):
    report, out, stdout = smoke
    assert report["mode"] == "cpu-smoke"
    meta = report["meta"]
    assert meta["device_type"] == "cpu" and meta["device"].startswith("CPU")
    for key in ("torch", "triton", "diffusers", "xformers", "python"):
        assert meta[key], key
    assert set(meta["backend_here"]) == {"ld3m_step", "trajectory_matching_distance"}
    assert {name: part["status"] for name, part in report["parts"].items()} == \
        {"tests": "ok", "iteration": "ok", "attention": "ok"}
    assert meta["device"] in stdout.splitlines()[0]
    for name in ("gpu_check.json", "gpu_check.md", "gpu_tier_pytest.log", "gpu_tier_junit.xml"):
        assert (out / name).is_file(), name


def test_smoke_checks_the_gpu_selection(smoke):
    part = smoke[0]["parts"]["tests"]
    assert "tests/test_gpu_tier.py" in part["files"] and "tests/test_ld3m_step.py" in part["files"]
    assert part["selected"] > 0 and part["skipped"] == part["selected"] and part["passed"] == 0
    assert part["deselected"] > 0 and part["returncode"] == 0
    assert all("CUDA" in reason for reason in part["skip_reasons"])
    assert "-m gpu" in part["command"] and "TRITON_INTERPRET=0" in part["command"]


def test_smoke_every_plan_has_a_prediction_and_a_measured_peak(smoke):
    part = smoke[0]["parts"]["iteration"]
    assert [row["name"] for row in part["plans"]] == PLANS
    for row in part["plans"]:
        assert row["status"] == "ok", row
        assert row["prediction"]["peak_bytes"] > 0 and row["prediction"]["method"]
        assert row["measured_peak_bytes"] > 0
        assert "live-storage tracker" in row["measured_method"]
        # The planner walks the same iteration the kit builds: its peak is the tracker's to within
        # what its interpolation between stored-step counts adds.
        assert 0.75 < row["measured_over_predicted"] < 1.33, row
        assert row["seconds_per_iteration"] > 0 and len(row["timed_s"]) >= 1 and row["warmup_s"] > 0
        assert row["time_vs_released"] > 0 and row["peak_vs_released"] > 0
    released, recompute, stored, choice = part["plans"]
    assert released["time_vs_released"] == 1.0
    assert released["walk"]["grad_mode"] == "released" and released["walk"]["checkpoint_attention"] == "on"
    assert released["walk"]["micro_batch"] is None
    assert recompute["walk"]["grad_mode"] == "recompute" and not recompute["walk"]["store_steps"]
    assert stored["walk"]["store_steps"] == 1 and stored["walk"]["decoder_chunk"] == 1
    assert stored["walk"]["sac_min_flops"] is not None
    assert choice["prediction"]["source"].startswith("computed during this run")
    assert choice["prediction"]["walk"] == choice["walk"]


def test_smoke_attention_times_sdpa_and_says_why_not_xformers(smoke):
    part = smoke[0]["parts"]["attention"]
    assert [side["side"] for side in part["sides"]] == ["sdpa"]
    assert "AttnProcessor" in part["sides"][0]["processors"] and part["sides"][0]["seconds"] > 0
    assert "CUDA only" in part["xformers"]


def test_smoke_markdown_shows_every_part_and_plan(smoke):
    report, out, _ = smoke
    text = (out / "gpu_check.md").read_text()
    assert report["meta"]["device"] in text
    for title in ("## 1. GPU-tier tests — ok", "## 2. One full iteration per plan — ok",
                  "## 3. Attention: SDPA against xformers — ok"):
        assert title in text
    for name in PLANS:
        assert f"| {name} |" in text
    assert "live-storage tracker" in text and "computed during this run" in text


def test_failing_part_and_plan_are_recorded_and_the_rest_runs(kit, smoke, tmp_path, monkeypatch):
    """The smoke run's predictions file is reused; one plan and the attention part are made to fail."""
    predictions = smoke[1] / "planner_predictions.json"
    build = kit.build_iteration

    def planted(walk, *args, **kwargs):
        config = walk.config
        if config.grad_mode == "recompute" and not config.store_steps and config.decoder_chunk is None:
            raise RuntimeError("planted plan failure")
        return build(walk, *args, **kwargs)

    def broken_attention(ctx, part):
        raise RuntimeError("planted attention failure")

    monkeypatch.setattr(kit, "build_iteration", planted)
    monkeypatch.setattr(kit, "attention_part", broken_attention)
    rc = kit.main(["--cpu-smoke", "--out", str(tmp_path), "--parts", "iteration,attention",
                   "--predictions", str(predictions), "--planner-workers", "0"])
    assert rc == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    attention, iteration = report["parts"]["attention"], report["parts"]["iteration"]
    assert attention["status"] == "failed" and "planted attention failure" in attention["error"]
    assert iteration["status"] == "failed" and "ours: recompute" in iteration["error"]
    assert iteration["predictions_source"].startswith(str(predictions))
    rows = {row["name"]: row for row in iteration["plans"]}
    assert rows["ours: recompute"]["status"] == "failed"
    assert "planted plan failure" in rows["ours: recompute"]["error"]
    assert rows["ours: recompute"]["prediction"]["peak_bytes"] > 0  # predicted even so
    for name in ("released", "ours: stored steps + decoder pieces", "ours: planner's choice"):
        assert rows[name]["status"] == "ok" and rows[name]["measured_peak_bytes"] > 0
        assert rows[name]["prediction"]["source"].startswith("precomputed on CPU")
    text = (tmp_path / "gpu_check.md").read_text()
    assert "3. Attention: SDPA against xformers — failed" in text and "planted attention failure" in text
    assert "planted plan failure" in text


def test_deadline_skips_parts_with_a_note(kit, tmp_path):
    rc = kit.main(["--cpu-smoke", "--out", str(tmp_path), "--deadline", "0", "--parts", "tests,attention"])
    assert rc == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    for name in ("tests", "attention"):
        assert report["parts"][name]["status"] == "skipped"
        assert "deadline" in report["parts"][name]["note"]
    assert "— skipped" in (tmp_path / "gpu_check.md").read_text()


def test_predictions_file_is_used_only_when_it_fits_this_run(kit, smoke, tmp_path):
    good = json.loads((smoke[1] / "planner_predictions.json").read_text())
    path = tmp_path / "p.json"

    def load(data, device_bytes=2**40):
        path.write_text(json.dumps(data))
        return kit.load_predictions(path, kit.CPU_SMOKE, device_bytes)

    assert load(good)[0] == good
    assert load(dict(good, fingerprint="0" * 16)) == (None, f"--predictions {path} was made from other "
                                                          "sources: computed during this run")
    assert load(dict(good, scale="gpu"))[0] is None
    assert "more than this device" in load(good, device_bytes=good["budget_bytes"] - 1)[1]
    assert kit.load_predictions(None, kit.CPU_SMOKE, 2**40)[0] is None


def test_gpu_run_needs_cuda(kit, tmp_path):
    if kit.torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    with pytest.raises(SystemExit, match="no CUDA device"):
        kit.main(["--out", str(tmp_path)])


def test_gpu_test_files_are_the_marked_ones(kit):
    names = [p.name for p in kit.gpu_test_files()]
    assert {"test_ld3m_step.py", "test_tm_distance.py", "test_gpu_tier.py"} <= set(names)
    assert "test_gpu_check.py" not in names and "conftest.py" not in names
