"""Presets: the paper's settings by name, each value with its source; priority preset < config < flag."""
import json

import pytest

from ld3m_fast.cli.distill import new_run_config
from ld3m_fast.cli.main import build_parser, main
from ld3m_fast.distill.config import EMBEDDED_PROFILE, DistillConfig
from ld3m_fast.errors import LD3MError
from ld3m_fast.presets import PRESETS, get_preset, list_presets, with_preset

PAPER_GRID = [f"ld3m-{a}-{r}-ipc{i}" for a in ("dm", "dc", "mtt") for r in (128, 256) for i in (1, 10)]
IN1K_GRID = [f"ld3m-dm-in1k-{p}-{r}-ipc{i}" for p in ("cin", "dit") for r in (128, 256) for i in (1, 10, 50)]
SOURCE_KINDS = ("prune_and_distill ", "paper Table ", "ld3m-fast: ")
USER_ARGS = ["--data", "/imagenet", "--subset", "imagenet-a", "--prior", "/priors/cin256-v2"]


def one_error_line(capsys, *fragments):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("ld3m-fast ") and ": error: " in err[0], err[0]
    for fragment in fragments:
        assert fragment in err[0], err[0]
    return err[0]


def test_listing_has_the_paper_grid_and_the_embedded_default(capsys):
    names = [p.name for p in list_presets()]
    assert set(PAPER_GRID) | set(IN1K_GRID) | {"embedded-default"} <= set(names)
    assert len(names) == len(set(names)) == len(PRESETS)
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in PAPER_GRID + IN1K_GRID + ["embedded-default"]:
        row = next(line for line in lines if line.split()[:1] == [name])
        needs = ("-" if name == "embedded-default" else "--data --prior" if name in IN1K_GRID
                 else "--data --subset --prior")
        assert needs in row and get_preset(name).description in row
    assert "--buffer" in next(line for line in lines if line.startswith("ld3m-mtt-128-ipc10"))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_value_is_a_valid_setting_and_has_a_source(name):
    preset = get_preset(name)
    config = DistillConfig.from_dict(preset.settings(), where=f"preset {name}")
    assert {k: getattr(config, k) for k in preset.values} == dict(preset.values)
    assert set(preset.sources) == set(preset.values)
    for key, source in preset.sources.items():
        assert isinstance(source, str) and source.startswith(SOURCE_KINDS), (key, source)
        assert len(source) > len(next(k for k in SOURCE_KINDS if source.startswith(k))) + 3, (key, source)
    assert "data" not in preset.values and "prior" not in preset.values and "buffer" not in preset.values
    assert set(preset.needs) <= set(DistillConfig.field_names())
    assert preset.description and "\n" not in preset.description


def test_the_paper_presets_carry_the_released_values():
    for name in PAPER_GRID:
        p = get_preset(name).values
        algorithm, res, ipc = name.split("-")[1], int(name.split("-")[2]), int(name.split("ipc")[1])
        assert (p["algorithm"], p["res"], p["ipc"]) == (algorithm, res, ipc)
        assert p["depth"] == {128: 5, 256: 6}[res] and p["steps"] == {128: 10, 256: 20}[res]
        assert p["guidance"] == 3.0 and p["momentum"] == 0.5 and p["iterations"] == 10000
        # MTT: released lr_w 1000 on a gradient applied at half size == 500 on the full gradient.
        assert p["lr_latent"] == p["lr_class"] == {"dm": 1.0, "dc": 0.1, "mtt": 500.0}[algorithm]
        assert get_preset(name).needs == ("data", "subset", "prior") + (("buffer",) if algorithm == "mtt" else ())
        if algorithm == "mtt":
            assert (p["syn_steps"], p["expert_epochs"], p["max_start_epoch"]) == (10, 2, 2)
            assert (p["student_lr"], p["lr_student"], p["batch_syn"]) == (0.01, 1e-6, None)
        else:
            assert p["batch_real"] == 256


@pytest.mark.parametrize("name", IN1K_GRID)
def test_the_imagenet_1k_presets(name):
    preset = get_preset(name)
    p, prior = preset.values, name.split("-")[3]
    res, ipc = int(name.split("-")[4]), int(name.split("ipc")[1])
    assert (p["algorithm"], p["subset"], p["res"], p["ipc"]) == ("dm", "imagenet-1k", res, ipc)
    assert p["depth"] == {128: 5, 256: 6}[res] and p["steps"] == {128: 10, 256: 20}[res]
    assert p["guidance"] == {"cin": 3.0, "dit": 4.0}[prior]
    assert (p["lr_latent"], p["lr_class"], p["momentum"]) == (1.0, 1.0, 0.5)
    assert (p["iterations"], p["batch_real"]) == (10000, 256)
    assert preset.needs == ("data", "prior") and "subset" in p  # the subset is the preset's, the folders the user's
    assert preset.prior_name == {"cin": "cin256-v2", "dit": "dit-xl-2-256"}[prior]
    assert ("DiTPipeline" in preset.hint("prior")) == (prior == "dit")
    # Every 1000-class choice is ld3m-fast's own and says why; DiT's guidance cites DiT's code.
    for key in ("algorithm", "subset", "ipc"):
        assert preset.sources[key].startswith("ld3m-fast: "), key
    assert "1000 classes" in preset.sources["iterations"] and "1000 classes" in preset.sources["batch_real"]
    if prior == "dit":
        assert "facebookresearch/DiT" in preset.sources["guidance"] and "sample.py:77" in preset.sources["guidance"]
        assert all(preset.sources[k].startswith("ld3m-fast: ") for k in ("steps", "lr_latent", "lr_class"))
    assert any("ImageNet-1K" in note for note in preset.notes)
    # It resolves, with the user's data and prior folders, into a valid run description.
    config = resolved("--preset", name, "--data", "/imagenet", "--prior", "/priors/p")
    config.validate()
    assert (config.preset, config.subset, config.res, config.ipc, config.guidance) == (
        name, "imagenet-1k", res, ipc, p["guidance"])


def test_an_imagenet_1k_preset_without_its_prior_says_which_prior(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["distill", "--preset", "ld3m-dm-in1k-dit-256-ipc10", "--data", "/d", "--out", str(out)]) == 2
    one_error_line(capsys, "needs --prior DIR (DiT-XL/2-256: its diffusers DiTPipeline folder", "hf download")
    assert main(["presets", "ld3m-dm-in1k-dit-128-ipc1"]) == 0
    out = capsys.readouterr().out
    assert "DiT's code: github.com/facebookresearch/DiT @ commit ed81ce22" in out and "16x16 latents" in out
    assert main(["presets", "ld3m-dm-in1k-cin-256-ipc50", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["prior_name"] == "cin256-v2" and "ld3m-fast convert" in data["hints"]["prior"]


def test_embedded_default_is_the_embedded_profile_for_dm():
    values = get_preset("embedded-default").values
    for key, value in EMBEDDED_PROFILE.items():
        assert values[key] == (value["dm"] if isinstance(value, dict) else value), key
    assert values["algorithm"] == "dm" and not get_preset("embedded-default").needs


def resolved(*argv):
    return new_run_config(build_parser().parse_args(["distill", *map(str, argv)]))


def test_priority_defaults_preset_config_file_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('steps = 15\niterations = 99\nlr-latent = 0.5\n')
    config = resolved("--preset", "ld3m-dc-128-ipc1", "--config", toml, "--iterations", 7, *USER_ARGS)
    assert config.iterations == 7                              # flag > file > preset
    assert config.steps == 15 and config.lr_latent == 0.5      # file > preset
    assert config.lr_class == 0.1 and config.depth == 5 and config.batch_real == 256  # preset > defaults
    assert config.algorithm == "dc" and config.preset == "ld3m-dc-128-ipc1"
    assert config.seed == DistillConfig().seed                 # not in the preset: the field default
    # the preset named in the file works the same, and the flag may name another one
    toml.write_text('preset = "ld3m-mtt-256-ipc10"\nbuffer = "/buffers/a"\nsyn-steps = 4\n')
    config = resolved("--config", toml, *USER_ARGS)
    assert (config.preset, config.algorithm, config.res, config.ipc) == ("ld3m-mtt-256-ipc10", "mtt", 256, 10)
    assert config.syn_steps == 4 and config.lr_latent == 500.0 and config.steps == 20
    config = resolved("--config", toml, "--preset", "ld3m-mtt-128-ipc1", *USER_ARGS)
    assert (config.preset, config.res, config.ipc, config.syn_steps) == ("ld3m-mtt-128-ipc1", 128, 1, 4)
    # no preset: the field defaults under the flags, as before
    plain = resolved("--iterations", 3).to_dict()
    assert plain.pop("iterations") == 3 and plain.pop("threads") >= 1
    assert plain == {k: v for k, v in DistillConfig().to_dict().items() if k not in ("iterations", "threads")}


def test_with_preset_refuses_a_missing_need_and_another_algorithm():
    with pytest.raises(LD3MError, match="needs --buffer"):
        with_preset({"preset": "ld3m-mtt-128-ipc1", "data": "/d", "subset": "a", "prior": "/p"})
    with pytest.raises(LD3MError, match="DM preset"):
        with_preset({"preset": "ld3m-dm-128-ipc1", "algorithm": "mtt", "data": "/d", "subset": "a", "prior": "/p"})
    assert with_preset({"iterations": 3}) == {"iterations": 3}


def test_unknown_preset_and_missing_needs_are_one_line_exit_2(capsys, tmp_path):
    assert main(["distill", "--preset", "ld3m-dm-64-ipc1", "--out", str(tmp_path / "r")]) == 2
    line = one_error_line(capsys, "unknown preset 'ld3m-dm-64-ipc1'", "embedded-default", "ld3m-mtt-256-ipc10")
    assert "known presets" in line
    assert main(["presets", "nope"]) == 2
    one_error_line(capsys, "unknown preset 'nope'")
    assert main(["distill", "--preset", "ld3m-mtt-128-ipc1", "--data", "/d", "--out", str(tmp_path / "r")]) == 2
    one_error_line(capsys, "needs", "--subset", "--prior", "--buffer")
    assert not (tmp_path / "r").exists()


def test_show_one_prints_every_value_with_its_source(capsys):
    assert main(["presets", "ld3m-mtt-128-ipc10"]) == 0
    out = capsys.readouterr().out
    preset = get_preset("ld3m-mtt-128-ipc10")
    for key, source in preset.sources.items():
        assert f"  {key} " in out and f"from {source}" in out, key
    assert "needs: --data" in out and "--buffer" in out
    assert main(["presets", "ld3m-mtt-128-ipc10", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["values"] == dict(preset.values) and data["sources"] == dict(preset.sources)


def test_distill_with_the_embedded_default_preset_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert main(["distill", "--preset", "embedded-default", "--iterations", "2", "--out", str(out), *common]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["preset"] == "embedded-default" and saved["iterations"] == 2      # the flag won
    assert (saved["batch_real"], saved["max_per_class"], saved["lr_latent"], saved["lr_class"]) == (64, 500, 0.1, 0.1)
    capsys.readouterr()
    # resume: the recorded values stand, the name stays; the preset cannot change
    assert main(["distill", "--resume", str(out), "--preset", "ld3m-dm-128-ipc1", *common]) == 2
    one_error_line(capsys, "cannot change preset")
    assert main(["distill", "--resume", str(out), "--iterations", "3", *common]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["preset"] == "embedded-default" and saved["iterations"] == 3 and saved["batch_real"] == 64
