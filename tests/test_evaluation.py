"""Evaluation: the weight average that gets tested, the schedule, jobs and their report, the
sets it reads (run folders, image folders, safetensors), the baselines, and the CLI."""
import itertools
import json
import re

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from _workspace import assert_one_line_error, run_cli, write_image_folder
from ld3m_fast.cli.evaluate import parse_full_real
from ld3m_fast.data import ImageSet
from ld3m_fast.distill.algorithms import stream_generator
from ld3m_fast.distill.evaluation import (
    DEFAULT_POOL,
    PROTOCOLS,
    Calibration,
    EvalConfig,
    EvalJob,
    EvalSet,
    calibrate,
    check_eval_set,
    corrected_ema_update,
    estimate_seconds,
    evaluate_synthetic,
    format_markdown,
    format_report,
    gather,
    plan_jobs,
    protocol_config,
    random_real_indices,
    random_real_set,
    read_image_folder_set,
    read_safetensors_set,
    run_job,
    warmup_cosine,
    with_random_real_baselines,
)
from ld3m_fast.errors import LD3MError
from ld3m_fast.normalization import from_uint8


class WithCounter(nn.Module):
    """A parameter plus an integer buffer, like BatchNorm's num_batches_tracked."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))


def averaged_over(iterates, decay, multi_avg_fn=None):
    model = WithCounter()
    average = AveragedModel(model, multi_avg_fn=multi_avg_fn or corrected_ema_update(decay), use_buffers=True)
    for step, value in enumerate(iterates, start=1):
        with torch.no_grad():
            model.weight.copy_(value)
            model.steps.fill_(step)
        average.update_parameters(model)
    return average.module


def explicit_corrected_ema(iterates, decay):
    n = len(iterates)
    weights = torch.tensor([decay ** (n - k) for k in range(1, n + 1)], dtype=torch.float64)
    return (weights[:, None] * torch.stack(iterates)).sum(0) / weights.sum()


@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_corrected_ema_is_the_normalised_exponential_average(n):
    generator = torch.Generator().manual_seed(n)
    iterates = [torch.randn(3, dtype=torch.float64, generator=generator) for _ in range(n)]
    average = averaged_over(iterates, 0.995)
    torch.testing.assert_close(average.weight.detach(), explicit_corrected_ema(iterates, 0.995))
    assert int(average.steps) == n  # integer buffers follow the network instead of being averaged


def test_short_schedule_forgets_the_first_weights_that_a_plain_ema_keeps():
    # 50 steps from weights 0 to weights 1: the plain EMA keeps 0.995^49 = 78% of the start.
    iterates = [torch.full((3,), float(k > 0), dtype=torch.float64) for k in range(50)]
    corrected = averaged_over(iterates, 0.995).weight.detach()
    assert torch.all(corrected > 0.97)
    plain = averaged_over(iterates, 0.995, multi_avg_fn=get_ema_multi_avg_fn(0.995)).weight.detach()
    assert torch.all(plain < 0.25)


def test_long_schedule_is_the_plain_ema():
    generator = torch.Generator().manual_seed(0)
    iterates = [torch.randn(3, dtype=torch.float64, generator=generator) for _ in range(1500)]
    plain = iterates[0].clone()
    for value in iterates[1:]:
        plain = 0.995 * plain + 0.005 * value
    corrected = averaged_over(iterates, 0.995).weight.detach()
    # they differ by the start's leftover share, 0.995^1499 < 6e-4 of the scale
    torch.testing.assert_close(corrected, plain, atol=2e-3, rtol=0)


def test_warmup_cosine_rises_then_decays_to_zero():
    factor = warmup_cosine(100, 10)
    assert factor(0) == pytest.approx(0.1)
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    values = [factor(step) for step in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert factor(100) == pytest.approx(0.0, abs=1e-12)


def separable_set(n_per_class, res, generator):
    """Two classes told apart by the sign of the mean brightness: a set any network learns."""
    labels = torch.arange(2).repeat_interleave(n_per_class)
    images = torch.randn(2 * n_per_class, 3, res, res, generator=generator) * 0.3
    images += (labels.float() * 2 - 1)[:, None, None, None]
    return images, labels


def to_uint8(images):
    return ((images.clamp(-2, 2) + 2) / 4 * 255).round().to(torch.uint8)


def test_evaluate_synthetic_learns_a_separable_set_deterministically():
    generator = torch.Generator().manual_seed(0)
    images, labels = separable_set(8, 8, generator)
    test_images, test_labels = separable_set(32, 8, generator)
    config = EvalConfig(archs=("convnet",), seeds=2, epochs=30, lr=0.01, width=8, depth=2, dsa_strategy=None)
    train = from_uint8(to_uint8(images))
    first = evaluate_synthetic(train, labels, to_uint8(test_images), test_labels, num_classes=2, config=config)
    again = evaluate_synthetic(train, labels, to_uint8(test_images), test_labels, num_classes=2, config=config)
    assert first == again
    assert first["per_arch"]["convnet"]["mean"] > 0.9
    assert len(first["per_arch"]["convnet"]["accuracies"]) == 2
    assert first["unseen_mean"] is None


def test_evaluate_synthetic_rejects_a_resolution_mismatch():
    images = torch.zeros(2, 3, 8, 8)
    with pytest.raises(LD3MError, match="load the test split at the run's --res"):
        evaluate_synthetic(images, torch.tensor([0, 1]), torch.zeros(2, 3, 16, 16, dtype=torch.uint8),
                           torch.tensor([0, 1]), num_classes=2, config=EvalConfig(archs=("convnet",), seeds=1))


# ----------------------------------------------------------------------------- jobs and reports

def tiny_config(**changes):
    base = dict(archs=("convnet", "alexnet"), seeds=2, epochs=2, lr=0.01, width=8, depth=2, batch_size=8,
                dsa_strategy="color_crop_cutout_flip_scale_rotate")
    return EvalConfig(**{**base, **changes})


def tiny_sets(res=8):
    """A distilled-like float set "a" and its random-real baseline "b" (a new draw per eval seed)."""
    generator = torch.Generator().manual_seed(1)
    a_images, a_labels = separable_set(3, res, generator)
    train_images, train_labels = separable_set(20, res, generator)
    test_images, test_labels = separable_set(10, res, generator)
    train = ImageSet(to_uint8(train_images), train_labels, ["dark", "bright"], description="toy")
    baseline = random_real_set(train, [3, 3], seed=0)
    sets = {"a": EvalSet("a", from_uint8(to_uint8(a_images)), a_labels, "distilled", baseline=baseline.name),
            baseline.name: baseline}
    return sets, to_uint8(test_images), test_labels


def test_plan_jobs_is_every_set_arch_seed_once_seed_major():
    config = tiny_config(seeds=3)
    jobs = plan_jobs(["x", "y"], config)
    assert len(jobs) == len(set(jobs)) == 2 * 2 * 3
    assert {(j.set, j.arch, j.seed) for j in jobs} == {(s, a, k) for s in "xy" for a in config.archs
                                                         for k in range(3)}
    assert [j.seed for j in jobs] == sorted(j.seed for j in jobs)  # every first seed before any second


def test_results_do_not_depend_on_how_jobs_are_split_or_ordered():
    sets, test_images, test_labels = tiny_sets()
    config = tiny_config()
    infos = {name: s.info(2) for name, s in sets.items()}
    jobs = plan_jobs(sets, config)

    def run(subset):
        return [run_job(job, sets[job.set], test_images, test_labels, num_classes=2, config=config, seed=5)
                for job in subset]

    together = gather(run(jobs), config=config, sets=infos)
    rank0, rank1 = run(jobs[1::2][::-1]), run(jobs[0::2])  # two "ranks", one in reverse order
    split = gather(rank1 + rank0, config=config, sets=infos)
    strip = lambda results: sorted((r["set"], r["arch"], r["seed"], r["accuracy"]) for r in results)  # noqa: E731
    assert strip(run(jobs)) == strip(rank0 + rank1)
    assert together == split and together["complete"]


def test_uint8_and_float_training_sets_train_identically():
    sets, test_images, test_labels = tiny_sets()
    config = tiny_config(seeds=1, archs=("convnet",))
    pixels = EvalSet("b", sets["random-real-ipc3"].images, sets["random-real-ipc3"].labels, "random-real")
    floats = EvalSet("b", from_uint8(pixels.images), pixels.labels, "random-real")
    job = EvalJob("b", "convnet", 0)
    assert run_job(job, pixels, test_images, test_labels, num_classes=2, config=config)["accuracy"] == \
        run_job(job, floats, test_images, test_labels, num_classes=2, config=config)["accuracy"]


def report_from(accuracies, *, full_real=None, kinds=None):
    """gather() over hand-written accuracies {(set, arch): [per seed]}."""
    archs = tuple(dict.fromkeys(arch for _, arch in accuracies))
    seeds = len(next(iter(accuracies.values())))
    config = EvalConfig(archs=archs, seeds=seeds)
    names = list(dict.fromkeys(name for name, _ in accuracies))
    kinds = kinds or {}
    infos = {n: {"kind": kinds.get(n, "distilled"), "source": "", "images": 10, "ipc": 1,
                 "class_counts": [1] * 10, "baseline": "rr" if kinds.get(n, "distilled") == "distilled" else None}
             for n in names}
    results = [{"set": n, "arch": a, "seed": s, "accuracy": v} for (n, a), values in accuracies.items()
               for s, v in enumerate(values)]
    return gather(results, config=config, sets=infos, full_real=full_real)


def test_gather_reports_mean_std_unseen_ior_and_hlr():
    accuracies = {("syn", "convnet"): [0.6, 0.7], ("syn", "vgg11"): [0.5, 0.5], ("syn", "resnet18"): [0.4, 0.6],
                  ("rr", "convnet"): [0.5, 0.5], ("rr", "vgg11"): [0.3, 0.3], ("rr", "resnet18"): [0.4, 0.4]}
    full = {"source": "given", "per_arch": {"convnet": 0.9, "vgg11": 0.8}}
    report = report_from(accuracies, full_real=full, kinds={"rr": "random-real"})
    syn = report["sets"]["syn"]
    assert syn["per_arch"]["convnet"]["mean"] == pytest.approx(0.65)
    assert syn["per_arch"]["convnet"]["std"] == pytest.approx(0.05)
    assert syn["unseen_mean"] == pytest.approx((0.5 + 0.5) / 2)
    assert syn["ior"] == pytest.approx({"convnet": 0.15, "vgg11": 0.2, "resnet18": 0.1, "unseen": 0.15})
    # HLR where a full-real value exists; the unseen HLR over the unseen archs that have one
    assert syn["hlr"] == pytest.approx({"convnet": 0.25, "vgg11": 0.3, "unseen": 0.3})
    assert "ior" not in report["sets"]["rr"] and report["complete"]
    text = format_markdown(report)
    # gaps are means ± std of per-seed differences (DD-Ranking's per-run differences)
    assert syn["ior_std"] == pytest.approx({"convnet": 0.05, "vgg11": 0.0, "resnet18": 0.1, "unseen": 0.05})
    assert "| syn | IOR (over rr) | +15.00 ± 5.00 | +20.00 ± 0.00 | +10.00 ± 10.00 | +15.00 ± 5.00 |" in text
    assert "| syn | HLR | +25.00 ± 5.00 | +30.00 ± 0.00 | — | +30.00 ± 0.00 |" in text


def test_gather_uses_a_trained_full_real_set_and_marks_partial_reports():
    accuracies = {("syn", "convnet"): [0.6], ("full-real", "convnet"): [0.9]}
    report = report_from(accuracies, kinds={"full-real": "full-real"})
    assert report["sets"]["syn"]["hlr"] == pytest.approx({"convnet": 0.3})
    assert report["full_real"]["source"] == "trained"
    config = EvalConfig(archs=("convnet",), seeds=2)
    infos = {"syn": {"kind": "distilled", "source": "", "images": 1, "ipc": 1, "class_counts": [1],
                     "baseline": None}}
    partial = gather([{"set": "syn", "arch": "convnet", "seed": 1, "accuracy": 0.5}], config=config, sets=infos)
    assert not partial["complete"] and partial["jobs_done"] == 1 and partial["jobs_total"] == 2
    assert "Incomplete: 1 of 2 jobs" in format_markdown(partial)
    with pytest.raises(LD3MError, match="twice"):
        gather([{"set": "syn", "arch": "convnet", "seed": 0, "accuracy": 0.5}] * 2, config=config, sets=infos)


def test_evaluate_synthetic_is_the_jobs_of_one_set():
    sets, test_images, test_labels = tiny_sets()
    config = tiny_config()
    seen = []
    result = evaluate_synthetic(sets["a"].images, sets["a"].labels, test_images, test_labels, num_classes=2,
                                config=config, seed=5, progress=lambda *a: seen.append(a))
    for arch in config.archs:
        expected = [run_job(EvalJob("a", arch, s), sets["a"], test_images, test_labels, num_classes=2,
                            config=config, seed=5)["accuracy"] for s in range(config.seeds)]
        assert result["per_arch"][arch]["accuracies"] == expected
    assert [(a, s) for a, s, _ in seen] == [(a, s) for a in config.archs for s in range(config.seeds)]
    assert "alexnet" in format_report(result) and "(unseen)" in format_report(result)


def test_protocols_and_overrides():
    paper = protocol_config("paper")
    assert (paper.archs, paper.seeds, paper.epochs, paper.lr, paper.arch_lr, paper.test_per_class) == \
        (DEFAULT_POOL, 5, 1000, 1e-3, {"vgg11": 1e-4}, None)
    quick = protocol_config("quick", seeds=3)
    assert quick.name == "quick+seeds" and quick.seeds == 3 and quick.archs == ("convnet", "vgg11")
    assert protocol_config("quick", seeds=2).name == "quick"  # same value: still the protocol
    assert PROTOCOLS["quick"].seeds == 2  # the table itself is not modified
    with pytest.raises(LD3MError, match="unknown protocol 'fast'"):
        protocol_config("fast")


def test_estimate_adds_epochs_times_steps_and_the_test_pass():
    config = EvalConfig(archs=("convnet",), epochs=10, batch_size=4)
    calibration = Calibration(step_seconds={("convnet", 4): 2.0, ("convnet", 3): 1.0},
                              test_seconds_per_image={"convnet": 0.01})
    jobs = plan_jobs(["big", "small"], EvalConfig(archs=("convnet",), seeds=1))
    estimates = estimate_seconds(jobs, {"big": 10, "small": 3}, 100, calibration, config)
    assert estimates[EvalJob("big", "convnet", 0)] == pytest.approx(10 * 2.0 * 10 / 4 + 1.0)
    assert estimates[EvalJob("small", "convnet", 0)] == pytest.approx(10 * 1.0 + 1.0)


def test_calibration_times_every_architecture_and_batch_size():
    config = tiny_config(archs=("convnet",))
    calibration = calibrate([3, 20], config=config, res=8, num_classes=2, steps=1, test_images=4)
    assert set(calibration.step_seconds) == {("convnet", 3), ("convnet", 8)}
    assert all(v > 0 for v in calibration.step_seconds.values())
    assert calibration.test_seconds_per_image["convnet"] > 0


# ----------------------------------------------------------------------------- sets

def test_random_real_draw_is_the_initial_draw_and_respects_counts():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (200,), generator=generator)
    images = torch.randint(0, 256, (200, 3, 8, 8), dtype=torch.uint8, generator=generator)
    index = random_real_indices(labels, [3] * 4, stream_generator(0, "init"))
    same = ImageSet(images, labels, list("abcd")).sample_per_class(3, stream_generator(0, "init"))
    assert torch.equal(images[index], same.images) and torch.equal(labels[index], same.labels)
    uneven = random_real_indices(labels, [1, 0, 2, 5], stream_generator(0, "x"))
    assert torch.bincount(labels[uneven], minlength=4).tolist() == [1, 0, 2, 5]
    assert uneven.unique().numel() == uneven.numel()
    with pytest.raises(LD3MError, match="fewer than the 999"):
        random_real_indices(labels, [999, 1, 1, 1], stream_generator(0, "x"))


def test_sets_of_one_size_share_one_random_real_baseline():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat(20)
    train = ImageSet(torch.randint(0, 256, (60, 3, 8, 8), dtype=torch.uint8, generator=generator), labels,
                     ["a", "b", "c"], description="toy")
    ipc1 = EvalSet("one", torch.zeros(3, 3, 8, 8), torch.arange(3), "distilled")
    also1 = EvalSet("also", torch.zeros(3, 3, 8, 8), torch.arange(3), "external")
    ipc2 = EvalSet("two", torch.zeros(6, 3, 8, 8), torch.arange(3).repeat(2), "distilled")
    out = with_random_real_baselines([ipc1, also1, ipc2], train, num_classes=3, seed=0)
    assert [s.name for s in out] == ["one", "also", "two", "random-real-ipc1", "random-real-ipc2"]
    assert ipc1.baseline == also1.baseline == "random-real-ipc1" and ipc2.baseline == "random-real-ipc2"
    assert out[4].class_counts(3) == [2, 2, 2] and out[4].images.dtype == torch.uint8
    # Every eval seed trains on its own draw, a function of (seed, counts, eval seed) only.
    again = with_random_real_baselines([ipc2], train, num_classes=3, seed=0)[-1]
    draws = [out[4].training_data(s)[0] for s in range(3)]
    assert torch.equal(draws[0], out[4].images) and torch.equal(again.training_data(2)[0], draws[2])
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert all(torch.bincount(out[4].training_data(s)[1], minlength=3).tolist() == [2, 2, 2] for s in range(3))
    other_seed = with_random_real_baselines([ipc2], train, num_classes=3, seed=1)[-1]
    assert not torch.equal(other_seed.images, out[4].images)
    assert ipc1.training_data(1)[0] is ipc1.images  # other sets train on themselves for every seed


def save_png(path, pixels):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(path)


def test_image_folder_sets(tmp_path):
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=generator)
    for name in ("2", "0", "10"):  # integer names are the labels themselves
        save_png(tmp_path / "ints" / name / "a.png", pixels)
    images, labels = read_image_folder_set(tmp_path / "ints")
    assert sorted(labels.tolist()) == [0, 2, 10] and images.shape == (3, 3, 8, 8) and images.dtype == torch.uint8
    for name in ("cat", "ant"):  # other names: sorted order
        save_png(tmp_path / "names" / name / "a.png", pixels)
        save_png(tmp_path / "names" / name / "b.png", pixels)
    images, labels = read_image_folder_set(tmp_path / "names")
    assert labels.tolist() == [0, 0, 1, 1] and torch.equal(images[0], pixels)
    (tmp_path / "names" / "dog").mkdir()
    with pytest.raises(LD3MError, match="class folder 'dog' has no images"):
        read_image_folder_set(tmp_path / "names")
    save_png(tmp_path / "sizes" / "0" / "a.png", pixels)
    save_png(tmp_path / "sizes" / "0" / "b.png", torch.zeros(3, 8, 9, dtype=torch.uint8))
    with pytest.raises(LD3MError, match="one size"):
        read_image_folder_set(tmp_path / "sizes")
    (tmp_path / "broken" / "0").mkdir(parents=True)
    (tmp_path / "broken" / "0" / "a.png").write_bytes(b"not a png")
    with pytest.raises(LD3MError, match="cannot read image"):
        read_image_folder_set(tmp_path / "broken")


def test_safetensors_sets(tmp_path):
    from safetensors.torch import save_file

    labels = torch.arange(2)
    save_file({"images": torch.zeros(2, 1, 8, 8, dtype=torch.uint8) + 7, "labels": labels}, tmp_path / "gray.safetensors")
    images, read = read_safetensors_set(tmp_path / "gray.safetensors")
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.uint8 and int(images.max()) == 7
    assert torch.equal(read, labels)
    save_file({"images": torch.randn(2, 3, 8, 8, dtype=torch.float64), "labels": labels}, tmp_path / "f.safetensors")
    assert read_safetensors_set(tmp_path / "f.safetensors")[0].dtype == torch.float32
    save_file({"images": torch.full((2, 3, 8, 8), 200.0), "labels": labels}, tmp_path / "raw.safetensors")
    with pytest.raises(LD3MError, match="save 0..255 pixels as uint8"):
        read_safetensors_set(tmp_path / "raw.safetensors")
    save_file({"images": torch.zeros(2, 3, 8, 8)}, tmp_path / "nolabels.safetensors")
    with pytest.raises(LD3MError, match="has no labels tensor"):
        read_safetensors_set(tmp_path / "nolabels.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(LD3MError, match="cannot read"):
        read_safetensors_set(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("images, labels, message", [
    (torch.zeros(2, 3, 16, 16), torch.tensor([0, 1]), "is 16² but the test images are 8²"),
    (torch.zeros(2, 3, 8, 8), torch.tensor([0, 3]), "label 3 is out of range for the 3 classes"),
    (torch.zeros(2, 3, 8, 8), torch.tensor([0, -1]), "label -1 is out of range"),
    (torch.zeros(2, 3, 8, 8), torch.tensor([0, 0]), "class 1 has no images"),
    (torch.zeros(3, 3, 8, 8), torch.tensor([[1.0, 0, 0]] * 3), "labels must be (N,) class indices"),
    (torch.zeros(3, 3, 8, 8), torch.tensor([0.0, 1.0, 2.0]), "integer class indices"),
    (torch.full((3, 3, 8, 8), float("nan")), torch.tensor([0, 1, 2]), "NaN"),
    (torch.zeros(3, 1, 8, 8), torch.tensor([0, 1, 2]), "must be (N, 3, H, W)"),
])
def test_check_eval_set_rejects_bad_sets_in_one_line(images, labels, message):
    with pytest.raises(LD3MError, match=re.escape(message)):
        check_eval_set(images, labels, num_classes=3, res=8, what="set x")


# ----------------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    write_image_folder(root / "data" / "train", 3, 6, seed=0, res=8)
    write_image_folder(root / "data" / "test", 3, 3, seed=1, res=8)
    return root


def cli_args(data, *sets, extra=()):
    return ["eval", *sets, "--data", data / "data", "--cache-dir", data / "cache", "--archs", "convnet",
            "--epochs", "2", "--seeds", "1", "--threads", "1", "--no-progress", *extra]


def write_set(path, ipc, *, res=8, labels=None, classes=3):
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(ipc)
    labels = torch.arange(classes).repeat(ipc) if labels is None else labels
    images = torch.randint(0, 256, (labels.numel(), 3, res, res), dtype=torch.uint8, generator=generator)
    save_file({"images": images, "labels": labels}, path)
    return path


def test_cli_compares_sets_with_baselines_plan_estimate_progress_and_files(data, tmp_path, capsys, monkeypatch):
    import ld3m_fast.cli.evaluate as cli_evaluate

    monkeypatch.setattr(cli_evaluate, "PROGRESS_LINE_SECONDS", 0.0)  # a progress line every epoch
    one = write_set(tmp_path / "one.safetensors", 1)
    two = write_set(tmp_path / "two.safetensors", 2)
    folder = tmp_path / "folder"
    for k in range(3):
        save_png(folder / str(k) / "a.png", torch.full((3, 8, 8), 40 * k, dtype=torch.uint8))
    out = tmp_path / "out"
    code, stdout, err = run_cli(cli_args(data, one, two, folder, extra=("--out", out, "--full-real", "0.9",
                                                                         "--protocol", "quick")), capsys)
    assert code == 0, err
    assert "5 sets x 1 archs (convnet) x 1 seeds x 2 epochs = 5 trainings" in stdout
    assert "estimate: about" in stdout and "an estimate only" in stdout
    assert "epoch 2/2" in stdout and "one convnet seed 0: " in stdout
    report = json.loads((out / "eval.json").read_text())
    assert list(report["sets"]) == ["one", "two", "folder", "random-real-ipc1", "random-real-ipc2"]
    assert report["sets"]["one"]["baseline"] == report["sets"]["folder"]["baseline"] == "random-real-ipc1"
    assert set(report["sets"]["two"]["ior"]) == {"convnet"}
    assert report["sets"]["two"]["hlr"]["convnet"] == pytest.approx(0.9 - report["sets"]["two"]["per_arch"]
                                                                   ["convnet"]["mean"])
    assert report["protocol"]["name"] == "quick+archs,epochs,seeds" and report["complete"]
    assert report["test"]["images"] == 9 and len(report["jobs"]) == 5
    assert (out / "eval.png").stat().st_size > 0 and "| one | external | 1 |" in (out / "eval.md").read_text()
    assert "| two | IOR (over random-real-ipc2) |" in stdout


def test_cli_estimate_only_trains_nothing(data, tmp_path, capsys):
    one = write_set(tmp_path / "one.safetensors", 1)
    code, stdout, err = run_cli(cli_args(data, one, extra=("--out", tmp_path / "out", "--estimate-only",
                                                            "--full-real", "train")), capsys)
    assert code == 0, err
    assert "full-real: full-real, 18 images" in stdout and "one: external, 3 images (IPC 1)" in stdout and "estimate: about" in stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, message", [
    ("no data", "pass --data"),
    ("no out", "pass --out FOLDER"),
    ("wrong res", "is 16² but the test images are 8²"),
    ("label range", "label 5 is out of range for the 3 classes"),
    ("empty class", "class 2 has no images"),
    ("unreadable", "cannot read"),
    ("missing", "does not exist"),
    ("full real percent", "write 0.91, not 91"),
    ("mixed res", "is 16² but the test images are 8²"),
])
def test_cli_bad_inputs_are_one_line_errors(case, message, data, tmp_path, capsys):
    good = write_set(tmp_path / "good.safetensors", 1)
    extra = ("--out", tmp_path / "out")
    if case == "no data":
        argv = [a for a in cli_args(data, good, extra=extra)]
        argv = argv[:argv.index("--data")] + argv[argv.index("--data") + 2:]
    elif case == "no out":
        argv = cli_args(data, good)
    elif case == "wrong res":
        argv = cli_args(data, write_set(tmp_path / "big.safetensors", 1, res=16), extra=(*extra, "--res", "8"))
    elif case == "label range":
        argv = cli_args(data, write_set(tmp_path / "l.safetensors", 1, labels=torch.tensor([0, 1, 5])), extra=extra)
    elif case == "empty class":
        argv = cli_args(data, write_set(tmp_path / "e.safetensors", 1, labels=torch.tensor([0, 1, 1])), extra=extra)
    elif case == "unreadable":
        (tmp_path / "bad.safetensors").write_bytes(b"junk")
        argv = cli_args(data, tmp_path / "bad.safetensors", extra=extra)
    elif case == "missing":
        argv = cli_args(data, tmp_path / "nope.safetensors", extra=extra)
    elif case == "full real percent":
        argv = cli_args(data, good, extra=(*extra, "--full-real", "91"))
    else:
        argv = cli_args(data, good, write_set(tmp_path / "big.safetensors", 1, res=16), extra=extra)
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "out").exists()


def test_parse_full_real():
    assert parse_full_real(None, ("convnet",)) is None
    assert parse_full_real("train", ("convnet",)) == "train"
    assert parse_full_real("0.9", ("convnet", "vgg11")) == {"convnet": 0.9, "vgg11": 0.9}
    assert parse_full_real("ConvNet=0.9, VGG-11=0.8", ("convnet",)) == {"convnet": 0.9, "vgg11": 0.8}
    with pytest.raises(LD3MError, match="ARCH=ACC"):
        parse_full_real("convnet=0.9,0.8", ("convnet",))
    with pytest.raises(LD3MError, match="unknown architecture 'lenet'"):
        parse_full_real("lenet=0.5", ("convnet",))
