"""Named settings: the LD3M paper's runs, and the embedded default, each value with its source.

A preset is plain data: a name, a one-line description, the settings it fills (keys are
`DistillConfig` field names), where each value comes from, and what the user must still
give (the data, the subset, the prior, the expert buffer: presets never name a folder).

Sources are one of
- ``prune_and_distill <file>:<line>``: the authors' released LD3M code,
  github.com/Brian-Moser/prune_and_distill at commit d6912268 (the repository the paper,
  arXiv 2403.03881, links as its code); the line that sets the value;
- ``paper Table N``: a table of the paper;
- ``ld3m-fast: <why>``: ld3m-fast's own choice, with the reason (e.g. a released defect that
  ld3m-fast fixed, so the released number would not mean the same here); for DiT-XL/2-256 the
  reason cites the DiT authors' code, ``facebookresearch/DiT @ ed81ce22 <file>:<line>``.

The paper's runs use 10-class ImageNet subsets; the ImageNet-1K presets (DM on all 1000 classes
through cin256-v2 or DiT-XL/2-256) carry the released DM values over and give a reason for every
1000-class choice.

`ld3m-fast presets` lists them, `ld3m-fast presets NAME` shows every value with its
source, and `ld3m-fast distill --preset NAME` uses one (priority: field defaults < preset <
config file < flags). From Python: `DistillConfig.from_dict(with_preset({"preset": NAME,
"data": ..., ...}))`; `DistillConfig(preset=NAME)` alone only records the name.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field

from .errors import LD3MError

RELEASED = "github.com/Brian-Moser/prune_and_distill @ d6912268fa9f076a579961de5ec488d75a8f03bb"
_R = "prune_and_distill "  # prefix of a source in the released code

# The flag each required setting is given with (and what it holds), for messages.
NEED_HINTS = {
    "data": "--data IMAGENET_DIR (train/ and val/ wnid folders)",
    "subset": "--subset NAME (imagenette, woof, a..e, ...)",
    "prior": "--prior DIR (cin256-v2, converted with `ld3m-fast convert`)",
    "buffer": "--buffer DIR (expert trajectories from `ld3m-fast buffer`)",
    "prune_scorer": "--prune-scorer RESNET18 (torchvision's ImageNet ResNet-18 state dict, the release's scorer, "
                    "prune_and_distill get_losses_imagenet.py:14; or 'train': a ConvNet trained here, a deviation)",
}


@dataclass(frozen=True)
class Preset:
    """One named setting. `values` and `sources` have the same keys (DistillConfig fields)."""

    name: str
    description: str
    values: types.MappingProxyType
    sources: types.MappingProxyType
    needs: tuple[str, ...] = ()   # DistillConfig fields the user must give
    notes: tuple[str, ...] = ()   # shown by `ld3m-fast presets NAME`
    # Values that replace `values` under --released-compat: key -> (value, source).
    compat: types.MappingProxyType = field(default_factory=lambda: types.MappingProxyType({}))
    # The full-size prior the preset is written for, by the name `ld3m-fast plan --prior` takes
    # (the user still gives the folder); None for the embedded default.
    prior_name: str | None = None
    # What a needed setting holds, where it differs from NEED_HINTS (e.g. which prior folder).
    hints: types.MappingProxyType = field(default_factory=lambda: types.MappingProxyType({}))

    def settings(self) -> dict:
        """A fresh dict of the preset's values (safe to modify)."""
        return dict(self.values)

    def hint(self, key: str) -> str:
        """The flag a needed setting is given with, and what it holds."""
        return self.hints.get(key) or NEED_HINTS.get(key, "--" + key.replace("_", "-"))


# --------------------------------------------------------------------------- the paper's runs

_SCRIPT = {"dm": "src/distill_dm_LD3M.py", "dc": "src/distill_dc_LD3M.py", "mtt": "src/distill_mtt_LD3M.py"}
# Line of each script's argparse default.
_LINE = {
    "lr_w": {"dm": 218, "dc": 262, "mtt": 400},
    "guidance": {"dm": 220, "dc": 269, "mtt": 403},
    "ddim_steps": {"dm": 221, "dc": 270, "mtt": 404},
}
# The released README's command for each run it shows: (algorithm, res, ipc) -> line.
_COMMAND = {("dc", 128, 1): 17, ("dm", 128, 1): 27, ("mtt", 128, 1): 41,
            ("dc", 128, 10): 52, ("dm", 128, 10): 62, ("dc", 256, 1): 72}
_NAME = {"dm": "DM (distribution matching)", "dc": "DC (gradient matching)",
         "mtt": "MTT (trajectory matching)"}


# Under --released-compat the image gradient is the released half-size one, so an MTT preset
# gives the released lr_w itself: 1000 on the half gradient == 500 on the full one.
_MTT_COMPAT_LR = (1000.0, f"{_R}{_SCRIPT['mtt']}:400 (--lr_w default 1000), with --released-compat: "
                          "the released half-size image gradient (docs/released_compat.md)")


def _lr(algorithm: str) -> tuple[float, str]:
    both = "src/glad_utils.py:261,263 (one lr_w for Z and c)"
    if algorithm == "mtt":
        return 500.0, (
            f"ld3m-fast: half the released lr_w 1000 (prune_and_distill {_SCRIPT['mtt']}:400, {both}): "
            f"the released image gradient is applied at half its stated size (`2 * tuple` at "
            f"{_SCRIPT['mtt']}:312, then [0] at :322; SPEC §1); ld3m-fast applies the full gradient, "
            "and SGD with momentum is linear in the gradient, so lr 500 gives the released updates")
    return ({"dm": 1.0, "dc": 0.1}[algorithm],
            f"{_R}{_SCRIPT[algorithm]}:{_LINE['lr_w'][algorithm]} (--lr_w), {both}")


class _Values:
    """A preset's values and their sources, in the order `ld3m-fast presets NAME` shows them
    (putting a key again replaces its value and source in place)."""

    def __init__(self):
        self.values: dict = {}
        self.sources: dict = {}

    def put(self, key, value, source: str) -> None:
        self.values[key] = value
        self.sources[key] = source


def _put_resolution(put, res: int) -> None:
    if res == 128:
        put("res", 128, f"{_R}src/shared_args.py:37 (--res default 128)")
        put("depth", 5, f"{_R}src/shared_args.py:66 (--depth default 5)")
    else:
        put("res", 256, f"{_R}readme.md:72 (--res=256, the released 256² command)")
        put("depth", 6, f"{_R}readme.md:72 (--depth=6 with --res=256)")


def _ld3m(algorithm: str, res: int, ipc: int) -> Preset:
    script = _SCRIPT[algorithm]
    command = _COMMAND.get((algorithm, res, ipc))
    run = _Values()
    put = run.put
    readme_alg = {"dc": 17, "dm": 27, "mtt": 41}[algorithm]
    put("algorithm", algorithm, f"{_R}readme.md:{command or readme_alg} (runs {script})")
    _put_resolution(put, res)
    if command:
        put("ipc", ipc, f"{_R}readme.md:{command} (--ipc={ipc})")
    else:
        put("ipc", ipc, f"ld3m-fast: the preset's IPC; no released command runs {algorithm.upper()} at "
                        f"{res}² with IPC {ipc}, the script's defaults apply as for the commands shown")
    _put_released_run(put, algorithm, res)
    v = run.values
    needs = ("data", "subset", "prior") + (("buffer",) if algorithm == "mtt" else ())
    notes = [f"released command: readme.md:{command}" if command else
             "no released command for this combination: the released script's defaults, with the "
             "released commands' settings for this resolution and IPC"]
    if algorithm == "mtt":
        notes.append("with --released-compat: lr_latent = lr_class = 1000, the released lr_w on the released "
                     "half-size image gradient (the same updates as 500 on the full gradient)")
        notes.append(
            f"buffer: ConvNet depth {v['depth']}, width 128, instance norm, at res {res}, plain SGD lr 0.01 "
            "without momentum (src/buffer_mtt.py:279, :333), at least 3 epochs; the released buffer has "
            "5000 experts of 15 epochs (readme.md:37). e.g. `ld3m-fast buffer --data DIR --subset NAME "
            f"--res {res} --out BUFFER --experts 100`")
    notes.append(_EVAL_NOTE)
    description = (f"LD3M with {_NAME[algorithm]} at {res}², IPC {ipc}, on an ImageNet subset through "
                   "the cin256-v2 prior")
    compat = {"lr_latent": _MTT_COMPAT_LR, "lr_class": _MTT_COMPAT_LR} if algorithm == "mtt" else {}
    return Preset(f"ld3m-{algorithm}-{res}-ipc{ipc}", description, types.MappingProxyType(v),
                  types.MappingProxyType(run.sources), needs, tuple(notes), types.MappingProxyType(compat),
                  prior_name="cin256-v2")


_EVAL_NOTE = ("final accuracy: `ld3m-fast eval RUN_DIR` (1000 epochs, 5 seeds, ConvNet, AlexNet, VGG-11, "
              "ResNet-18, ViT by default)")


def _put_released_run(put, algorithm: str, res: int) -> None:
    """The released script's settings of `algorithm` at `res`, after algorithm, res, depth and ipc."""
    script = _SCRIPT[algorithm]
    lr, lr_source = _lr(algorithm)
    if res == 128:
        put("steps", 10, f"{_R}{script}:{_LINE['ddim_steps'][algorithm]} (--ddim_steps default 10)")
    else:
        put("steps", 20, "ld3m-fast: SPEC §1 (T=20 at 256², the paper's setting as the product brief "
                         "records it; the released 256² command readme.md:72 passes no --ddim_steps, so "
                         f"the script runs its default 10, {script}:{_LINE['ddim_steps'][algorithm]}; "
                         "the paper's text could not be checked here)")
    put("guidance", 3.0, f"{_R}{script}:{_LINE['guidance'][algorithm]} (--unconditional_guidance_scale)")
    put("skip", "x0", f"{_R}src/latentdiff/ldm/models/diffusion/ddim.py:200 (the skip mixes pred_x0 "
                      "with the quantised start latent)")
    put("eta", 0.0, f"{_R}src/glad_utils.py:986 (sampler.sample(..., eta=0.0))")
    put("iterations", 10000, f"{_R}src/shared_args.py:18 (--Iteration default 10000)")
    put("lr_latent", lr, lr_source)
    put("lr_class", lr, lr_source)
    put("momentum", 0.5, f"{_R}src/glad_utils.py:261,263 (SGD momentum=0.5 for Z and c)"
                         + (f"; {script}:126 (the student lr's SGD)" if algorithm == "mtt" else ""))
    put("max_per_class", None, f"{_R}src/glad_utils.py:51 (every training image of the subset at "
                               "--percent=100; the README's --percent=60/20 are the follow-up pruning study's)")
    put("width", 128, f"{_R}src/shared_args.py:65 (--width default 128)")
    put("norm", "instance", f"{_R}src/utils.py:230 (get_network(..., norm=\"instancenorm\"))")
    put("dsa", "color_crop_cutout_flip_scale_rotate", f"{_R}src/shared_args.py:30 (--dsa_strategy default)")
    if algorithm in ("dm", "dc"):
        put("batch_real", 256, f"{_R}src/shared_args.py:22 (--batch_real default 256)")
    else:
        put("mtt_gradient", "truncated", f"{_R}{script}:286-322 (each student step detached, the image "
                                         "gradient taken step by step)")
        put("syn_steps", 10, f"{_R}{script}:396 (--syn_steps default 10)")
        put("expert_epochs", 2, f"{_R}{script}:395 (--expert_epochs default 2)")
        put("max_start_epoch", 2, f"{_R}{script}:392 (--max_start_epoch default 2)")
        put("student_lr", 0.01, f"{_R}{script}:388 (--lr_teacher default 0.01), the initial syn_lr at :123")
        put("lr_student", 1e-6, f"{_R}{script}:401 (--lr_lr default 1e-06), its SGD at :126")
        put("batch_syn", None, f"{_R}{script}:389 (--batch_syn default None), all images per step at :95-96")
    put("eval_archs", "convnet,resnet18,vgg11,alexnet,vit",
        f"{_R}src/shared_args.py:11 (--eval_mode M) and src/utils.py:537 (the pool for M)")
    put("eval_epochs", 1000, f"{_R}src/shared_args.py:16 (--epoch_eval_train default 1000)")
    put("eval_seeds", 5, f"{_R}src/shared_args.py:13 (--num_eval default 5)")
    put("eval_every", 0, "ld3m-fast: the released code evaluates every 100 iterations (src/shared_args.py:14) "
                         "and reports the best test accuracy over them (src/glad_utils.py:552-553, selection "
                         "on the test set, SPEC §1); ld3m-fast reports the final set's accuracy: run "
                         "`ld3m-fast eval RUN_DIR` after the run")


# --------------------------------------------------------------------------- ImageNet-1K

# Neither the paper nor the released code runs ImageNet-1K (its ImageNet datasets are 10-class
# subsets: src/utils.py:144), so every 1000-class choice below is ld3m-fast's, with its reason;
# what carries over unchanged is cited to the released DM script.
DIT = "facebookresearch/DiT @ ed81ce22"   # the DiT authors' code, for DiT-XL/2-256's own settings
_IN1K_PRIORS = {
    # name part -> (planner's prior name, in words, --prior hint)
    "cin": ("cin256-v2", "the cin256-v2 prior",
            "--prior DIR (cin256-v2, converted with `ld3m-fast convert`)"),
    "dit": ("dit-xl-2-256", "DiT-XL/2-256",
            "--prior DIR (DiT-XL/2-256: its diffusers DiTPipeline folder, e.g. `hf download "
            "facebook/DiT-XL-2-256 --local-dir DiT-XL-2-256`, or a prior folder from `ld3m-fast prior import`)"),
}
_IN1K_SOURCES = {
    "algorithm": "ld3m-fast: DM at 1000 classes: its loss is a sum of per-class terms (a run can render and "
                 "back-propagate one class group at a time) and needs no expert buffer, where DC adds per-class "
                 "network gradients and MTT an ImageNet-1K buffer and a loss over every image; the values "
                 "below are the released DM script's (prune_and_distill src/distill_dm_LD3M.py)",
    "subset": "ld3m-fast: all 1000 ImageNet-1K classes in index order, so label k is class k, row k of the "
              "prior's class table; the released code runs 10-class subsets only (prune_and_distill "
              "src/utils.py:144, num_classes = 10)",
    "iterations": f"{_R}src/shared_args.py:18 (--Iteration default 10000), kept at 1000 classes: DM updates "
                  "every image's Z and c once per iteration whatever the number of classes, so each image gets "
                  "the released number of updates (an iteration costs about 100x a 10-class one: `ld3m-fast plan`)",
    "batch_real": f"{_R}src/shared_args.py:22 (--batch_real default 256) real images per class, kept at 1000 "
                  "classes: DM compares per-class means, whose noise depends on the images per class, not on the "
                  "number of classes (256,000 real images per iteration)",
}
_DIT_LR = ("ld3m-fast: the released DM lr_w 1 for cin256-v2 (prune_and_distill src/distill_dm_LD3M.py:218, "
           "src/glad_utils.py:261,263), kept for DiT-XL/2-256 untuned: no DiT run has been tuned yet, and its "
           "latents (KL-f8, 4x32x32 at 256², scaled by 0.18215) differ from cin256-v2's (VQ-f4, 3x64x64); "
           "lower both rates tenfold if the images saturate")
_DIT_SOURCES = {
    "steps": "ld3m-fast: LD3M's T for cin256-v2 at this resolution ({t}), kept for DiT-XL/2-256 so both priors "
             "run chains of equal length: T is the chain the skip spans, and DiT also trains on 1000 steps "
             f"({DIT} diffusion/__init__.py:18)",
    "guidance": f"ld3m-fast: DiT's setting for class-faithful samples ({DIT} sample.py:77, --cfg-scale 4.0; "
                "diffusers' DiTPipeline defaults to 4.0 too) rather than its FID setting 1.5 (sample_ddp.py:158), "
                "which trades class fidelity for the diversity of 50,000 samples; LD3M's images get their "
                "diversity from latents initialised from distinct real images, and the released LD3M guides "
                f"cin256-v2 at a comparable 3.0 ({_R}src/distill_dm_LD3M.py:220)",
    "lr_latent": _DIT_LR,
    "lr_class": f"{_DIT_LR}; c is DiT's 1152-wide label embedding, fed to every block's adaLN",
}
_DIT_T = {128: (10, "10 at 128², prune_and_distill src/distill_dm_LD3M.py:221"), 256: (20, "20 at 256², SPEC §1")}


def _in1k(prior: str, res: int, ipc: int) -> Preset:
    """LD3M-DM on all 1000 ImageNet-1K classes through cin256-v2 or DiT-XL/2-256."""
    prior_name, prior_words, prior_hint = _IN1K_PRIORS[prior]
    run = _Values()
    run.put("algorithm", "dm", _IN1K_SOURCES["algorithm"])
    run.put("subset", "imagenet-1k", _IN1K_SOURCES["subset"])
    _put_resolution(run.put, res)
    run.put("ipc", ipc, f"ld3m-fast: IPC {ipc}, one of 1, 10 and 50, the ImageNet-1K settings dataset-"
                        "distillation papers report; the released code has no ImageNet-1K run")
    _put_released_run(run.put, "dm", res)
    run.put("iterations", 10000, _IN1K_SOURCES["iterations"])
    run.put("batch_real", 256, _IN1K_SOURCES["batch_real"])
    if prior == "dit":
        steps, steps_source = _DIT_T[res]
        run.put("steps", steps, _DIT_SOURCES["steps"].format(t=steps_source))
        run.put("guidance", 4.0, _DIT_SOURCES["guidance"])
        run.put("lr_latent", 1.0, _DIT_SOURCES["lr_latent"])
        run.put("lr_class", 1.0, _DIT_SOURCES["lr_class"])
    description = f"LD3M with DM at {res}², IPC {ipc}, on all of ImageNet-1K through {prior_words}"
    return Preset(f"ld3m-dm-in1k-{prior}-{res}-ipc{ipc}", description, types.MappingProxyType(run.values),
                  types.MappingProxyType(run.sources), ("data", "prior"),
                  _in1k_notes(prior, prior_name, res, ipc, run.values["steps"]),
                  prior_name=prior_name, hints=types.MappingProxyType({"prior": prior_hint}))


def _in1k_notes(prior: str, prior_name: str, res: int, ipc: int, steps: int) -> tuple[str, ...]:
    notes = ["ImageNet-1K: the paper and the released code run 10-class subsets only; each 1000-class choice "
             "is ld3m-fast's own, with its reason (the released DM values carry over otherwise)",
             "data: --data IMAGENET_DIR, the train/ (and val/) folders of 1000 wnid folders",
             f"plan it: `ld3m-fast plan --prior {prior_name} --res {res} --ipc {ipc} --classes 1000 --steps "
             f"{steps} --algorithm dm --budget 80GiB` (one GPU's share: add --world-size N)"]
    if prior == "dit" and res == 128:
        notes.append(f"DiT-XL/2-256 was trained at 256² only ({DIT} train.py:259): at 128² its chain runs on "
                     "16x16 latents, a grid it never saw (its sin-cos position embedding is recomputed for it), "
                     "as the cin256-v2 presets run cin256-v2 on 32x32 latents at 128², the paper's setting")
    return (*notes, _EVAL_NOTE)


# --------------------------------------------------------------------------- the embedded default

_EMBEDDED = "ld3m-fast: EMBEDDED_PROFILE in ld3m_fast/distill/config.py"
_EMBEDDED_DEFAULT = Preset(
    "embedded-default",
    "DM on the shipped Fashion-MNIST 32² prior: runs end to end in minutes on a laptop CPU",
    types.MappingProxyType({"algorithm": "dm", "ipc": 1, "steps": 10, "iterations": 120, "batch_real": 64,
                            "max_per_class": 500, "lr_latent": 0.1, "lr_class": 0.1}),
    types.MappingProxyType({
        "algorithm": "ld3m-fast: the profile's learning rates below are DM's",
        "ipc": "ld3m-fast: DistillConfig's default",
        "steps": "ld3m-fast: DistillConfig's default (the released 128² T, "
                 f"{_R}src/distill_dm_LD3M.py:221)",
        "iterations": f"{_EMBEDDED} (a few minutes on a CPU)",
        "batch_real": f"{_EMBEDDED} (64 real images per class per iteration)",
        "max_per_class": f"{_EMBEDDED} (500 per class keep the decoded cache small)",
        "lr_latent": f"{_EMBEDDED}: DM's released lr 1 is tuned to cin256's 3x64x64 latents; on the "
                     "embedded prior's 4x8x8 ones it overshoots, 0.1 stays in range (docs/default_prior.md)",
        "lr_class": f"{_EMBEDDED}: as lr_latent",
    }),
    needs=(),
    notes=("uses the embedded prior and Fashion-MNIST unless --prior / --data are given",),
)


# --------------------------------------------------------------------------- the pruned runs

# The released README's commands distil from a pruned real set (the follow-up study, "Distill the
# Best, Ignore the Rest"): (algorithm, res, ipc) -> --percent of the command at _COMMAND's line.
_PRUNED_PERCENT = {("dc", 128, 1): 60, ("dm", 128, 1): 20, ("mtt", 128, 1): 60,
                   ("dc", 128, 10): 60, ("dm", 128, 10): 20, ("dc", 256, 1): 60}
_MTT_BUFFER_COMMAND = 37  # readme.md:37, the buffer of the MTT command (--percent=60 --order=asc)


def _pruned(algorithm: str, res: int, ipc: int) -> Preset:
    """The paper preset of a released README command with that command's pruning (ld3m_fast/prune.py)."""
    base = _ld3m(algorithm, res, ipc)
    line, percent = _COMMAND[(algorithm, res, ipc)], _PRUNED_PERCENT[(algorithm, res, ipc)]
    values, sources = dict(base.values), dict(base.sources)
    values.update(prune_percent=percent, prune_order="asc")
    sources.update(
        prune_percent=f"{_R}readme.md:{line} (--percent={percent}; kept per class int(percent * n / 100), "
                      "get_losses_imagenet.py:54)",
        prune_order=f"{_R}readme.md:{line} (--order=asc: the lowest losses, get_losses_imagenet.py:50,55)",
        max_per_class=f"{_R}src/glad_utils.py:43-53 (every training image of the subset is scored, then the "
                      "pruned lists are kept)")
    notes = list(base.notes) + [
        "scorer: the release ranks by the cross-entropy of torchvision's ImageNet-pretrained ResNet-18 "
        "(get_losses_imagenet.py:14, 224², eval mode); give its state dict with --prune-scorer, or --prune-scorer "
        "train for a ConvNet trained here (recorded as a deviation); `ld3m-fast prune` scores once for many runs"]
    if algorithm == "mtt":
        notes.append(f"buffer: built from the same pruned set (readme.md:{_MTT_BUFFER_COMMAND}: --percent=60 "
                     "--order=asc): `ld3m-fast buffer ... --prune-percent 60 --prune-order asc --prune-scorer ...`")
    description = f"{base.description}, from the real set pruned to {percent}% per class (lowest losses kept)"
    return Preset(f"{base.name}-pruned", description, types.MappingProxyType(values),
                  types.MappingProxyType(sources), base.needs + ("prune_scorer",), tuple(notes), base.compat)


def _build() -> dict[str, Preset]:
    presets = {_EMBEDDED_DEFAULT.name: _EMBEDDED_DEFAULT}
    for algorithm in ("dm", "dc", "mtt"):
        for res in (128, 256):
            for ipc in (1, 10):
                preset = _ld3m(algorithm, res, ipc)
                presets[preset.name] = preset
    for prior in _IN1K_PRIORS:
        for res in (128, 256):
            for ipc in (1, 10, 50):
                preset = _in1k(prior, res, ipc)
                presets[preset.name] = preset
    presets.update((p.name, p) for p in (_pruned(*key) for key in _PRUNED_PERCENT))
    return presets


PRESETS: types.MappingProxyType = types.MappingProxyType(_build())


def list_presets() -> list[Preset]:
    """Every preset: the embedded default first, then the paper's runs by algorithm, res, IPC,
    then the ImageNet-1K ones by prior, res, IPC."""
    return list(PRESETS.values())


def get_preset(name: str) -> Preset:
    """The preset called `name`; an unknown name is an LD3MError listing the known ones."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise LD3MError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)} "
                        "(see `ld3m-fast presets`)") from None


def with_preset(given: dict, *, needs=None) -> dict:
    """`given` settings (config file and flags, field names) over the preset they name, if any.

    Priority: preset < `given`. The preset's algorithm may not be changed (its learning
    rates belong to it), and every setting the preset needs (those of `needs` only, when given:
    a plan needs the prior but no data) must be in `given`. With
    `released_compat` in `given`, the preset's `compat` values replace its own (an MTT
    preset's lr 500 becomes the released 1000, for the released half-size gradient).
    """
    name = given.get("preset")
    if name is None:
        return dict(given)
    preset = get_preset(name)
    algorithm = preset.values.get("algorithm")
    if given.get("algorithm") not in (None, algorithm):
        raise LD3MError(f"preset {name} is a {str(algorithm).upper()} preset but --algorithm is "
                        f"{given['algorithm']!r}; use ld3m-{given['algorithm']}-... (see `ld3m-fast presets`)")
    missing = [key for key in preset.needs if given.get(key) is None and (needs is None or key in needs)]
    if missing:
        raise LD3MError(f"preset {name} needs " + ", ".join(preset.hint(k) for k in missing))
    compat = {key: value for key, (value, _) in preset.compat.items()} if given.get("released_compat") else {}
    return {**preset.values, **compat, **given}


__all__ = ["NEED_HINTS", "PRESETS", "Preset", "RELEASED", "get_preset", "list_presets", "with_preset"]
