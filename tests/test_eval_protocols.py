"""DD-Ranking-compatible evaluation options beside our default (soft labels, best of checkpoints,
the baselines' learning-rate search, cutmix, per-seed gaps), the coreset baselines, real-trained
networks, and a test split that is streamed (1000 classes, --max-test-per-class)."""
import json
import math

import pytest
import torch

from _workspace import assert_one_line_error, run_cli, write_image_folder
from test_evaluation import data, write_set  # noqa: F401 (data: the CLI tests' real data fixture)
from ld3m_fast.distill.coresets import herding_positions, kcenter_positions
from ld3m_fast.distill.evaluation import (
    PROTOCOLS,
    EvalConfig,
    EvalJob,
    EvalSet,
    cutmix,
    format_markdown,
    gather,
    members_by_class,
    plan_jobs,
    protocol_config,
    random_real_indices,
    run_job,
    soft_label_loss,
    train_and_test_detailed,
)
from ld3m_fast.distill import evaluation
from ld3m_fast.distill.real_networks import (
    ImageNetClassifier,
    RealNetworkSpec,
    data_fingerprint,
    load_classifier,
    train_real_network,
)
from ld3m_fast.errors import LD3MError
from ld3m_fast.networks import TorchvisionResNet18


def separable(n_per_class, res=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(2).repeat_interleave(n_per_class)
    images = torch.randn(2 * n_per_class, 3, res, res, generator=generator) * 0.3
    images += (labels.float() * 2 - 1)[:, None, None, None]
    return ((images.clamp(-2, 2) + 2) / 4 * 255).round().to(torch.uint8), labels


def tiny(**changes):
    base = dict(archs=("convnet",), seeds=1, epochs=4, lr=0.01, width=8, depth=2, batch_size=8, dsa_strategy=None)
    return EvalConfig(**{**base, **changes})


# ----------------------------------------------------------------------------- pieces of the protocol

def test_cutmix_pastes_one_box_from_a_permutation_of_the_batch():
    images = torch.arange(6, dtype=torch.float32)[:, None, None, None].expand(6, 3, 16, 16).contiguous()
    for seed in range(20):
        mixed = cutmix(images, torch.Generator().manual_seed(seed))
        changed = (mixed != images).any(dim=(0, 1))          # (16, 16) pixels where any image changed
        rows, cols = torch.nonzero(changed, as_tuple=True)
        if rows.numel():  # one rectangle, every pixel of it taken from one other image of the batch
            box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert box.all() and changed.sum() == box.numel()
        source = mixed[:, 0, rows, cols] if rows.numel() else None
        if source is not None:
            assert sorted(source[:, 0].tolist()) == list(range(6))  # a permutation: each image once
            assert (source == source[:, :1]).all()                   # one source per image in the box
        outside = ~changed
        assert torch.equal(mixed[:, :, outside], images[:, :, outside])
    assert torch.equal(cutmix(images, torch.Generator().manual_seed(3)), cutmix(images, torch.Generator().manual_seed(3)))


def test_soft_label_loss_is_ddrankings_kl():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 4, generator=generator), torch.randn(5, 4, generator=generator)
    for temperature in (1.0, 1.2, 4.0):
        p = torch.softmax(teacher / temperature, 1)
        expected = (p * (p.log() - torch.log_softmax(student / temperature, 1))).sum() / 5  # batchmean
        torch.testing.assert_close(soft_label_loss(student, teacher, temperature), expected)


def test_checkpoint_epochs_and_the_best_report():
    assert tiny(epochs=25, report="best").checkpoint_epochs() == [10, 20, 25]
    assert tiny(epochs=25).checkpoint_epochs() == [25]
    images, labels = separable(6)
    test_images, test_labels = separable(10, seed=1)
    from ld3m_fast.distill.algorithms import stream_generator
    from ld3m_fast.distill.evaluation import build_eval_network

    def run(config):
        generator = stream_generator(0, "x")
        network = build_eval_network("convnet", generator, num_classes=2, res=8, config=config)
        return train_and_test_detailed(network, images, labels, test_images, test_labels, lr=0.01, config=config,
                                       generator=generator)

    final = run(tiny(epochs=12))
    best = run(tiny(epochs=12, report="best", best_every=3))
    assert final["final_accuracy"] == best["final_accuracy"] == final["accuracy"]  # the same training
    assert best["accuracy"] == best["best_accuracy"] >= best["final_accuracy"]
    assert best["best_epoch"] in (3, 6, 9, 12)


def test_a_soft_label_job_learns_the_teachers_labels_not_the_sets():
    images, labels = separable(6)
    test_images, test_labels = separable(10, seed=1)

    class AlwaysClassOne(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[-5.0, 5.0]]).expand(x.shape[0], 2)

    train = EvalSet("s", images, labels, "distilled")
    config = tiny(epochs=15, labels="soft")
    hard = run_job(EvalJob("s", "convnet", 0), train, test_images, test_labels, num_classes=2, config=config)
    soft = run_job(EvalJob("s", "convnet", 0, "soft"), train, test_images, test_labels, num_classes=2,
                   config=config, teacher=AlwaysClassOne())
    assert hard["accuracy"] > 0.9 and soft["accuracy"] == pytest.approx(0.5)  # everything predicted as class 1
    with pytest.raises(ValueError, match="no teacher"):
        run_job(EvalJob("s", "convnet", 0, "soft"), train, test_images, test_labels, num_classes=2, config=config)


def test_test_split_is_streamed_in_batches():
    class Recording:
        """uint8 images that remember every slice taken (a memory-mapped split stands in)."""

        def __init__(self, images):
            self.images, self.shape, self.rows = images, images.shape, []

        def __getitem__(self, index):
            self.rows.append(self.images[index].shape[0])
            return self.images[index]

    images, labels = separable(50)
    recorded = Recording(images)
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64, 2))
    expected = evaluation.test_accuracy(network, images, labels, batch_size=100, device="cpu")
    assert evaluation.test_accuracy(network, recorded, labels, batch_size=32, device="cpu") == expected
    assert recorded.rows == [32, 32, 32, 4]


def test_members_by_class_handles_a_thousand_classes():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 1000, (20000,), generator=generator)
    members = members_by_class(labels, 1000)
    for k in (0, 17, 999):
        assert torch.equal(members[k], torch.nonzero(labels == k).flatten())
    index = random_real_indices(labels, [1] * 1000, torch.Generator().manual_seed(1))
    assert torch.bincount(labels[index], minlength=1000).tolist() == [1] * 1000


@pytest.mark.parametrize("changes, message", [
    ({"labels": "fuzzy"}, "labels must be one of hard, soft"),
    ({"temperature": float("nan")}, "temperature must be a finite number > 0"),
    ({"lr_grid": (0.1, -1.0)}, "a rate of lr_grid must be"),
    ({"baselines": ("random", "forgetting")}, "unknown baseline 'forgetting'"),
    ({"best_every": 0}, "best_every must be >= 1"),
])
def test_protocol_values_are_validated_in_one_line(changes, message):
    with pytest.raises(LD3MError, match=message):
        protocol_config("quick", **changes)


def test_a_learning_rate_override_scales_the_per_architecture_rates():
    config = protocol_config("ddranking", lr=0.01, arch_lr={"vgg11": 0.001}, epochs=50)
    assert config.lr_for("vgg11") == 0.001 and config.name == "ddranking+arch_lr,epochs,lr"
    assert PROTOCOLS["ddranking"].arch_lr == {"vgg11": 1e-4}  # the table is not modified


def test_the_ddranking_protocol_sets_its_four_choices_and_nothing_else():
    ddranking, paper = PROTOCOLS["ddranking"], PROTOCOLS["paper"]
    assert (ddranking.report, ddranking.baseline_lr, ddranking.augment) == ("best", "search", "cutmix")
    assert ddranking.lr_grid == (0.001, 0.005, 0.01, 0.05, 0.1) and ddranking.best_every == 10
    same = {k: v for k, v in ddranking.to_dict().items() if k not in ("name", "report", "baseline_lr", "augment")}
    assert same == {k: v for k, v in paper.to_dict().items() if k in same}
    assert (paper.report, paper.baseline_lr, paper.augment, paper.labels) == ("final", "fixed", "dsa", "hard")


# ----------------------------------------------------------------------------- jobs and the report

def test_baselines_are_trained_at_every_rate_of_the_grid_and_the_best_is_kept():
    config = EvalConfig(archs=("convnet",), seeds=2, baseline_lr="search", labels="soft")
    kinds = {"syn": "distilled", "rr": "random-real", "herding-ipc1": "coreset", "full-real": "full-real"}
    jobs = plan_jobs(kinds, config, kinds)
    per = {name: sum(j.set == name for j in jobs) for name in kinds}
    assert per == {"syn": 2 * 2, "rr": 2 * 2 * 5, "herding-ipc1": 2 * 2 * 5, "full-real": 2}  # hard labels only
    assert {j.lr for j in jobs if j.set == "rr"} == set(config.lr_grid) and {j.lr for j in jobs if j.set == "syn"} == {None}
    assert all(j.stream == f"eval:convnet:{j.seed}" for j in jobs)  # the same networks and draws for all


def hand_report(accuracies, *, config, kinds, baselines=None, full_real=None):
    """gather() over {(set, labels, seed, lr): accuracy} for one architecture (convnet)."""
    infos = {n: {"kind": k, "source": "", "images": 10, "ipc": 1, "class_counts": [1] * 10,
                 "baseline": None, "baselines": (baselines or {}) if k == "distilled" else {}}
             for n, k in kinds.items()}
    results = [{"set": n, "arch": "convnet", "seed": s, "labels": lab, "lr": lr, "accuracy": v}
               for (n, lab, s, lr), v in accuracies.items()]
    return gather(results, config=config, sets=infos, full_real=full_real)


def test_gather_keeps_the_best_rate_per_seed_and_reports_every_baseline_with_soft_beside_hard():
    config = EvalConfig(archs=("convnet",), seeds=2, baseline_lr="search", lr_grid=(0.01, 0.1), labels="soft")
    kinds = {"syn": "distilled", "rr": "random-real", "kc": "coreset", "full-real": "full-real"}
    acc = {}
    for labels, shift in (("hard", 0.0), ("soft", 0.2)):
        acc.update({("syn", labels, 0, None): 0.60 + shift, ("syn", labels, 1, None): 0.70 + shift,
                    ("rr", labels, 0, 0.01): 0.40 + shift, ("rr", labels, 0, 0.1): 0.50 + shift,
                    ("rr", labels, 1, 0.01): 0.55 + shift, ("rr", labels, 1, 0.1): 0.55 + shift,  # tie: 0.01
                    ("kc", labels, 0, 0.01): 0.45 + shift, ("kc", labels, 0, 0.1): 0.30 + shift,
                    ("kc", labels, 1, 0.01): 0.45 + shift, ("kc", labels, 1, 0.1): 0.50 + shift,
                    })
    acc.update({("full-real", "hard", 0, None): 0.90, ("full-real", "hard", 1, None): 0.80})
    report = hand_report(acc, config=config, kinds=kinds, baselines={"random": "rr", "kcenter": "kc"})
    assert report["complete"] and report["jobs_total"] == len(acc) and "full-real" not in report["soft_sets"]
    hard, soft = report["sets"]["syn"], report["soft_sets"]["syn"]
    assert report["sets"]["rr"]["lr_chosen"] == {"convnet": [0.1, 0.01]}
    assert hard["ior"]["convnet"] == pytest.approx(((0.60 - 0.50) + (0.70 - 0.55)) / 2)
    assert hard["ior_std"]["convnet"] == pytest.approx(0.025)
    assert hard["improvements"]["kc"]["gap"]["convnet"] == pytest.approx(((0.60 - 0.45) + (0.70 - 0.50)) / 2)
    assert hard["hlr"]["convnet"] == pytest.approx(((0.90 - 0.60) + (0.80 - 0.70)) / 2)
    assert hard["hlr_std"]["convnet"] == pytest.approx(0.1)
    assert soft["ior"]["convnet"] == pytest.approx(hard["ior"]["convnet"])
    # soft HLR: against the hard-label full real (DD-Ranking's HLR is a hard-label quantity)
    assert soft["hlr"]["convnet"] == pytest.approx(((0.90 - 0.80) + (0.80 - 0.90)) / 2)
    text = format_markdown({**report, "teacher": {"description": "a test teacher"}})
    assert "| syn | IOR (over rr) | +12.50 ± 2.50 |" in text
    assert "| syn | improvement over kc | +17.50 ± 2.50 |" in text
    assert "Soft labels (teacher a test teacher; KL at temperature 1" in text
    assert "lr searched on the test set" in text and "rr convnet 0.1/0.01" in text


def test_the_best_report_is_labelled_as_such():
    config = EvalConfig(archs=("convnet",), seeds=1, report="best")
    report = hand_report({("syn", "hard", 0, None): 0.5}, config=config, kinds={"syn": "distilled"})
    text = format_markdown(report)
    assert "best test accuracy over checkpoints every 10 epochs (selected on the test set" in text
    assert "Best-of-checkpoints test accuracy (%)" in text
    final = format_markdown(hand_report({("syn", "hard", 0, None): 0.5}, config=EvalConfig(archs=("convnet",), seeds=1),
                                        kinds={"syn": "distilled"}))
    assert "test accuracy after the final epoch (no selection on the test set)" in final


# ----------------------------------------------------------------------------- coresets

def test_herding_moves_the_chosen_mean_closest_to_the_class_mean():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(30, 5, generator=generator, dtype=torch.float64)
    chosen = herding_positions(features, 4)
    mean = features.mean(0)
    expected = []
    for step in range(4):  # brute force: the image whose addition makes the running mean closest
        rest = [i for i in range(30) if i not in expected]
        expected.append(min(rest, key=lambda i: float((features[expected + [i]].mean(0) - mean).norm())))
    assert chosen == expected
    assert herding_positions(features, 100) == herding_positions(features, 30) and len(set(chosen)) == 4


def test_kcenter_adds_the_point_farthest_from_its_nearest_centre():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [0.0, 7.0], [5.0, 5.0], [0.2, 0.1]])
    for first in range(6):
        chosen = kcenter_positions(points, 4, first)
        expected = [first]
        for _ in range(3):
            rest = [i for i in range(6) if i not in expected]
            expected.append(max(rest, key=lambda i: min(float((points[i] - points[c]).norm()) for c in expected)))
        assert chosen == expected
    assert kcenter_positions(points, 0) == [] and kcenter_positions(points, 9, 2)[0] == 2


def test_coresets_are_chosen_class_by_class_and_kcenter_starts_at_a_seeded_draw():
    from ld3m_fast.distill.coresets import coreset_indices

    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat(7)
    images = torch.randint(0, 256, (21, 3, 4, 4), dtype=torch.uint8, generator=generator)
    network = torch.nn.Flatten()
    network.embed = network.forward  # features = the normalised pixels
    for kind in ("herding", "kcenter"):
        index = coreset_indices(kind, network, images, labels, [2, 1, 3], seed=5)
        assert labels[index].tolist() == [0, 0, 1, 2, 2, 2]
        assert torch.equal(index, coreset_indices(kind, network, images, labels, [2, 1, 3], seed=5))
    draws = {tuple(coreset_indices("kcenter", network, images, labels, [1, 1, 1], seed=s).tolist()) for s in range(6)}
    assert len(draws) > 1  # the first centre depends on the seed; herding's choice does not


# ----------------------------------------------------------------------------- real-trained networks

def test_real_networks_are_cached_keyed_to_data_spec_and_seed(tmp_path):
    images, labels = separable(4)
    spec = RealNetworkSpec(res=8, num_classes=2, width=4, depth=2, epochs=1)
    key = data_fingerprint(images, labels)
    first, info = train_real_network(images, labels, spec, data_key=key, cache_dir=tmp_path)
    again, info_again = train_real_network(images, labels, spec, data_key=key, cache_dir=tmp_path)
    assert not info["cached"] and info_again["cached"] and info["sha256"] == info_again["sha256"]
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    other_seed = RealNetworkSpec(res=8, num_classes=2, width=4, depth=2, epochs=1, seed=1)
    assert other_seed.key(key) != spec.key(key) and spec.key(key) != spec.key(data_fingerprint(images, 1 - labels))
    network, file_info = load_classifier(info["path"], num_classes=2, res=8)
    assert "epochs on the real data" in file_info["description"]
    with pytest.raises(LD3MError, match="trained at 8² on 2 classes, but the data is 16²"):
        load_classifier(info["path"], num_classes=2, res=16)


def test_a_torchvision_teacher_keeps_the_logits_of_the_subset(tmp_path):
    from ld3m_fast.data import resolve_subset

    model = TorchvisionResNet18(1000).eval()
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    teacher, info = load_classifier(tmp_path / "r18.pth", num_classes=10, res=16, subset="imagenette")
    assert isinstance(teacher, ImageNetClassifier) and "ResNet-18" in info["description"]
    x = torch.randn(2, 3, 16, 16)
    big = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), model(big)[:, list(resolve_subset("imagenette").imagenet_indices)])


# ----------------------------------------------------------------------------- the CLI

def cli(data, *extra):
    return ["eval", "--data", data / "data", "--cache-dir", data / "cache", "--archs", "convnet", "--epochs", "2",
            "--seeds", "2", "--threads", "1", "--no-progress", "--teacher-epochs", "1", *map(str, extra)]


def test_cli_soft_labels_coresets_and_per_seed_gaps(data, tmp_path, capsys):
    one = write_set(tmp_path / "one.safetensors", 1)
    code, out, err = run_cli([*cli(data, one, "--out", tmp_path / "out", "--labels", "soft", "--baselines",
                                   "random,herding,kcenter", "--full-real", "0.9", "--max-test-per-class", "2")],
                             capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert list(report["sets"]) == ["one", "random-real-ipc1", "herding-ipc1", "kcenter-ipc1"]
    assert set(report["soft_sets"]) == set(report["sets"])
    row = report["sets"]["one"]
    assert set(row["improvements"]) == {"random-real-ipc1", "herding-ipc1", "kcenter-ipc1"}
    assert {"ior", "ior_std", "hlr", "hlr_std"} <= set(row) and {"ior", "hlr"} <= set(report["soft_sets"]["one"])
    assert report["teacher"]["description"].startswith("convnet") and not report["teacher"]["cached"]
    assert report["coreset_features"] == report["teacher"]["description"]  # one real-trained network
    assert report["jobs_total"] == 4 * 2 * 2 and report["complete"]
    assert report["test"]["quick_check"] and report["test"]["images"] == 6
    assert "at most 2 per class: a quick check, not the full test split" in out
    assert "| one | improvement over herding-ipc1 |" in out and "| one | IOR (over random-real-ipc1) |" in out
    assert "Soft labels (teacher convnet" in out
    coreset = report["sets"]["herding-ipc1"]
    assert coreset["kind"] == "coreset" and coreset["class_counts"] == [1, 1, 1]
    # a second evaluation shares the teacher (cached, keyed to data, architecture and seed)
    code, out, err = run_cli([*cli(data, one, "--out", tmp_path / "again", "--labels", "soft",
                                   "--estimate-only")], capsys)
    assert code == 0 and "cached at" in out


def test_cli_estimate_only_says_what_the_teacher_costs_and_trains_nothing(data, tmp_path, capsys):
    one = write_set(tmp_path / "one.safetensors", 1)
    argv = ["eval", one, "--data", data / "data", "--cache-dir", tmp_path / "cache", "--archs", "convnet",
            "--epochs", "2", "--seeds", "1", "--threads", "1", "--no-progress", "--out", tmp_path / "out",
            "--labels", "soft", "--baselines", "random,kcenter", "--estimate-only"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "is not cached: training it on 18 images takes about" in out and "estimate: about" in out
    assert "kcenter-ipc1: coreset, 3 images (IPC 1)" in out
    assert not (tmp_path / "cache" / "networks").exists() and not (tmp_path / "out").exists()


def test_cli_ddranking_beside_the_default(data, tmp_path, capsys):
    one = write_set(tmp_path / "one.safetensors", 1)
    code, out, err = run_cli([*cli(data, one, "--out", tmp_path / "dd", "--protocol", "ddranking", "--epochs", "10")],
                             capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "dd" / "eval.json").read_text())
    protocol = report["protocol"]
    assert (protocol["report"], protocol["baseline_lr"], protocol["augment"]) == ("best", "search", "cutmix")
    assert report["jobs_total"] == 2 + 2 * 5 and len(report["sets"]["random-real-ipc1"]["lr_chosen"]["convnet"]) == 2
    assert all(job["best_epoch"] in (10,) for job in report["jobs"])
    assert "Best-of-checkpoints test accuracy (%)" in out and "selected on the test set" in out
    assert "trained at each lr of 0.001, 0.005, 0.01, 0.05, 0.1" in out


@pytest.mark.parametrize("extra, message", [
    (("--temperature", "-1"), "expected a finite number > 0"),
    (("--temperature", "nan"), "expected a finite number > 0"),
    (("--baselines", "random,forgetting"), "expected some of random,herding,kcenter"),
    (("--labels", "soft", "--teacher", "missing.pth"), "--teacher missing.pth does not exist"),
    (("--teacher", "train"), "add --labels soft"),
    (("--no-dsa", "--augment", "cutmix"), "contradict each other"),
    (("--no-random-real", "--baselines", "random"), "contradict each other"),
    (("--max-test-per-class", "0"), "expected an integer >= 1"),
    (("--teacher-epochs", "0"), "expected an integer >= 1"),
    (("--report", "max"), "invalid choice"),
])
def test_cli_bad_new_flags_are_one_line_errors(extra, message, data, tmp_path, capsys):
    one = write_set(tmp_path / "one.safetensors", 1)
    code, _, err = run_cli([*cli(data, one, "--out", tmp_path / "out", *extra)], capsys)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "out").exists()


def test_cli_checks_the_output_folder_before_work(data, tmp_path, capsys):
    one = write_set(tmp_path / "one.safetensors", 1)
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli([*cli(data, one, "--out", tmp_path / "file")], capsys)
    assert_one_line_error(code, err, "exists and is not a folder")


def test_cli_evaluates_a_thousand_classes_on_part_of_the_test_split(tmp_path, capsys):
    root = tmp_path / "k"
    classes = 1000
    write_image_folder(root / "train", classes, 1, seed=0, res=8)
    write_image_folder(root / "test", classes, 2, seed=1, res=8)
    one = write_set(tmp_path / "one.safetensors", 1, classes=classes)
    code, out, err = run_cli(["eval", one, "--data", root, "--cache-dir", tmp_path / "cache", "--archs", "convnet",
                              "--epochs", "1", "--seeds", "1", "--threads", "1", "--no-progress", "--out",
                              tmp_path / "out", "--max-test-per-class", "1", "--batch", "500"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["test"]["num_classes"] == 1000 and report["test"]["images"] == 1000
    assert report["sets"]["random-real-ipc1"]["class_counts"] == [1] * 1000
    assert "a quick check" in out and math.isfinite(report["sets"]["one"]["ior"]["convnet"])
