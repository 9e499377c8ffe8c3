"""Priors straight from diffusers pipeline folders (`ld3m_fast.priors.pipeline`).

Every folder here is written by diffusers itself (`DiTPipeline(...).save_pretrained`,
`LDMPipeline(...).save_pretrained`) from small random components. Checked: the facts read from
the folder, the prior against the diffusers models called the way the pipelines call them,
`ld3m-fast prior import` bit for bit, each refusal in one line, and a short distillation
through `--prior PIPELINE_DIR`.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ld3m_fast.cli.main import main
from ld3m_fast.errors import PriorError
from ld3m_fast.distill.planner.priors import build_planning_prior
from ld3m_fast.priors import load_prior
from ld3m_fast.priors.pipeline import config_files, open_prior_source
from ld3m_fast.priors.tiny import _tiny_autoencoder, _tiny_denoiser

NUM_CLASSES = 10
DIT_SCHEDULE = dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
COMPVIS_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195)
NAMES = {str(k): f"class {k}, alias" for k in range(NUM_CLASSES)}
# layout -> (pipeline class, denoiser kind, autoencoder kind, latent channels)
LAYOUTS = {
    "dit-kl": ("DiTPipeline", "dit", "kl", 4),
    "dit-vq": ("DiTPipeline", "dit", "vq", 3),
    "ldm-unet-vq": ("LDMPipeline", "unet", "vq", 3),
    "ldm-unet-kl": ("LDMPipeline", "unet", "kl", 4),
    "ldm-unet-cond-vq": ("LDMPipeline", "unet-cond", "vq", 3),
}


def _save_pipeline(folder, layout):
    """Build the layout's random components and save them with diffusers' own save_pretrained."""
    import diffusers

    pipeline_class, denoiser_kind, ae_kind, channels = LAYOUTS[layout]
    with torch.random.fork_rng():
        torch.manual_seed(len(layout))  # diffusers initialises through the global RNG
        autoencoder = _tiny_autoencoder(ae_kind, channels)
        denoiser = _tiny_denoiser(denoiser_kind, channels, 8, NUM_CLASSES, embed_dim=32)
        table = torch.randn(NUM_CLASSES + 1, 32)
    if pipeline_class == "DiTPipeline":
        pipeline = diffusers.DiTPipeline(transformer=denoiser, vae=autoencoder,
                                         scheduler=diffusers.DDIMScheduler(**DIT_SCHEDULE))
    else:
        pipeline = diffusers.LDMPipeline(vqvae=autoencoder, unet=denoiser,
                                         scheduler=diffusers.DDIMScheduler(**COMPVIS_SCHEDULE))
    pipeline.save_pretrained(folder)
    if denoiser_kind == "unet-cond":  # CompVis style: the class token table lives beside the UNet
        save_file({"class_table": table}, folder / "class_table.safetensors")
    return folder


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {layout: _save_pipeline(root / layout, layout) for layout in LAYOUTS}


def _copy(pipelines, layout, tmp_path):
    folder = tmp_path / layout
    shutil.copytree(pipelines[layout], folder)
    return folder


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _prior_file(tmp_path, **facts):
    path = tmp_path / "prior.json"
    path.write_text(json.dumps(facts))
    return path


def _loadable(pipelines, layout, tmp_path):
    """The path `--prior` takes for a layout: the folder, or a prior file where the folder lacks a fact."""
    if layout == "ldm-unet-vq":  # LDMPipeline keeps no id2label: the number of classes comes from the user
        return _prior_file(tmp_path, pipeline=str(pipelines[layout]), num_classes=NUM_CLASSES)
    if layout == "ldm-unet-kl":  # id2label in model_index.json, where the hub's DiT folders keep it
        folder = _copy(pipelines, layout, tmp_path)
        _edit_json(folder / "model_index.json", lambda index: index.update(id2label=NAMES))
        return folder
    return pipelines[layout]


def _reference_call(layout, folder, z, t, labels):
    """(eps, decoded z) the way the diffusers pipeline computes them, from its own saved models."""
    import diffusers

    pipeline_class, denoiser_kind, ae_kind, channels = LAYOUTS[layout]
    denoiser_folder, ae_folder = ("transformer", "vae") if pipeline_class == "DiTPipeline" else ("unet", "vqvae")
    ae_class = {"kl": diffusers.AutoencoderKL, "vq": diffusers.VQModel}[ae_kind]
    autoencoder = ae_class.from_pretrained(folder / ae_folder).eval()
    if denoiser_kind == "dit":
        model = diffusers.DiTTransformer2DModel.from_pretrained(folder / denoiser_folder).eval()
        eps = model(z, timestep=t, class_labels=labels).sample[:, :channels]  # DiTPipeline: eps, then sigma
    elif denoiser_kind == "unet":
        model = diffusers.UNet2DModel.from_pretrained(folder / denoiser_folder).eval()
        eps = model(z, t, class_labels=labels).sample
    else:
        model = diffusers.UNet2DConditionModel.from_pretrained(folder / denoiser_folder).eval()
        table = load_file(folder / "class_table.safetensors")["class_table"]
        eps = model(z, t, encoder_hidden_states=table[labels][:, None]).sample
    return eps, autoencoder.decode(z / autoencoder.config.scaling_factor).sample


# ----------------------------------------------------------------------------- the facts

@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_saved_pipeline_is_the_pipeline_s_own_model(pipelines, layout, tmp_path):
    prior = load_prior(_loadable(pipelines, layout, tmp_path))
    pipeline_class, denoiser_kind, ae_kind, channels = LAYOUTS[layout]
    assert (prior.num_classes, prior.null_index, prior.image_size) == (NUM_CLASSES, NUM_CLASSES, 32)
    assert prior.latent_shape() == (channels, 8, 8)
    assert prior.conditioning == {"dit": "adaln", "unet": "class_embedding",
                                  "unet-cond": "cross_attention"}[denoiser_kind]
    assert prior.autoencoder.scaling_factor == {"kl": 0.5, "vq": 1.0}[ae_kind]
    schedule = DIT_SCHEDULE if pipeline_class == "DiTPipeline" else COMPVIS_SCHEDULE
    from diffusers import DDIMScheduler

    torch.testing.assert_close(prior.alphas_cumprod, DDIMScheduler(**schedule).alphas_cumprod.double(),
                               rtol=0, atol=0)
    if layout == "ldm-unet-kl":
        assert prior.class_names == [NAMES[str(k)] for k in range(NUM_CLASSES)]
    # Feeding a class-table row is feeding its label, the null row included.
    folder = pipelines[layout]
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(3, channels, 8, 8, generator=generator)
    t = torch.tensor([1, 500, 999])
    labels = torch.tensor([0, 7, NUM_CLASSES])
    eps, decoded = _reference_call(layout, folder, z, t, labels)
    assert torch.equal(prior.eps(z, t, prior.class_table[labels]), eps)
    assert torch.equal(prior.decode(z), decoded)


def test_the_facts_say_where_they_come_from(pipelines):
    facts = dict(open_prior_source(pipelines["dit-kl"]).facts)
    assert facts["classes"] == "10: transformer/config.json num_embeds_ada_norm"
    assert facts["null class"].startswith("row 10: ")
    assert facts["scaling factor"] == "0.5: vae/config.json scaling_factor"
    assert facts["native image size"].startswith("32: transformer/config.json sample_size 8 x the latent factor 4")
    assert facts["noise schedule"] == "scheduler/scheduler_config.json (DDIMScheduler)"


def test_the_hub_s_legacy_dit_layout_loads(pipelines, tmp_path):
    """facebook/DiT-XL-2-256 names its transformer Transformer2DModel (diffusers remaps it to
    DiTTransformer2DModel), keeps id2label in model_index.json and may hold `.bin` weights."""
    folder = _copy(pipelines, "dit-kl", tmp_path)

    def legacy(index):
        index["transformer"] = ["diffusers", "Transformer2DModel"]
        index["id2label"] = NAMES

    _edit_json(folder / "model_index.json", legacy)
    _edit_json(folder / "transformer" / "config.json",
               lambda c: c.update(_class_name="Transformer2DModel", cross_attention_dim=None,
                                  num_vector_embeds=None, only_cross_attention=False))
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "transformer" / "diffusion_pytorch_model.bin")
    weights.unlink()
    prior, reference = load_prior(folder), load_prior(pipelines["dit-kl"])
    assert prior.class_names[3] == "class 3, alias" and prior.conditioning == "adaln"
    z, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 600])
    assert torch.equal(prior.eps(z, t, prior.class_table[:2]), reference.eps(z, t, reference.class_table[:2]))


def test_the_planner_builds_a_pipeline_s_architecture(pipelines):
    prior = build_planning_prior(str(pipelines["dit-kl"]))
    assert (prior.num_classes, prior.image_size, prior.conditioning) == (NUM_CLASSES, 32, "adaln")


# ----------------------------------------------------------------------------- prior import

@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_import_gives_the_same_prior_bit_for_bit(pipelines, layout, tmp_path):
    source = _loadable(pipelines, layout, tmp_path)
    out = tmp_path / "imported"
    assert main(["prior", "import", str(source), str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left
    assert json.loads((out / "ld3m_prior.json").read_text())["format"] == "ld3m-fast-prior"
    direct, imported = load_prior(source), load_prior(out)
    assert (imported.num_classes, imported.image_size, imported.class_names, imported.autoencoder.scaling_factor) \
        == (direct.num_classes, direct.image_size, direct.class_names, direct.autoencoder.scaling_factor)
    assert torch.equal(imported.class_table, direct.class_table)
    assert torch.equal(imported.alphas_cumprod, direct.alphas_cumprod)
    generator = torch.Generator().manual_seed(2)
    z = torch.randn(2, *direct.latent_shape(), generator=generator)
    t, rows = torch.tensor([11, 901]), direct.class_table[[4, NUM_CLASSES]]
    assert torch.equal(imported.eps(z, t, rows), direct.eps(z, t, rows))
    assert torch.equal(imported.decode(z), direct.decode(z))
    x = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    assert torch.equal(imported.encode(x), direct.encode(x))
    assert torch.equal(imported.anchor(z), direct.anchor(z))


def test_import_checks_its_output_before_reading_anything(pipelines, tmp_path, monkeypatch, capsys):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the pipeline was read before the output was checked")

    monkeypatch.setattr("ld3m_fast.priors.io.build_prior", must_not_load)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    cases = [(tmp_path / "full", "exists and is not empty; pass --force"),
             (tmp_path / "file", "exists and is not a folder"),
             (pipelines["dit-kl"] / "copy", "overlaps the pipeline")]
    for out, fragment in cases:
        assert main(["prior", "import", str(pipelines["dit-kl"]), str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ld3m-fast prior import: error: ") and fragment in err[0], err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and not (pipelines["dit-kl"] / "copy").exists()


# ----------------------------------------------------------------------------- refusals, one line each

def _without_scheduler(folder):
    shutil.rmtree(folder / "scheduler")
    _edit_json(folder / "model_index.json", lambda index: index.pop("scheduler"))


def _unconditional_unet(folder):
    _edit_json(folder / "unet" / "config.json", lambda c: c.update(num_class_embeds=None))


REFUSALS = [
    ("ldm-unet-vq", lambda f: None, "the number of classes and the null class cannot be read",
     '"num_classes": 10} to a JSON file'),
    ("ldm-unet-vq", _unconditional_unet, "unet is not class-conditional", None),
    ("ldm-unet-vq", lambda f: _edit_json(f / "model_index.json", lambda i: i.update(id2label={
        str(k): str(k) for k in range(NUM_CLASSES + 1)})), "has no null class", None),
    ("dit-kl", lambda f: _edit_json(f / "vae" / "config.json", lambda c: c.pop("scaling_factor")),
     "the autoencoder's scaling factor cannot be read", '"scaling_factor": 1.0}'),
    ("dit-kl", lambda f: _edit_json(f / "vae" / "config.json", lambda c: c.update(shift_factor=0.06)),
     "shift_factor 0.06", None),
    ("dit-kl", lambda f: _edit_json(f / "transformer" / "config.json", lambda c: c.update(sample_size=None)),
     "the native image size cannot be read", '"image_size": 256}'),
    ("dit-kl", _without_scheduler, "the noise schedule cannot be read", None),
    ("dit-kl", lambda f: _edit_json(f / "model_index.json", lambda i: i.update(
        transformer=["diffusers", "SD3Transformer2DModel"])), "lists no denoiser ld3m-fast can use", None),
    ("dit-kl", lambda f: _edit_json(f / "model_index.json", lambda i: i.update(id2label={"0": "a"})),
     "names 1 classes but the denoiser has 10", None),
    ("ldm-unet-cond-vq", lambda f: (f / "class_table.safetensors").unlink(),
     "the class table cannot be read", '"class_table": "class_table.safetensors"}'),
    ("dit-kl", lambda f: _edit_json(f / "scheduler" / "scheduler_config.json",
                                    lambda c: c.update(prediction_type="v_prediction")),
     "needs a noise-predicting (epsilon) model", None),
]


@pytest.mark.parametrize("layout,damage,fragment,supply", REFUSALS, ids=[r[2][:40] for r in REFUSALS])
def test_what_cannot_be_inferred_is_refused_in_one_line(pipelines, tmp_path, capsys, layout, damage, fragment,
                                                        supply):
    folder = _copy(pipelines, layout, tmp_path)
    damage(folder)
    with pytest.raises(PriorError) as caught:
        load_prior(folder)
    message = str(caught.value)
    assert fragment in message and "\n" not in message, message
    if supply is not None:  # the fact's prior-file key, and how to pass the file
        assert supply in message and "pass that file as the prior (--prior FILE" in message, message
    assert main(["prior", "import", str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_prior_file_gives_the_missing_facts(pipelines, tmp_path):
    folder = _copy(pipelines, "ldm-unet-vq", tmp_path)
    _edit_json(folder / "vqvae" / "config.json", lambda c: c.pop("scaling_factor"))
    names = [f"n{k}" for k in range(NUM_CLASSES)]
    prior = load_prior(_prior_file(tmp_path, pipeline=folder.name, null_class=NUM_CLASSES, scaling_factor=2.0,
                                   class_names=names))
    assert (prior.num_classes, prior.autoencoder.scaling_factor, prior.class_names) == (NUM_CLASSES, 2.0, names)
    assert config_files(tmp_path / "prior.json")[0] == tmp_path / "prior.json"  # what a plan cache keys on
    assert {p.relative_to(folder).as_posix() for p in config_files(tmp_path / "prior.json")[1:]} == {
        "model_index.json", "unet/config.json", "vqvae/config.json", "scheduler/scheduler_config.json"}
    # A fact still missing is asked for as a key to add to the prior file the user has.
    with pytest.raises(PriorError) as caught:
        load_prior(_prior_file(tmp_path, pipeline=folder.name, num_classes=NUM_CLASSES))
    assert f'add "scaling_factor": 1.0 to the prior file {tmp_path / "prior.json"}' in str(caught.value)
    bad = [({"pipeline": folder.name, "num_classes": 10, "classes": 3}, "unknown key(s) 'classes'"),
           ({"num_classes": 10}, "must name its pipeline folder"),
           ({"pipeline": "nowhere"}, "its pipeline folder"),
           ({"pipeline": folder.name, "null_class": 0}, "null_class 0 does not fit unet/config.json num_class_embeds 11"),
           ({"pipeline": folder.name, "num_classes": 10, "null_class": 9}, "is not the last row"),
           ({"pipeline": folder.name, "num_classes": 7}, "num_classes 7 does not fit unet/config.json num_class_embeds 11"),
           ({"pipeline": folder.name, "num_classes": "ten"}, "\"num_classes\" must be a positive integer")]
    for facts, fragment in bad:
        with pytest.raises(PriorError) as caught:
            load_prior(_prior_file(tmp_path, **facts))
        assert fragment in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_a_hub_id_is_never_downloaded(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    for name in ("snapshot_download", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, name, no_download)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PriorError) as caught:
        load_prior("facebook/DiT-XL-2-256")
    message = str(caught.value)
    assert "download the pipeline folder first" in message and "ld3m-fast never downloads" in message
    assert "hf download facebook/DiT-XL-2-256 --local-dir DiT-XL-2-256" in message and "\n" not in message
    assert main(["prior", "import", "facebook/DiT-XL-2-256", "out"]) == 2
    assert main(["plan", "--prior", "facebook/DiT-XL-2-256", "--res", "256", "--ipc", "1", "--classes", "2",
                 "--steps", "2", "--chunk", "1", "--memory-budget", "4GiB"]) == 2
    for line in capsys.readouterr().err.strip().splitlines():
        assert "download the pipeline folder first" in line, line
    # A relative path under an existing folder is a path, not a hub id.
    (tmp_path / "priors").mkdir()
    with pytest.raises(PriorError, match="prior folder priors/cin256-v2 does not exist"):
        load_prior("priors/cin256-v2")


# ----------------------------------------------------------------------------- distilling through one

DISTILL = ["--iterations", "2", "--ipc", "1", "--steps", "2", "--batch-real", "8", "--threads", "1",
           "--no-progress", "--data", "fashion-mnist", "--max-per-class", "16"]


@pytest.mark.parametrize("layout", ["dit-kl", "ldm-unet-vq"])
def test_distill_through_a_pipeline_prior(pipelines, layout, tmp_path):
    prior = _loadable(pipelines, layout, tmp_path)
    out = tmp_path / "run"
    assert main(["distill", "--prior", str(prior), *DISTILL, "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["prior"] == str(prior) and config["iterations"] == 2
    images = load_file(out / "final" / "images.safetensors")
    assert images["images"].shape[:2] == (NUM_CLASSES, 3) and torch.isfinite(images["images"]).all()
