"""Pruning the real data as the authors' follow-up releases it: the keep rule, the scorers, the
loss cache and file, and the run's record of it (ld3m_fast/prune.py, docs/pruning.md)."""
import json
import logging

import pytest
import torch

from _workspace import assert_one_line_error, distill_flags, make_workspace, run_cli
from ld3m_fast.data import ImageSet
from ld3m_fast.errors import LD3MError
from ld3m_fast.networks import TorchvisionResNet18
from ld3m_fast.prune import (
    PruneSettings,
    Scorer,
    TrainedScorerSettings,
    build_scorer,
    kept_count,
    losses_for,
    prune_dataset,
    prune_indices,
    read_losses,
    smallest_percent,
    write_losses,
)

# Class sizes where int(P * n / 100) rounds down, to 0 at the small ones: 1% keeps 0 of 1..99
# and 2 of 250, 20% keeps 0 of 1..4 and 1 of 7, 60% keeps 0 of 1 and 1 of 3.
CLASS_SIZES = (1, 3, 4, 7, 10, 99, 250)
PERCENTS = (1, 20, 60, 100)
ORDERS = ("asc", "desc")


def constructed_data(sizes=CLASS_SIZES, res=4, seed=0):
    """An ImageSet whose classes have `sizes` images, interleaved in dataset order, and whose
    first pixel is the image's loss by construction (values 0..9: many ties)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    labels = labels[torch.randperm(labels.numel(), generator=generator)]
    images = torch.randint(0, 256, (labels.numel(), 3, res, res), dtype=torch.uint8, generator=generator)
    images[:, 0, 0, 0] = torch.randint(0, 10, (labels.numel(),), dtype=torch.uint8, generator=generator)
    return ImageSet(images, labels, [f"c{k}" for k in range(len(sizes))], description="constructed")


class FirstPixelScorer(Scorer):
    """A scorer whose loss of an image is its first pixel value, set by construction."""

    description = "first pixel (test)"

    def key(self):
        return "first-pixel"

    def scorer_hash(self):
        return "sha256:first-pixel"

    def losses(self, images, labels, device):
        return images[:, 0, 0, 0].float()


def released_rule(losses, labels, percent, order):
    """The released rule, written from its description (get_losses_imagenet.py:47-56, glad_utils.py:24-51):
    per class, the images in dataset order sorted ascending by loss with Python's stable sort; keep
    the first int(percent * n / 100) for asc, the last that many for desc; percent 100 keeps all;
    the kept images stay in dataset order."""
    kept = []
    for k in sorted(set(labels)):
        members = [i for i, label in enumerate(labels) if label == k]
        ranked = sorted(members, key=lambda i: losses[i])
        n = int(percent * len(members) / 100)
        if percent == 100:
            kept += members
        elif order == "asc":
            kept += ranked[:n]
        else:
            kept += ranked[len(ranked) - n:]
    return sorted(kept)


def kept_table(data):
    """percent x order -> kept images per class, by `prune_indices`."""
    losses = data.images[:, 0, 0, 0].float()
    return {(p, o): torch.bincount(data.labels[prune_indices(losses, data.labels, data.num_classes, p, o)],
                                   minlength=data.num_classes).tolist() for p in PERCENTS for o in ORDERS}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("percent", PERCENTS)
def test_kept_indices_are_the_released_rule(percent, order):
    data = constructed_data()
    losses = data.images[:, 0, 0, 0].float()
    kept = prune_indices(losses, data.labels, data.num_classes, percent, order).tolist()
    assert kept == released_rule(losses.tolist(), data.labels.tolist(), percent, order)
    counts = torch.bincount(data.labels[kept], minlength=data.num_classes).tolist()
    assert counts == [int(percent * n / 100) for n in CLASS_SIZES]


def test_the_kept_count_table(capsys):
    """The table of the report: kept images per class (sizes 1, 3, 4, 7, 10, 99, 250) per percent and order."""
    data = constructed_data()
    table = kept_table(data)
    with capsys.disabled():
        print("\npercent order  kept per class (class sizes " + ", ".join(map(str, CLASS_SIZES)) + ")")
        for (percent, order), counts in table.items():
            print(f"{percent:>7} {order:<5}  {counts}  total {sum(counts)} of {sum(CLASS_SIZES)}")
    assert table[(1, "asc")] == [0, 0, 0, 0, 0, 0, 2]
    assert table[(20, "desc")] == [0, 0, 0, 1, 2, 19, 50]
    assert table[(60, "asc")] == [0, 1, 2, 4, 6, 59, 150]
    assert table[(100, "asc")] == list(CLASS_SIZES)
    assert all(table[(p, "asc")] == table[(p, "desc")] for p in PERCENTS)
    assert kept_count(99, 60) == 59 and kept_count(7, 20) == 1 and kept_count(4, 20) == 0


def test_ties_keep_dataset_order_and_desc_is_the_tail_of_the_ascending_sort():
    labels = torch.zeros(5, dtype=torch.long)
    losses = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    # ascending stable: 1, 4, 0, 2, 3
    assert prune_indices(losses, labels, 1, 40, "asc").tolist() == [1, 4]
    assert prune_indices(losses, labels, 1, 60, "asc").tolist() == [0, 1, 4]
    assert prune_indices(losses, labels, 1, 40, "desc").tolist() == [2, 3]   # the last two of 1, 4, 0, 2, 3


def test_random_order_is_a_seeded_draw_per_class():
    data = constructed_data()
    first = prune_indices(None, data.labels, data.num_classes, 60, "random", seed=3)
    assert torch.equal(first, prune_indices(None, data.labels, data.num_classes, 60, "random", seed=3))
    assert not torch.equal(first, prune_indices(None, data.labels, data.num_classes, 60, "random", seed=4))
    assert torch.bincount(data.labels[first], minlength=7).tolist() == [int(60 * n / 100) for n in CLASS_SIZES]


@pytest.mark.parametrize("percent, order, message", [
    (0, "asc", "from 1 to 100"), (101, "asc", "from 1 to 100"), (50.0, "asc", "an integer"),
    (50, "middle", "unknown --prune-order 'middle'"),
])
def test_bad_settings_are_one_line_errors(percent, order, message):
    with pytest.raises(LD3MError, match=message):
        PruneSettings(percent, order).check()


def test_a_class_below_ipc_is_refused_in_one_line_with_the_percent_that_works(tmp_path):
    data = constructed_data(sizes=(4, 10, 10))
    pruned, record = prune_dataset(data, PruneSettings(50, "asc"), scorer=FirstPixelScorer(), cache_dir=tmp_path,
                                   min_per_class=2)
    assert pruned.class_counts() == [2, 5, 5] and record["kept_per_class"] == [2, 5, 5]
    with pytest.raises(LD3MError) as error:
        prune_dataset(data, PruneSettings(20, "desc"), scorer=FirstPixelScorer(), cache_dir=tmp_path,
                      min_per_class=1, need="--ipc 1")
    message = str(error.value)
    assert "\n" not in message
    assert "keeps 0 of the 4 images of class 'c0' (int(20 * 4 / 100) = 0" in message
    assert "--ipc 1 needs 1" in message and "use --prune-percent 25 or more" in message
    assert smallest_percent([4, 10, 10], 1) == 25 and smallest_percent([4, 10], 2) == 50
    assert smallest_percent([1], 2) is None


def test_pruned_data_keeps_the_lowest_losses_in_dataset_order(tmp_path):
    data = constructed_data()
    pruned, record = prune_dataset(data, PruneSettings(60, "asc"), scorer=FirstPixelScorer(), cache_dir=tmp_path,
                                   min_per_class=0)
    losses = data.images[:, 0, 0, 0].float()
    keep = released_rule(losses.tolist(), data.labels.tolist(), 60, "asc")
    assert torch.equal(pruned.images, data.images[keep]) and torch.equal(pruned.labels, data.labels[keep])
    assert record["scorer_hash"] == "sha256:first-pixel" and "pruned to 60%" in pruned.description
    same, _ = prune_dataset(data, PruneSettings(100, "asc"), scorer=FirstPixelScorer())
    assert same is data  # 100: no pruning, nothing scored


# ----------------------------------------------------------------------------- scorers and losses

def save_resnet(path, num_classes, seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TorchvisionResNet18(num_classes)
    for m in model.modules():  # non-trivial running statistics: eval mode must use them
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), path)
    return model.eval()


def batch_one_losses(model, images, targets):
    """get_losses_imagenet.py, one image at a time: ToTensor, Resize((224, 224)), Normalize, eval, CE."""
    from ld3m_fast.normalization import normalize_unit

    out = []
    with torch.no_grad():
        for image, target in zip(images, targets):
            x = torch.nn.functional.interpolate(image[None].float() / 255, size=(224, 224), mode="bilinear",
                                                align_corners=False, antialias=True)
            out.append(torch.nn.functional.cross_entropy(model(normalize_unit(x)), target[None]))
    return torch.stack(out)


def test_resnet18_scorer_gives_the_batch_one_losses_of_the_release(tmp_path):
    model = save_resnet(tmp_path / "r18.pth", 3)
    data = constructed_data(sizes=(2, 2, 3), res=16)
    scorer = build_scorer(str(tmp_path / "r18.pth"), res=16, num_classes=3, subset=None)
    losses, meta = losses_for(data, scorer, cache_dir=tmp_path / "cache")
    # eval mode: each image's loss does not depend on its batch (batches of 64 == batch 1)
    torch.testing.assert_close(losses, batch_one_losses(model, data.images, data.labels), rtol=1e-5, atol=1e-6)
    assert meta["scorer_hash"].startswith("sha256:") and "deviation" not in meta
    again, _ = losses_for(data, build_scorer(str(tmp_path / "r18.pth"), res=16, num_classes=3, subset=None),
                          cache_dir=tmp_path / "cache")
    assert torch.equal(again, losses)  # from the cache


def test_resnet18_scorer_maps_an_imagenet_subset_to_its_imagenet_classes(tmp_path):
    from ld3m_fast.data import resolve_subset

    model = save_resnet(tmp_path / "r18.pth", 1000)
    data = ImageSet(torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8), torch.arange(10),
                    [str(k) for k in range(10)])
    scorer = build_scorer(str(tmp_path / "r18.pth"), res=8, num_classes=10, subset="imagenette")
    scorer.prepare(data, device="cpu")
    rows = torch.tensor(resolve_subset("imagenette").imagenet_indices)
    torch.testing.assert_close(scorer.losses(data.images, data.labels, "cpu"),
                               batch_one_losses(model, data.images, rows), rtol=1e-5, atol=1e-6)
    with pytest.raises(LD3MError, match="1000 classes but the data 10: .* --subset"):
        build_scorer(str(tmp_path / "r18.pth"), res=8, num_classes=10, subset=None).prepare(data, device="cpu")


def test_resnet18_state_dicts_are_checked_strictly(tmp_path):
    from safetensors.torch import save_file

    from ld3m_fast.networks import load_torchvision_resnet18

    state = TorchvisionResNet18(5).state_dict()
    save_file(state, tmp_path / "ok.safetensors")
    assert load_torchvision_resnet18(tmp_path / "ok.safetensors").fc.out_features == 5
    broken = dict(state)
    del broken["layer2.0.downsample.0.weight"]
    broken["extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(LD3MError, match=r"missing: layer2.0.downsample.0.weight \(1\); unexpected: extra.weight"):
        load_torchvision_resnet18(tmp_path / "broken.pth")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "parallel.pth")
    with pytest.raises(LD3MError, match="module.state_dict"):
        load_torchvision_resnet18(tmp_path / "parallel.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(LD3MError, match="cannot read"):
        load_torchvision_resnet18(tmp_path / "junk.pth")


def test_torchvision_resnet18_has_torchvisions_names_and_count():
    from ld3m_fast.networks import count_parameters

    model = TorchvisionResNet18()
    keys = list(model.state_dict())
    assert count_parameters(model) == 11_689_512 and len(keys) == 122  # torchvision's resnet18
    assert keys[:6] == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                        "bn1.num_batches_tracked"]
    assert "layer4.0.downsample.1.running_var" in keys and keys[-2:] == ["fc.weight", "fc.bias"]


def test_trained_scorer_is_cached_with_its_weights_hash(tmp_path, caplog):
    data = constructed_data(sizes=(3, 3), res=8)
    settings = TrainedScorerSettings(epochs=1, width=4)
    caplog.set_level(logging.INFO, logger="ld3m_fast")
    first, meta = losses_for(data, build_scorer("train", res=8, num_classes=2, subset=None, cache_dir=tmp_path,
                                                trained=settings), cache_dir=tmp_path)
    assert any("training convnet" in line for line in caplog.messages)
    assert meta["deviation"].startswith("a ConvNet trained by ld3m-fast") and meta["scorer_hash"].startswith("sha256:")
    caplog.clear()
    again, meta_again = losses_for(data, build_scorer("train", res=8, num_classes=2, subset=None,
                                                      cache_dir=tmp_path, trained=settings),
                                   cache_dir=tmp_path)
    assert torch.equal(first, again) and meta_again["scorer_hash"] == meta["scorer_hash"]
    assert not any("training" in line for line in caplog.messages)


def test_losses_files_are_checked_against_the_data(tmp_path):
    data = constructed_data()
    losses = data.images[:, 0, 0, 0].float()
    write_losses(tmp_path / "l.safetensors", losses, data.labels, {"scorer": "s", "scorer_hash": "sha256:x"})
    read, meta = read_losses(tmp_path / "l.safetensors", data)
    assert torch.equal(read, losses) and meta["scorer_hash"] == "sha256:x"
    other = constructed_data(seed=1)
    with pytest.raises(LD3MError, match="does not belong to this data: image"):
        read_losses(tmp_path / "l.safetensors", other)
    fewer = constructed_data(sizes=(1, 3))
    with pytest.raises(LD3MError, match="losses of 374 images but the data has 4"):
        read_losses(tmp_path / "l.safetensors", fewer)


def test_trained_scorer_epochs_are_the_real_network_default():
    from ld3m_fast.distill.real_networks import REAL_NETWORK_EPOCHS

    assert TrainedScorerSettings().epochs == REAL_NETWORK_EPOCHS


# ----------------------------------------------------------------------------- runs, the CLI

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("prune"), classes=3, per_class=4)


def test_prune_cli_writes_losses_a_run_records_and_a_resume_keeps(workspace, tmp_path, capsys):
    losses_file = tmp_path / "losses.safetensors"
    common = ["--res", "16", "--max-per-class", "4", "--cache-dir", workspace / "cache", "--threads", "1"]
    code, out, err = run_cli(["prune", workspace / "data", "--out", losses_file, "--scorer-epochs", "1", *common],
                             capsys)
    assert code == 0, err
    assert "note: a ConvNet trained by ld3m-fast on the real data scores the images" in out
    from safetensors import safe_open

    with safe_open(str(losses_file), framework="pt") as f:
        assert f.metadata()["deviation"].startswith("a ConvNet trained by ld3m-fast")
    code, _, err = run_cli(["prune", workspace / "data", "--out", losses_file, *common], capsys)
    assert_one_line_error(code, err, "already exists")

    run = tmp_path / "run"
    code, out, err = run_cli(distill_flags(workspace, run, "--prune-percent", "50", "--prune-losses", losses_file),
                             capsys)
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())
    assert (config["prune_percent"], config["prune_order"]) == (50, "asc")
    assert config["prune_scorer_hash"].startswith("sha256:") and "kept 6 of 12 real images" in out
    # a resume with another pruning is refused; with the same, it continues
    code, _, err = run_cli(["distill", "--resume", run, "--prune-order", "desc"], capsys)
    assert_one_line_error(code, err, "cannot change prune_order when resuming")
    code, _, err = run_cli(["distill", "--resume", run, "--iterations", "2"], capsys)
    assert code == 0, err
    # a run whose recorded scorer hash no longer matches its losses is refused (an edited config.json:
    # it no longer matches the checkpoint's own record of the run)
    config["prune_scorer_hash"] = "sha256:other"
    (run / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(["distill", "--resume", run, "--iterations", "3"], capsys)
    assert_one_line_error(code, err, "prune_scorer_hash is 'sha256:other' in config.json")


@pytest.mark.parametrize("extra, message", [
    (("--prune-percent", "20", "--prune-order", "random"), "keeps 0 of the 4 images of class"),
    (("--prune-percent", "101"), "--prune-percent must be <= 100"),
    (("--prune-percent", "50", "--prune-scorer", "nope.pth"), "--prune-scorer nope.pth does not exist"),
    (("--prune-percent", "50", "--prune-losses", "nope.safetensors"), "--prune-losses nope.safetensors does not exist"),
    (("--prune-order", "middle"), "unknown --prune-order 'middle'"),
])
def test_distill_refuses_bad_pruning_in_one_line_and_writes_nothing(extra, message, workspace, tmp_path, capsys):
    code, _, err = run_cli(distill_flags(workspace, tmp_path / "run", *extra), capsys)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "run").exists()


def test_losses_of_other_data_are_refused_by_a_run(workspace, tmp_path, capsys):
    data = constructed_data(sizes=(4, 4, 4), res=16)
    write_losses(tmp_path / "other.safetensors", torch.zeros(12), data.labels, {"scorer": "x"})
    code, _, err = run_cli(distill_flags(workspace, tmp_path / "run", "--prune-percent", "50", "--prune-losses",
                                         tmp_path / "other.safetensors"), capsys)
    assert_one_line_error(code, err, "does not belong to this data")


@pytest.mark.parametrize("name, message", [("x.pt", "give a .safetensors file name"),
                                           ("/proc/x.safetensors", "cannot write --out")])
def test_prune_cli_checks_its_output_before_work(name, message, workspace, tmp_path, capsys):
    code, _, err = run_cli(["prune", workspace / "data", "--out", tmp_path / name, "--res", "16"], capsys)
    assert_one_line_error(code, err, message)


def test_buffer_trains_on_the_pruned_set_and_records_it(workspace, tmp_path, capsys):
    from ld3m_fast.distill.buffers import load_buffer

    from ld3m_fast.data import load_dataset

    losses_file = tmp_path / "l.safetensors"
    real = load_dataset(workspace / "data", res=16, cache_dir=workspace / "cache", max_per_class=4)
    write_losses(losses_file, torch.arange(12, dtype=torch.float32), real.labels, {"scorer_hash": "sha256:y"})
    code, out, err = run_cli(["buffer", "--data", workspace / "data", "--res", "16", "--out", tmp_path / "buf",
                              "--experts", "1", "--width", "4", "--max-per-class", "4", "--cache-dir",
                              workspace / "cache", "--prune-percent", "50", "--prune-order", "desc",
                              "--prune-losses", losses_file, "--threads", "1"], capsys)
    assert code == 0, err
    pruning = load_buffer(tmp_path / "buf")[0].metadata["pruning"]
    assert pruning["percent"] == 50 and pruning["order"] == "desc" and pruning["kept_per_class"] == [2, 2, 2]
    assert pruning["scorer_hash"] == "sha256:y"
    code, _, err = run_cli(["buffer", "--data", workspace / "data", "--res", "16", "--out", tmp_path / "b2",
                            "--prune-percent", "0"], capsys)
    assert_one_line_error(code, err, "--prune-percent", "expected an integer >= 1 and <= 100")


def test_pruned_presets_are_the_released_commands_with_their_pruning():
    from ld3m_fast.presets import PRESETS, get_preset, with_preset

    pruned = {name: p for name, p in PRESETS.items() if name.endswith("-pruned")}
    expected = {"ld3m-dc-128-ipc1-pruned": (60, 17), "ld3m-dm-128-ipc1-pruned": (20, 27),
                "ld3m-mtt-128-ipc1-pruned": (60, 41), "ld3m-dc-128-ipc10-pruned": (60, 52),
                "ld3m-dm-128-ipc10-pruned": (20, 62), "ld3m-dc-256-ipc1-pruned": (60, 72)}
    assert set(pruned) == set(expected)
    for name, (percent, line) in expected.items():
        preset, base = pruned[name], get_preset(name.removesuffix("-pruned"))
        assert preset.values["prune_percent"] == percent and preset.values["prune_order"] == "asc"
        assert preset.sources["prune_percent"].startswith(f"prune_and_distill readme.md:{line} (--percent={percent}")
        assert preset.sources["prune_order"].startswith(f"prune_and_distill readme.md:{line} (--order=asc")
        assert {k: v for k, v in preset.values.items() if not k.startswith("prune_")} == dict(base.values)
        assert preset.needs == base.needs + ("prune_scorer",)
    given = {"preset": "ld3m-dm-128-ipc1-pruned", "data": "/d", "subset": "a", "prior": "/p"}
    with pytest.raises(LD3MError, match="needs --prune-scorer RESNET18"):
        with_preset(given)
    assert with_preset({**given, "prune_scorer": "train"})["prune_percent"] == 20


def test_ranks_prune_alike_from_rank_zeros_scorer(workspace, tmp_path):
    """Under torchrun, rank 0 trains the scorer and scores; every rank keeps the same images."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "LD3M_FAST_CACHE": str(tmp_path / "user-cache")}
    cache = tmp_path / "cache"  # empty: the scorer is trained in this test
    args = distill_flags(workspace, tmp_path / "two", "--prune-percent", "50")
    args[args.index("--cache-dir") + 1] = str(cache)
    ranks = [subprocess.Popen([sys.executable, "-m", "ld3m_fast", *map(str, args)], text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    outputs = [p.communicate(timeout=900) for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outputs
    assert outputs[0][0].count("training convnet") == 1 and "kept 6 of 12 real images" in outputs[0][0]
    assert "training convnet" not in outputs[1][0]
    recorded = json.loads((tmp_path / "two" / "config.json").read_text())["prune_scorer_hash"]
    cached_losses = list((cache / "prune").glob("losses-*.safetensors"))
    assert len(cached_losses) == 1 and recorded.startswith("sha256:")
