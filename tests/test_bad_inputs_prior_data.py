"""Bad prior folders and bad data folders: one clear error line each, never a traceback.

Each row of a table damages one thing (a file truncated, a JSON value of the wrong type,
a path leading out of the prior folder, ...) and names a fragment the error must contain.
The library call must raise `PriorError` / `LD3MError`; a representative subset also goes
through the CLI in-process (`ld3m_fast.cli.main.main`): exit code 2, exactly one stderr line
`ld3m-fast <command>: error: ...`, no traceback, and no run folder left behind.
"""
import gzip
import json
import logging
import os
import re
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ld3m_fast import build_tiny_prior, save_prior
from ld3m_fast.cli.main import main
from ld3m_fast.data import load_dataset
from ld3m_fast.errors import LD3MError, PriorError
from ld3m_fast.distill.planner.priors import prior_architecture
from ld3m_fast.priors import Prior, load_prior

RES = 16
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
VQ_WEIGHTS = "vqvae/diffusion_pytorch_model.safetensors"
INDEX = "unet/diffusion_pytorch_model.safetensors.index.json"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One good cross-attention prior (VQ, 16², 10 classes) and one good image folder."""
    root = tmp_path_factory.mktemp("bad-inputs")
    save_prior(build_tiny_prior(num_classes=10, image_size=RES, seed=0), root / "prior")
    for k in range(2):
        for i in range(2):
            _png(root / "images" / f"class{k}" / f"{i}.png", seed=10 * k + i)
    return root


def _png(path: Path, seed: int = 0, mode: str = "RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (RES, RES, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)


# ----------------------------------------------------------------------------- damage helpers

def _edit_json(relative, change):
    def damage(prior: Path):
        path = prior / relative
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    return damage


def _write(relative, content):
    def damage(prior: Path):
        path = prior / relative
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return damage


def _truncate(relative):
    def damage(prior: Path):
        path = prior / relative
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    return damage


def _shard(prior: Path) -> dict:
    """Split the UNet weights into two shards named by an index, as diffusers does."""
    weights = load_file(prior / UNET_WEIGHTS)
    (prior / UNET_WEIGHTS).unlink()
    keys = sorted(weights)
    halves = {"s1.safetensors": keys[: len(keys) // 2], "s2.safetensors": keys[len(keys) // 2:]}
    for name, names in halves.items():
        save_file({k: weights[k] for k in names}, prior / "unet" / name)
    weight_map = {k: name for name, names in halves.items() for k in names}
    (prior / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def _sharded(then=None):
    def damage(prior: Path):
        weight_map = _shard(prior)
        if then is not None:
            then(prior, weight_map)
    return damage


def _rename_shard(new_name, move_to=None):
    """Point the index's second shard at `new_name` (the file moved to `move_to`)."""
    def then(prior: Path, weight_map: dict):
        if move_to is not None:
            shutil.move(prior / "unet" / "s2.safetensors", move_to(prior))
        name = new_name(prior) if callable(new_name) else new_name
        index = {"weight_map": {k: (name if v == "s2.safetensors" else v) for k, v in weight_map.items()}}
        (prior / INDEX).write_text(json.dumps(index))
    return then


def _subfolder_outside(prior: Path):
    """The denoiser subfolder '../<copy>/unet': a real, loadable copy, but outside the prior."""
    outside = prior.parent / "elsewhere"
    shutil.copytree(prior / "unet", outside / "unet")
    _edit_json("ld3m_prior.json", lambda m: m["denoiser"].update(subfolder="../elsewhere/unet"))(prior)


def _symlinked_subfolder(prior: Path):
    outside = prior.parent / "elsewhere-unet"
    shutil.move(prior / "unet", outside)
    os.symlink(outside, prior / "unet")


def _symlinked_config(prior: Path):
    outside = prior.parent / "config.json"
    shutil.move(prior / "unet" / "config.json", outside)
    os.symlink(outside, prior / "unet" / "config.json")


def _map_weights(relative, change):
    def damage(prior: Path):
        path = prior / relative
        weights = load_file(path)
        save_file(change(weights), path)
    return damage


def _with_nan(weights):
    key = sorted(k for k, v in weights.items() if v.is_floating_point())[0]
    weights[key] = weights[key].clone()
    weights[key].view(-1)[0] = float("nan")
    return weights


def _table(tensors):
    return lambda prior: save_file(tensors, prior / "class_table.safetensors")


_NAN_TABLE = torch.randn(11, 32)
_NAN_TABLE[3, 4] = float("inf")

# (id, damage, fragment of load_prior's error, what prior_architecture does:
#  None = succeeds (it reads no weights), "same" = the same error, or its own fragment)
PRIOR_CASES = [
    # weights and class table files
    ("unet-weights-truncated", _truncate(UNET_WEIGHTS), "cannot read weights file", None),
    ("vq-weights-random-bytes", _write(VQ_WEIGHTS, os.urandom(4096)), "corrupt safetensors", None),
    ("vq-weights-empty", _write(VQ_WEIGHTS, b""), "cannot read weights file", None),
    ("class-table-truncated", _truncate("class_table.safetensors"), "cannot read class table", None),
    ("class-table-random-bytes", _write("class_table.safetensors", os.urandom(300)),
     "cannot read class table", None),
    ("weights-integer-dtype",
     _map_weights(UNET_WEIGHTS, lambda w: {k: v.to(torch.int32) for k, v in w.items()}),
     "with wrong dtype (", None),
    ("weights-nan", _map_weights(VQ_WEIGHTS, _with_nan), "hold NaN or inf", None),
    ("weights-missing", lambda p: (p / UNET_WEIGHTS).unlink(), "has no diffusion_pytorch_model", None),
    # sharded weights
    ("shard-missing", _sharded(lambda p, m: (p / "unet" / "s2.safetensors").unlink()),
     "shard 's2.safetensors' named in", None),
    ("shard-truncated", _sharded(lambda p, m: _truncate("unet/s1.safetensors")(p)),
     "cannot read weights shard", None),
    ("index-invalid-json", _sharded(lambda p, m: _write(INDEX, '{"weight_map": {')(p)),
     "is not valid JSON", None),
    ("index-without-weight-map", _sharded(lambda p, m: _write(INDEX, '{"weights": []}')(p)),
     'has no "weight_map" object', None),
    ("shard-dotdot-outside",
     _sharded(_rename_shard("../../s2.safetensors", move_to=lambda p: p.parent / "s2.safetensors")),
     "outside the prior folder", None),
    ("shard-absolute", _sharded(_rename_shard(lambda p: str(p / "unet" / "s2.safetensors"))),
     "is an absolute path", None),
    # model configs
    ("unet-config-invalid-json", _write("unet/config.json", '{"in_channels": '), "is not valid JSON", "same"),
    ("unet-config-not-an-object", _write("unet/config.json", "[1, 2]"),
     "must hold a JSON object, not a list", "same"),
    ("unet-config-wrong-type", _edit_json("unet/config.json", lambda c: c.update(layers_per_block="two")),
     "layers_per_block must be a positive integer", "same"),
    ("unet-config-unknown-block", _edit_json("unet/config.json",
                                             lambda c: c.update(down_block_types=["Nope", "DownBlock2D"])),
     "is not a valid UNet2DConditionModel config (", "same"),
    ("vq-config-missing-key", _edit_json("vqvae/config.json", lambda c: c.pop("latent_channels")),
     "latent_channels missing", "same"),
    ("vq-config-negative", _edit_json("vqvae/config.json", lambda c: c.update(norm_num_groups=-8)),
     "norm_num_groups must be a positive integer", "same"),
    ("unet-channels-not-the-latent",
     _edit_json("unet/config.json", lambda c: c.update(in_channels=4)),
     "with wrong shape", "the denoiser takes 4 latent channels but the autoencoder makes 3"),
    # scheduler config
    ("scheduler-invalid-json", _write("scheduler/scheduler_config.json", "{"), "is not valid JSON", "same"),
    ("scheduler-wrong-type",
     _edit_json("scheduler/scheduler_config.json", lambda c: c.update(num_train_timesteps="many")),
     "num_train_timesteps must be an integer >= 2, got 'many'", "same"),
    ("scheduler-empty", _write("scheduler/scheduler_config.json", "{}"),
     "num_train_timesteps must be an integer >= 2, got nothing", "same"),
    ("scheduler-beta-above-one",
     _edit_json("scheduler/scheduler_config.json", lambda c: c.update(beta_end=1.5)),
     "beta_end must be a number in (0, 1)", "same"),
    ("scheduler-unknown-schedule",
     _edit_json("scheduler/scheduler_config.json", lambda c: c.update(beta_schedule="cosine")),
     "beta_schedule must be one of", "same"),
    ("scheduler-v-prediction",
     _edit_json("scheduler/scheduler_config.json", lambda c: c.update(prediction_type="v_prediction")),
     "needs a noise-predicting (epsilon) model", "same"),
    # manifest
    ("manifest-class-is-a-scheduler",
     _edit_json("ld3m_prior.json", lambda m: m["denoiser"].update({"class": "DDIMScheduler"})),
     "denoiser class 'DDIMScheduler' is not a supported denoiser model", "same"),
    ("manifest-class-is-a-module",
     _edit_json("ld3m_prior.json", lambda m: m["denoiser"].update({"class": "utils"})),
     "denoiser class 'utils' is not a supported denoiser model", "same"),
    ("manifest-class-is-a-string-attribute",
     _edit_json("ld3m_prior.json", lambda m: m["autoencoder"].update({"class": "__version__"})),
     "autoencoder class '__version__' is not a supported autoencoder model", "same"),
    ("manifest-class-does-not-fit-conditioning",
     _edit_json("ld3m_prior.json", lambda m: m.update(conditioning="adaln")),
     "does not fit conditioning 'adaln'", "same"),
    ("manifest-num-classes-a-word", _edit_json("ld3m_prior.json", lambda m: m.update(num_classes="ten")),
     "\"num_classes\" must be a positive integer, got 'ten'", "same"),
    ("manifest-image-size-missing", _edit_json("ld3m_prior.json", lambda m: m.pop("image_size")),
     "\"image_size\" must be a positive integer, got nothing", "same"),
    ("manifest-denoiser-not-an-object", _edit_json("ld3m_prior.json", lambda m: m.update(denoiser="unet")),
     "\"denoiser\" must be an object", "same"),
    ("manifest-scaling-factor-zero",
     _edit_json("ld3m_prior.json", lambda m: m["autoencoder"].update(scaling_factor=0)),
     "\"scaling_factor\" must be a positive number", "same"),
    ("manifest-class-names-too-few", _edit_json("ld3m_prior.json", lambda m: m.update(class_names=["a"])),
     "\"class_names\" must be null or a list of 10 strings", "same"),
    ("manifest-newer-version", _edit_json("ld3m_prior.json", lambda m: m.update(version=99)),
     "upgrade ld3m-fast", "same"),
    ("manifest-not-an-object", _write("ld3m_prior.json", "[]"), "must hold a JSON object", "same"),
    ("manifest-not-text", _write("ld3m_prior.json", b"\xff\xfe\x00\x01"), "cannot read prior manifest", "same"),
    # paths leading out of the folder
    ("subfolder-dotdot-outside", _subfolder_outside, "outside the prior folder", "same"),
    ("subfolder-absolute",
     _edit_json("ld3m_prior.json", lambda m: m["denoiser"].update(subfolder="/tmp")),
     "denoiser subfolder '/tmp' is an absolute path", "same"),
    ("subfolder-symlink-outside", _symlinked_subfolder, "outside the prior folder", "same"),
    ("config-symlink-outside", _symlinked_config, "outside the prior folder", "same"),
    # class table content
    ("class-table-wrong-rows", _table({"class_table": torch.randn(5, 32)}),
     "class table has 5 rows, expected num_classes + 1 = 11", None),
    ("class-table-one-dimensional", _table({"class_table": torch.randn(11)}),
     "must be a 2-D floating-point tensor", None),
    ("class-table-integer", _table({"class_table": torch.zeros(11, 32, dtype=torch.int64)}),
     "must be a 2-D floating-point tensor", None),
    ("class-table-wrong-key", _table({"embedding": torch.randn(11, 32)}),
     "has no tensor named 'class_table' (it holds embedding)", None),
    ("class-table-wrong-width", _table({"class_table": torch.randn(11, 7)}),
     "the class table has 7 values per row but the UNet's cross_attention_dim is 32", None),
    ("class-table-inf", _table({"class_table": _NAN_TABLE}), "hold NaN or inf", None),
]
CLI_PRIOR_CASES = {"unet-weights-truncated", "shard-missing", "index-invalid-json",
                   "unet-config-wrong-type", "scheduler-wrong-type", "manifest-class-is-a-scheduler",
                   "manifest-num-classes-a-word", "subfolder-dotdot-outside", "shard-dotdot-outside",
                   "class-table-wrong-width", "weights-nan"}
PLAN_PRIOR_CASES = {"manifest-class-is-a-module", "manifest-image-size-missing",
                    "subfolder-symlink-outside", "vq-config-missing-key", "scheduler-empty"}


def _damaged(base: Path, tmp_path: Path, damage) -> Path:
    prior = tmp_path / "prior"
    shutil.copytree(base / "prior", prior)
    damage(prior)
    return prior


def _case_ids(cases):
    return [case[0] for case in cases]


def _only(cases, names):
    return [case for case in cases if case[0] in names]


@pytest.mark.parametrize("name,damage,fragment,architecture", PRIOR_CASES, ids=_case_ids(PRIOR_CASES))
def test_bad_prior_is_one_prior_error(base, tmp_path, name, damage, fragment, architecture):
    prior = _damaged(base, tmp_path, damage)
    with pytest.raises(PriorError) as caught:
        load_prior(prior)
    message = str(caught.value)
    assert fragment in message and "\n" not in message, message
    # The planner reads the same manifest and configs through the same checks, but no weights.
    if architecture is None:
        assert isinstance(prior_architecture(prior), Prior)
    else:
        with pytest.raises(PriorError) as caught:
            prior_architecture(prior)
        expected = fragment if architecture == "same" else architecture
        assert expected in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_a_file_is_not_a_prior_folder(base, tmp_path):
    (tmp_path / "prior.safetensors").write_bytes(b"")
    for call in (load_prior, prior_architecture):
        with pytest.raises(PriorError, match="prior.safetensors is not a folder"):
            call(tmp_path / "prior.safetensors")


def test_nothing_outside_the_prior_is_read_when_refused(base, tmp_path):
    """A '..' subfolder is refused although the folder it names would load."""
    prior = _damaged(base, tmp_path, _subfolder_outside)
    assert (tmp_path / "elsewhere" / "unet" / "config.json").is_file()
    with pytest.raises(PriorError, match="outside the prior folder"):
        load_prior(prior)


def test_accepted_variants_still_load(base, tmp_path):
    """Not everything unusual is an error: half-precision weights, sharded weights, a
    subfolder spelled with a '..' that stays inside, and a symlink within the folder."""
    def variants(prior: Path):
        _map_weights(VQ_WEIGHTS, lambda w: {k: v.half() for k, v in w.items()})(prior)
        _shard(prior)
        _edit_json("ld3m_prior.json", lambda m: m["denoiser"].update(subfolder="vqvae/../unet"))(prior)
        shutil.move(prior / "scheduler" / "scheduler_config.json", prior / "schedule.json")
        os.symlink(prior / "schedule.json", prior / "scheduler" / "scheduler_config.json")

    prior = load_prior(_damaged(base, tmp_path, variants))
    reference = load_prior(base / "prior")
    assert torch.equal(prior.class_table, reference.class_table)
    for (name, a), (_, b) in zip(prior.named_parameters(), reference.named_parameters()):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), name  # the VQ weights went through fp16


# ----------------------------------------------------------------------------- the CLI

def _assert_one_error_line(code, captured, *fragments):
    assert code == 2, captured.err
    assert "Traceback" not in captured.err, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("ld3m-fast ") and ": error: " in lines[0], lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _distill(prior, data, out, cache):
    return main(["distill", "--prior", str(prior), "--data", str(data), "--res", str(RES), "--ipc", "1",
                 "--steps", "2", "--guidance", "1", "--width", "8", "--batch-real", "2",
                 "--iterations", "1", "--cache-dir", str(cache), "--out", str(out), "--no-progress"])


@pytest.mark.parametrize("name,damage,fragment,architecture", _only(PRIOR_CASES, CLI_PRIOR_CASES),
                         ids=_case_ids(_only(PRIOR_CASES, CLI_PRIOR_CASES)))
def test_cli_distill_with_a_bad_prior(base, tmp_path, capsys, name, damage, fragment, architecture):
    prior = _damaged(base, tmp_path, damage)
    run = tmp_path / "run"
    code = _distill(prior, base / "images", run, tmp_path / "cache")
    _assert_one_error_line(code, capsys.readouterr(), "ld3m-fast distill: error: ", fragment)
    assert not run.exists()


@pytest.mark.parametrize("name,damage,fragment,architecture", _only(PRIOR_CASES, PLAN_PRIOR_CASES),
                         ids=_case_ids(_only(PRIOR_CASES, PLAN_PRIOR_CASES)))
def test_cli_plan_with_a_bad_prior(base, tmp_path, capsys, name, damage, fragment, architecture):
    prior = _damaged(base, tmp_path, damage)
    code = main(["plan", "--prior", str(prior), "--res", str(RES), "--ipc", "1", "--classes", "2",
                 "--steps", "2", "--chunk", "1", "--memory-budget", "4GiB"])
    _assert_one_error_line(code, capsys.readouterr(), "ld3m-fast plan: error: ", fragment)


# ----------------------------------------------------------------------------- data folders

def _image_folder(root: Path, bad_class: dict):
    """Class 'a' holds one good PNG; class 'b' holds `bad_class` {name: bytes}."""
    _png(root / "a" / "1.png")
    (root / "b").mkdir(parents=True)
    for name, content in bad_class.items():
        (root / "b" / name).write_bytes(content)


def _cifar(root: Path, change=None, raw: bytes | None = None, meta=None):
    """A CIFAR-10 folder of 4-image batches; `change` edits test_batch's dict, `raw` replaces it."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), b"labels": list(range(10))}
        if name == "test_batch" and change is not None:
            batch = change(batch)
        with open(root / name, "wb") as handle:
            if name == "test_batch" and raw is not None:
                handle.write(raw)
            else:
                pickle.dump(batch, handle)
    if meta is not None:
        with open(root / "batches.meta", "wb") as handle:
            pickle.dump(meta, handle)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def _idx(root: Path, images=None, labels=None, images_raw: bytes | None = None, gz: bool = False):
    """Fashion-MNIST-layout IDX files for both splits."""
    root.mkdir(parents=True)
    images = np.zeros((10, 8, 8), np.uint8) if images is None else images
    labels = np.arange(10, dtype=np.uint8) if labels is None else labels

    def encode(array, code):
        return (bytes([0, 0, code, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
                + array.tobytes())

    codes = {np.dtype(np.uint8): 0x08, np.dtype(">f4"): 0x0D}
    blobs = {"images-idx3-ubyte": images_raw if images_raw is not None else encode(images, codes[images.dtype]),
             "labels-idx1-ubyte": encode(labels, codes[labels.dtype])}
    for split in ("train", "t10k"):
        for kind, blob in blobs.items():
            name = f"{split}-{kind}" + (".gz" if gz else "")
            (root / name).write_bytes(gzip.compress(blob) if gz else blob)


def _corrupt_gzip(root: Path):
    _idx(root, gz=True)
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        raw = bytearray((root / name).read_bytes())
        raw[-8:] = b"\x00" * 8  # wrong CRC and length
        (root / name).write_bytes(bytes(raw))


DATA_CASES = [
    ("class-folder-empty", lambda r: _image_folder(r, {}), "holds no image files"),
    ("class-folder-only-text", lambda r: _image_folder(r, {"notes.txt": b"hello"}), "holds no image files"),
    ("class-only-corrupt-images", lambda r: _image_folder(r, {"x.png": b"\x89PNG garbage"}),
     "no readable images for class(es) b (e.g. x.png"),
    ("class-only-empty-file", lambda r: _image_folder(r, {"x.jpg": b""}), "no readable images for class(es) b"),
    ("cifar-random-bytes", lambda r: _cifar(r, raw=os.urandom(2000)), "cannot read CIFAR-10 batch"),
    ("cifar-truncated", lambda r: _cifar(r, raw=pickle.dumps({b"data": np.zeros((10, 3072), np.uint8)})[:300]),
     "cannot read CIFAR-10 batch"),
    ("cifar-runs-code", lambda r: _cifar(r, change=lambda b: {**b, b"data": _RunsCode()}), "refusing to load"),
    ("cifar-not-a-dict", lambda r: _cifar(r, change=lambda b: [1, 2, 3]), "holds a list, not a dict"),
    ("cifar-no-data", lambda r: _cifar(r, change=lambda b: {b"labels": b[b"labels"]}),
     "no 'data' and 'labels' entries"),
    ("cifar-float-pixels", lambda r: _cifar(r, change=lambda b: {**b, b"data": b[b"data"] / 255.0}),
     "'data' must hold integers in 0..255, got float64"),
    ("cifar-wide-pixels", lambda r: _cifar(r, change=lambda b: {**b, b"data": b[b"data"].astype(np.int64) + 256}),
     "'data' must hold integers in 0..255, got int64"),
    ("cifar-wrong-row-size", lambda r: _cifar(r, change=lambda b: {**b, b"data": b[b"data"][:, :1000]}),
     "'data' must be an (N, 3072) array"),
    ("cifar-labels-too-few", lambda r: _cifar(r, change=lambda b: {**b, b"labels": [0, 1]}),
     "'labels' must be 10 integers"),
    ("cifar-meta-names-not-a-list", lambda r: _cifar(r, meta={b"label_names": 10}),
     "'label_names' must be a list of class names"),
    ("idx-header-cut", lambda r: _idx(r, images_raw=bytes([0, 0, 8, 3, 0, 0])), "its header is cut short"),
    ("idx-data-cut", lambda r: _idx(r, images_raw=bytes([0, 0, 8, 3]) + b"\x00\x00\x00\x0a" + b"\x00\x00\x00\x08" * 2
                                    + b"\x00" * 100), "is truncated or corrupt (100 data bytes, expected 640)"),
    ("idx-absurd-size", lambda r: _idx(r, images_raw=bytes([0, 0, 8, 3]) + b"\x80\x00\x00\x00" * 3),
     "is truncated or corrupt"),
    ("idx-float-images", lambda r: _idx(r, images=np.zeros((10, 8, 8), ">f4")), "unsigned bytes"),
    ("idx-empty-images", lambda r: _idx(r, images=np.zeros((10, 0, 8), np.uint8)), "with H, W > 0"),
    ("idx-gzip-corrupt", _corrupt_gzip, "cannot read IDX file"),
    ("idx-count-mismatch", lambda r: _idx(r, labels=np.arange(4, dtype=np.uint8)), "IDX files in"),
    ("idx-label-out-of-range", lambda r: _idx(r, labels=np.full(10, 12, np.uint8)), "labels outside 0..9"),
]
CLI_DATA_CASES = {"class-folder-empty", "class-only-corrupt-images", "cifar-runs-code",
                  "cifar-float-pixels", "idx-data-cut", "idx-gzip-corrupt"}


@pytest.mark.parametrize("name,make,fragment", DATA_CASES, ids=_case_ids(DATA_CASES))
def test_bad_data_is_one_error(tmp_path, name, make, fragment):
    make(tmp_path / "data")
    split = "test" if name.startswith("cifar") else "train"
    with pytest.raises(LD3MError) as caught:
        load_dataset(tmp_path / "data", split=split, res=8, cache_dir=tmp_path / "cache")
    assert fragment in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
    assert not list((tmp_path / "cache").glob("*.npz"))


@pytest.mark.parametrize("name,make,fragment", _only(DATA_CASES, CLI_DATA_CASES),
                         ids=_case_ids(_only(DATA_CASES, CLI_DATA_CASES)))
def test_cli_distill_with_bad_data(base, tmp_path, capsys, name, make, fragment):
    data = tmp_path / "data"
    make(data)
    if name.startswith("cifar"):  # distill reads the train batches: damage one of them too
        shutil.copy(data / "test_batch", data / "data_batch_3")
    run = tmp_path / "run"
    code = _distill(base / "prior", data, run, tmp_path / "cache")
    _assert_one_error_line(code, capsys.readouterr(), "ld3m-fast distill: error: ", fragment)
    assert not run.exists()


def test_mixed_image_modes_read_right(tmp_path, caplog):
    """Palette, grayscale, alpha, 1-bit and CMYK images all become RGB; 16-bit grayscale is
    scaled to 8 bits (not clipped to white); a float image is skipped with its reason."""
    root = tmp_path / "modes"
    for mode, ext in [("P", "png"), ("L", "png"), ("RGBA", "png"), ("1", "png"), ("CMYK", "tif")]:
        _png(root / "mixed" / f"{mode}.{ext}", mode=mode)
    (root / "wide").mkdir(parents=True)
    Image.fromarray(np.full((RES, RES), 40000, np.uint16)).save(root / "wide" / "gray16.png")
    Image.fromarray(np.full((RES, RES), 0.5, np.float32)).save(root / "wide" / "float.tif")
    with caplog.at_level(logging.WARNING, logger="ld3m_fast.data"):
        data = load_dataset(root, res=8, cache_dir=tmp_path / "cache")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert re.search("skipped 1 unreadable image.*float.tif.*floating-point image", warning), warning
    assert data.class_names == ["mixed", "wide"] and data.class_counts() == [5, 1]
    assert (data.by_class(1) == round(40000 / 257)).all()


def test_unusable_cache_files_are_decoded_again(tmp_path, caplog):
    root = tmp_path / "images"
    _png(root / "a" / "1.png")
    _png(root / "b" / "1.png", seed=1)
    cache = tmp_path / "cache"
    first = load_dataset(root, res=8, cache_dir=cache)
    expected = first.images.clone()  # `first` maps the file this test damages in place
    (entry,) = cache.iterdir()
    rows, index = (entry / "images.u8").read_bytes(), json.loads((entry / "index.json").read_text())
    damages = [("images.u8", rows[: len(rows) // 2]), ("images.u8", b""), ("index.json", b""),
               ("index.json", json.dumps({**index, "res": 4}).encode()),
               ("index.json", json.dumps({**index, "counts": [2, 0]}).encode()),
               ("index.json", json.dumps({**index, "class_names": ["b", "a"]}).encode())]
    for name, content in damages:
        (entry / name).write_bytes(content)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ld3m_fast.data"):
            again = load_dataset(root, res=8, cache_dir=cache)
        assert any("unreadable data cache" in r.getMessage() for r in caplog.records), name
        assert torch.equal(again.images, expected) and torch.equal(again.labels, first.labels)
