"""The distillation loop: exact resume, NaN stop, atomic checkpoints, run-folder contents."""
import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import safetensors.torch
from ld3m_fast import build_tiny_prior, save_prior
from ld3m_fast.data import load_dataset
from ld3m_fast.distill.algorithms import DM, NetworkSpec
from ld3m_fast.distill.buffers import build_buffer
from ld3m_fast.distill.config import DistillConfig, resolve_defaults
from ld3m_fast.distill.run import CHECKPOINT, PREVIOUS, Distiller, resume_run, start_run
from ld3m_fast.distill.setup import build_setup
from ld3m_fast.errors import LD3MError

RES = 16


CLASSES = 3


def write_image_folder(root, per_class, seed):
    """A tiny ImageFolder tree: CLASSES class folders of noisy, class-tinted PNGs."""
    g = torch.Generator().manual_seed(seed)
    for k in range(CLASSES):
        folder = root / f"class{k}"
        folder.mkdir(parents=True)
        tint = torch.zeros(3, 1, 1)
        tint[k % 3] = 120
        for i in range(per_class):
            pixels = (60 + tint + 60 * torch.rand(3, RES, RES, generator=g)).clamp(0, 255).to(torch.uint8)
            Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    save_prior(build_tiny_prior(num_classes=10, image_size=RES, seed=0), root / "prior")
    write_image_folder(root / "data" / "train", per_class=4, seed=0)
    write_image_folder(root / "data" / "test", per_class=3, seed=1)
    cache = root / "cache"
    data = load_dataset(root / "data", split="train", res=RES, cache_dir=cache)
    spec = NetworkSpec(num_classes=CLASSES, res=RES, width=8)
    build_buffer(root / "buffer", spec, data.images, data.labels, num_experts=1, epochs=3, keep_epochs=3,
                 batch_size=20, seed=0)
    return root


def config(workspace, out, **overrides):
    values = dict(data=str(workspace / "data"), prior=str(workspace / "prior"), ipc=1, steps=2, guidance=1.0, res=RES, width=8,
                  batch_real=4, iterations=6, save_every=3, image_every=3, progress=False,
                  cache_dir=str(workspace / "cache"), max_per_class=4, out=str(out), syn_steps=2,
                  expert_epochs=1, buffer=str(workspace / "buffer"))
    values.update(overrides)
    return DistillConfig(**values)


class Killed(Exception):
    pass


@pytest.mark.parametrize("algorithm, iterations, save_every, kill_at", [("dm", 6, 3, 5), ("mtt", 4, 2, 3)])
def test_kill_and_resume_equals_uninterrupted(workspace, tmp_path, algorithm, iterations, save_every, kill_at):
    settings = dict(algorithm=algorithm, iterations=iterations, save_every=save_every)
    whole = start_run(config(workspace, tmp_path / "whole", **settings))

    def kill(iteration):
        if iteration == kill_at:
            raise Killed  # after iteration `kill_at` ran and logged, past the last checkpoint

    with pytest.raises(Killed):
        start_run(config(workspace, tmp_path / "cut", **settings), on_iteration=kill)
    resumed = resume_run(tmp_path / "cut")
    assert resumed.iteration == whole.iteration == iterations

    a = load_file(tmp_path / "whole" / "final" / "synthetic.safetensors")
    b = load_file(tmp_path / "cut" / "final" / "synthetic.safetensors")
    for key in ("Z", "c", "labels"):
        assert torch.equal(a[key], b[key]), key
    ca, cb = load_file(tmp_path / "whole" / CHECKPOINT), load_file(tmp_path / "cut" / CHECKPOINT)
    assert ca.keys() == cb.keys()
    for key in ca:  # optimiser momentum, student lr, every generator state
        assert torch.equal(ca[key], cb[key]), key
    ia = load_file(tmp_path / "whole" / "final" / "images.safetensors")
    ib = load_file(tmp_path / "cut" / "final" / "images.safetensors")
    assert torch.equal(ia["images"], ib["images"])
    # metrics: one line per iteration, no duplicates from the killed part
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == list(range(1, iterations + 1))
    losses = [json.loads(x)["loss"] for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in lines] == losses


def test_run_folder_contents(workspace, tmp_path):
    run = tmp_path / "run"
    start_run(config(workspace, run, iterations=3, save_every=2, image_every=2))
    assert json.loads((run / "config.json").read_text())["iterations"] == 3
    assert sorted(p.name for p in (run / "images").iterdir()) == ["iter_000002.png", "iter_000003.png"]
    assert any((run / "tb").iterdir())
    for name in ("images.safetensors", "images.png", "synthetic.safetensors"):
        assert (run / "final" / name).is_file()
    images = load_file(run / "final" / "images.safetensors")
    assert images["images"].shape == (CLASSES, 3, RES, RES) and images["labels"].tolist() == list(range(CLASSES))
    assert not [p for p in run.rglob(".ld3m-partial.*")]


def test_nan_loss_stops_and_keeps_last_checkpoint(workspace, tmp_path, monkeypatch):
    original = DM.image_gradient
    calls = {"n": 0}

    def poisoned(self, images, labels, ctx):
        calls["n"] += 1
        loss, grad = original(self, images, labels, ctx)
        return (float("nan"), grad) if calls["n"] == 3 else (loss, grad)

    monkeypatch.setattr(DM, "image_gradient", poisoned)
    run = tmp_path / "run"
    with pytest.raises(LD3MError, match="nan at iteration 3"):
        start_run(config(workspace, run, save_every=1))
    kept = load_file(run / CHECKPOINT)
    from safetensors import safe_open
    with safe_open(str(run / CHECKPOINT), framework="pt") as f:
        assert f.metadata()["iteration"] == "2"
    assert torch.isfinite(kept["Z"]).all() and torch.isfinite(kept["c"]).all()
    assert not (run / "final").exists()


def test_checkpoint_write_is_atomic(workspace, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    distiller = Distiller(build_setup(config(workspace, run)), run)
    distiller.step()
    distiller.save_checkpoint()
    before = (run / CHECKPOINT).read_bytes()

    def crash_mid_write(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_mid_write)
    distiller.step()
    with pytest.raises(LD3MError, match="cannot write .*disk full.*iteration 1 is intact.*--resume"):
        distiller.save_checkpoint()
    assert (run / CHECKPOINT).read_bytes() == before
    assert not [p for p in run.iterdir() if p.name.startswith(".ld3m-partial.")]  # no temporary file left


def test_resume_refuses_changed_settings_and_corrupt_checkpoints(workspace, tmp_path):
    run = tmp_path / "run"
    start_run(config(workspace, run, iterations=1))
    with pytest.raises(LD3MError, match="cannot change ipc"):
        resume_run(run, {"ipc": 2})
    with pytest.raises(LD3MError, match="already exists"):
        start_run(config(workspace, run))
    # A damaged newest checkpoint is passed over for the previous one (said in a line); with both
    # damaged, nothing is left to resume from.
    for name in (CHECKPOINT, PREVIOUS):
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(LD3MError, match="corrupt.*no usable checkpoint is left"):
        resume_run(run, {"iterations": 2})


def test_bad_settings_write_nothing(workspace, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(LD3MError, match="latent factor"):
        start_run(config(workspace, run, res=18))
    with pytest.raises(LD3MError, match="at least 5 images per class"):
        start_run(config(workspace, run, ipc=5))
    assert not run.exists()
    assert os.listdir(tmp_path) == []


def test_inline_eval_is_logged(workspace, tmp_path):
    run = tmp_path / "run"
    start_run(config(workspace, run, iterations=2, eval_every=2, eval_epochs=1, eval_archs="convnet"))
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval" in r]
    assert [r["iteration"] for r in evals] == [2]
    row = evals[0]["eval"]["per_arch"]["convnet"]
    assert 0.0 <= row["mean"] <= 1.0 and len(row["accuracies"]) == 1


def test_attention_stays_sdpa_on_cpu():
    from ld3m_fast.distill.setup import use_memory_efficient_attention

    assert use_memory_efficient_attention(build_tiny_prior(), torch.device("cpu")) == "sdpa"


@pytest.mark.gpu
def test_xformers_attention_on_cuda_when_installed():
    pytest.importorskip("xformers")
    from ld3m_fast.distill.setup import use_memory_efficient_attention

    prior = build_tiny_prior().to("cuda")
    assert use_memory_efficient_attention(prior, torch.device("cuda")) == "xformers"


@pytest.mark.parametrize("res,latent_side", [(RES // 2, RES // 8), (RES * 2, RES // 4)])
def test_render_size_follows_res_up_to_the_native_size(workspace, tmp_path, res, latent_side):
    """Below the prior's size the chain renders at res (cin256-v2 at 128²: a 32×32 latent, as in
    the paper); above it, it renders natively and resizes."""
    setup = build_setup(config(workspace, tmp_path / "run", res=res))
    assert setup.synthetic.Z.shape[-1] == latent_side
    noise = setup.generator.draw_noise(len(setup.synthetic), torch.Generator().manual_seed(0))
    images = setup.generator(setup.synthetic.Z, setup.synthetic.c, noise)
    assert images.shape[-1] == res


@pytest.mark.parametrize("algorithm, lr_latent", [("dm", 0.1), ("dc", None), ("mtt", None)])
def test_embedded_profile_fills_only_what_the_user_left_unset(algorithm, lr_latent):
    resolved = resolve_defaults(DistillConfig(algorithm=algorithm))
    assert (resolved.iterations, resolved.batch_real, resolved.max_per_class) == (120, 64, 500)
    assert resolved.lr_latent == lr_latent and resolved.lr_class == lr_latent  # None: the algorithm's
    mine = resolve_defaults(DistillConfig(algorithm=algorithm, lr_latent=2.0, iterations=3))
    assert (mine.lr_latent, mine.iterations) == (2.0, 3)
    paper = resolve_defaults(DistillConfig(algorithm=algorithm, prior="somewhere"))
    assert (paper.lr_latent, paper.iterations, paper.batch_real) == (None, 10000, 256)
