"""Where a prior comes from: an ld3m-fast prior folder, a diffusers pipeline folder, or a prior file.

`--prior PATH` (`load_prior`, `build_prior`, the planner's `build_planning_prior`) takes:

- an **ld3m-fast prior folder**: `ld3m_prior.json` plus `save_pretrained` sub-folders (`io.py`);
- a **diffusers pipeline folder**, as `DiffusionPipeline.save_pretrained` writes it:
  `model_index.json` names each component's class, one sub-folder per component. For example
  `DiTPipeline` (`transformer/`, `vae/`, `scheduler/`) or an `LDMPipeline`-style folder
  (`unet/`, `vqvae/`, `scheduler/`) whose UNet is class-conditional;
- a **prior file**: a small JSON the user writes, `{"pipeline": "DIR", ...}`, naming a pipeline
  folder (relative to the file) and giving the facts that folder's files do not hold.

The manifest's facts are read from the pipeline's own files:

    denoiser, autoencoder   the model_index.json components of a supported class
                            (DiTTransformer2DModel, or the legacy Transformer2DModel with
                            norm_type ada_norm_zero; UNet2DModel; UNet2DConditionModel /
                            VQModel, AutoencoderKL)
    classes, null class     DiT: num_embeds_ada_norm classes; its label embedder has one more
                            row, the null class (DiTPipeline's class_null). UNet2DModel:
                            num_class_embeds rows, of which the last is the null class when
                            id2label names one class fewer. UNet2DConditionModel: the rows of
                            its class table (class_table.safetensors) minus the null row
    class names             id2label in model_index.json (where DiTPipeline keeps it) or in
                            the denoiser's config.json
    scaling factor          the autoencoder config's scaling_factor
    native image size       the denoiser config's sample_size x the autoencoder's factor
    noise schedule          the scheduler component's scheduler_config.json

Anything else is refused in one line that names the missing fact and the prior-file key that
supplies it. A path that does not exist and looks like a hub id (`facebook/DiT-XL-2-256`) is
refused with how to download it: nothing is ever downloaded.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..errors import PriorError
from .io import (CLASS_TABLE, FORMAT, MANIFEST, MANIFEST_VERSION, SCHEDULER_CONFIG, _check_manifest,
                 _inside, _is_int, _is_number, _one_line, _read_json, _relative, read_manifest)

PIPELINE_INDEX = "model_index.json"

# The denoiser classes a pipeline may hold -> conditioning (the manifest's name for the adapter).
PIPELINE_DENOISERS = {"DiTTransformer2DModel": "adaln", "Transformer2DModel": "adaln",
                      "UNet2DModel": "class_embedding", "UNet2DConditionModel": "cross_attention"}
PIPELINE_AUTOENCODERS = ("VQModel", "AutoencoderKL")

# What a prior file may say, each key with what it gives.
PRIOR_FILE_KEYS = {
    "pipeline": "the pipeline folder (relative to the prior file)",
    "num_classes": "the number of classes (table rows 0 .. num_classes - 1; row num_classes is the null class)",
    "null_class": "the null class's row, which must be the table's last (the same as num_classes)",
    "class_names": "one name per class",
    "image_size": "the native image side in pixels",
    "scaling_factor": "the autoencoder's latent scaling factor",
    "class_table": "a safetensors file holding class_table (num_classes + 1, D), for a UNet2DConditionModel",
    "denoiser": "the model_index.json component to use as the denoiser",
    "autoencoder": "the model_index.json component to use as the autoencoder",
    "scheduler": "the model_index.json component holding the training noise schedule",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class PriorSource:
    """A prior's files, checked cheaply (no weights read): what `build_prior` builds from.

    `manifest` is in the ld3m-fast manifest format (`io.read_manifest`), inferred for a
    pipeline; `facts` says, for a pipeline, where each of its facts was read."""

    root: Path                       # the folder holding the model sub-folders
    manifest: dict
    scheduler_subfolder: str = "scheduler"
    class_table: Path | None = None  # cross-attention priors: the class-table file
    pipeline: str | None = None      # the diffusers pipeline class; None for an ld3m-fast folder
    facts: tuple[tuple[str, str], ...] = ()

    @property
    def allow_pickled_weights(self) -> bool:
        """Pipelines written before safetensors hold `.bin` pickles; ld3m-fast folders never do."""
        return self.pipeline is not None


def looks_like_hub_id(text: str) -> bool:
    """`owner/name` whose first part is not a local folder (`priors/x` with a `priors/` is a path)."""
    return bool(_HUB_ID.match(text)) and not Path(text.split("/", 1)[0]).is_dir()


def _missing_path_message(path: Path) -> str:
    text = str(path)
    if looks_like_hub_id(text):
        local = text.split("/", 1)[1]
        return (f"prior {text} is not a local folder; if it is a Hugging Face hub id, download the "
                f"pipeline folder first (e.g. `hf download {text} --local-dir {local}`) and pass "
                f"--prior {local}: ld3m-fast never downloads")
    return (f"prior folder {path} does not exist; pass a folder written by `ld3m-fast convert` or "
            "`ld3m_fast.save_prior`, a diffusers pipeline folder (model_index.json), or a prior file")


def open_prior_source(path) -> PriorSource:
    """The source of `path` (see the module docstring), or a one-line PriorError."""
    path = Path(path)
    if not path.exists():
        raise PriorError(_missing_path_message(path))
    if path.is_file():
        if path.suffix.lower() == ".json":
            return _prior_file_source(path)
        raise PriorError(f"prior folder {path} is not a folder; pass a prior folder, a diffusers "
                         "pipeline folder or a prior file (a .json naming a pipeline)")
    if (path / MANIFEST).is_file():
        return PriorSource(path, read_manifest(path), class_table=path / CLASS_TABLE)
    if not (path / PIPELINE_INDEX).is_file():
        raise PriorError(f"{path} is not an ld3m-fast prior folder: {MANIFEST} is missing, and it is "
                         f"no diffusers pipeline folder either ({PIPELINE_INDEX} is missing)")
    return pipeline_source(path, _read_index(path), {}, where=str(path))


def _read_index(folder: Path) -> dict:
    return _read_json(_inside(folder, folder / PIPELINE_INDEX, f"pipeline index {folder / PIPELINE_INDEX}"),
                      "pipeline index")


def read_prior_file(path: Path) -> tuple[Path, dict]:
    """(pipeline folder, the facts it gives) of a prior file, every key and value checked."""
    spec = _read_json(path, "prior file")
    unknown = sorted(set(spec) - set(PRIOR_FILE_KEYS))
    if unknown:
        raise PriorError(f"prior file {path}: unknown key(s) {', '.join(map(repr, unknown))}; a prior "
                         f"file may give {', '.join(PRIOR_FILE_KEYS)}")
    folder = spec.get("pipeline")
    if not isinstance(folder, str) or not folder.strip():
        raise PriorError(f"prior file {path} must name its pipeline folder: "
                         "{\"pipeline\": \"DIR\", ...} (DIR relative to the file)")
    pipeline = path.parent / folder
    if not (pipeline / PIPELINE_INDEX).is_file():
        problem = "does not exist" if not pipeline.exists() else f"has no {PIPELINE_INDEX}"
        raise PriorError(f"prior file {path}: its pipeline folder {pipeline} {problem}")
    for key in ("num_classes", "null_class", "image_size"):
        if key in spec and not (_is_int(spec[key]) and spec[key] >= (0 if key == "null_class" else 1)):
            raise PriorError(f"prior file {path}: \"{key}\" must be a positive integer, got {spec[key]!r}")
    if "scaling_factor" in spec and not (_is_number(spec["scaling_factor"]) and spec["scaling_factor"] > 0):
        raise PriorError(f"prior file {path}: \"scaling_factor\" must be a positive number, "
                         f"got {spec['scaling_factor']!r}")
    for key in ("class_table", "denoiser", "autoencoder", "scheduler"):
        if key in spec and (not isinstance(spec[key], str) or not spec[key].strip()):
            raise PriorError(f"prior file {path}: \"{key}\" must be a non-empty string, got {spec[key]!r}")
    facts = {k: v for k, v in spec.items() if k != "pipeline"}
    if facts.get("null_class", facts.get("num_classes")) != facts.get("num_classes", facts.get("null_class")):
        raise PriorError(f"prior file {path}: \"null_class\" {facts['null_class']} is not the last row "
                         f"(num_classes {facts['num_classes']}); ld3m-fast needs the null class in the "
                         "table's last row")
    if "class_table" in facts:
        facts["class_table"] = path.parent / facts["class_table"]
    return pipeline, facts


def _prior_file_source(path: Path) -> PriorSource:
    pipeline, facts = read_prior_file(path)
    return pipeline_source(pipeline, _read_index(pipeline), facts, where=f"{pipeline} (prior file {path})",
                           prior_file=path)


# --------------------------------------------------------------------------- reading a pipeline

class _Facts:
    """The facts of one pipeline as they are read, with where each came from."""

    def __init__(self, root: Path, where: str, given: dict, prior_file: Path | None):
        self.root, self.where, self.given, self.prior_file = root, where, given, prior_file
        self.sources: list[tuple[str, str]] = []

    def note(self, fact: str, source: str) -> None:
        self.sources.append((fact, source))

    def refuse(self, fact: str, why: str, key: str, example, condition: str = "") -> PriorError:
        """One line: the missing fact, why, and the prior-file key that gives it."""
        if self.prior_file is not None:
            how = f"add {json.dumps({key: example})[1:-1]} to the prior file {self.prior_file}"
        else:
            how = (f"write {json.dumps({'pipeline': str(self.root), key: example})} to a JSON file and pass "
                   "that file as the prior (--prior FILE, or `ld3m-fast prior import FILE OUT`)")
        return PriorError(f"{self.where}: {fact} cannot be read from the pipeline ({why}); "
                          f"{condition + ', ' if condition else ''}{how}")


def _components(index: dict, index_path: Path) -> dict[str, str]:
    """model_index.json's components: sub-folder name -> class name (absent ones left out)."""
    components = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        library, class_name = value
        if isinstance(class_name, str) and isinstance(library, (str, type(None))):
            components[name] = class_name
    if not components:
        raise PriorError(f"{index_path} names no components (entries \"name\": [library, class]); "
                         "it is not a pipeline written by diffusers' save_pretrained")
    return components


def _pick(facts: _Facts, components: dict, accepted, role: str) -> str:
    """The component that plays `role`: the prior file's choice, else the only one of an accepted class."""
    listing = ", ".join(f"{n}: {c}" for n, c in components.items())
    chosen = facts.given.get(role)
    if chosen is not None:
        if chosen not in components:
            raise PriorError(f"{facts.where}: the prior file's {role} {chosen!r} is not a component of "
                             f"its model_index.json ({listing})")
        if not accepted(components[chosen]):
            raise PriorError(f"{facts.where}: component {chosen!r} is a {components[chosen]}, not a "
                             f"supported {role}")
        return chosen
    found = [name for name, class_name in components.items() if accepted(class_name)]
    if len(found) == 1:
        return found[0]
    if not found:
        supported = {"denoiser": ", ".join(PIPELINE_DENOISERS), "autoencoder": ", ".join(PIPELINE_AUTOENCODERS),
                     "scheduler": "a diffusers *Scheduler"}[role]
        raise PriorError(f"{facts.where}: its model_index.json lists no {role} ld3m-fast can use "
                         f"({listing}); supported: {supported}")
    raise facts.refuse(f"the {role}", f"model_index.json lists several: {', '.join(found)}", role, found[0])


def _config(facts: _Facts, component: str) -> dict:
    folder = _relative(facts.root, facts.root, component, "component")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise PriorError(f"{facts.where}: component {component!r} has no {component}/config.json; the "
                         "pipeline folder is incomplete (copy it again)")
    return _read_json(_inside(facts.root, config_path, f"config {config_path}"), f"{component} config")


def _id2label(facts: _Facts, index: dict, denoiser: str, config: dict) -> tuple[dict[int, str] | None, str]:
    """id2label as {class: name} and where it was found, or (None, '')."""
    for value, where in ((index.get("id2label"), "model_index.json id2label"),
                         (config.get("id2label"), f"{denoiser}/config.json id2label")):
        if value is None:
            continue
        if not isinstance(value, dict) or not all(isinstance(k, str) and k.strip().isdigit()
                                                  and isinstance(v, str) for k, v in value.items()):
            raise PriorError(f"{facts.where}: {where} must map class numbers to names "
                             "({\"0\": \"tench\", ...})")
        labels = {int(k): v for k, v in value.items()}
        if sorted(labels) != list(range(len(labels))):
            raise PriorError(f"{facts.where}: {where} must name the classes 0 .. N-1 without gaps")
        return labels, where
    return None, ""


def _given_classes(facts: _Facts, rows: int, table: str) -> int | None:
    """The prior file's num_classes (or null_class), checked against a table of `rows` rows."""
    for key in ("num_classes", "null_class"):
        value = facts.given.get(key)
        if value is not None and value != rows - 1:
            raise PriorError(f"{facts.where}: the prior file's {key} {value} does not fit {table} ({rows} "
                             f"rows: {rows - 1} classes, then the null class)")
    return facts.given.get("num_classes", facts.given.get("null_class"))


def _classes(facts: _Facts, kind: str, denoiser: str, config: dict, labels: dict | None,
             labels_where: str) -> int:
    """The number of classes (the null class is the row after the last class)."""
    if kind == "adaln":
        return _dit_classes(facts, denoiser, config)
    if kind == "class_embedding":
        return _embedding_classes(facts, denoiser, config, labels, labels_where)
    return _table_classes(facts, denoiser, config)


def _dit_classes(facts: _Facts, denoiser: str, config: dict) -> int:
    """DiT: num_embeds_ada_norm classes; its label embedder's extra row is the null class."""
    count = config.get("num_embeds_ada_norm")
    if not (_is_int(count) and count > 0):
        raise PriorError(f"{facts.where}: {denoiser}/config.json num_embeds_ada_norm must be a positive "
                         f"integer (the number of classes), got {count!r}")
    _given_classes(facts, count + 1, f"{denoiser}'s label embedder (num_embeds_ada_norm {count})")
    facts.note("classes", f"{count}: {denoiser}/config.json num_embeds_ada_norm")
    facts.note("null class", f"row {count}: DiT's label embedder has num_embeds_ada_norm + 1 rows and "
                             "drops labels to the last (DiTPipeline's class_null)")
    return count


def _embedding_classes(facts: _Facts, denoiser: str, config: dict, labels: dict | None,
                       labels_where: str) -> int:
    """UNet2DModel: num_class_embeds rows, the last the null class when the prior file or id2label
    says there is one class fewer."""
    rows = config.get("num_class_embeds")
    if not (_is_int(rows) and rows > 1):
        raise PriorError(f"{facts.where}: {denoiser}/config.json num_class_embeds must be an integer "
                         f">= 2 (the classes and the null row), got {rows!r}")
    given = _given_classes(facts, rows, f"{denoiser}/config.json num_class_embeds {rows}")
    if given is not None:
        facts.note("classes", f"{given}: the prior file")
    elif labels is not None and len(labels) == rows - 1:
        given = len(labels)
        facts.note("classes", f"{given}: {labels_where} ({rows} rows in {denoiser}/config.json num_class_embeds)")
    elif labels is not None and len(labels) == rows:
        raise PriorError(f"{facts.where}: {denoiser} has no null class ({labels_where} names all {rows} "
                         "rows of num_class_embeds): classifier-free guidance needs an unconditional row; "
                         "use a model trained with one")
    else:
        raise facts.refuse("the number of classes and the null class",
                           f"{denoiser}/config.json has num_class_embeds {rows} and no id2label says whether "
                           "its last row is a null class", "num_classes", rows - 1,
                           condition=f"if row {rows - 1} is the null class")
    facts.note("null class", f"row {given}: the last row of {denoiser}'s class embedding")
    return given


def _table_classes(facts: _Facts, denoiser: str, config: dict) -> int:
    """A cross-attention UNet's classes: the rows of its class table, less the null row."""
    table = facts.given.get("class_table") or facts.root / CLASS_TABLE
    if not Path(table).is_file():
        dim = config.get("cross_attention_dim")
        raise facts.refuse(
            "the class table", f"{denoiser} is a UNet2DConditionModel, conditioned through cross-attention "
            f"on a class token, and the folder holds no {CLASS_TABLE}; save the table (num_classes + 1) x "
            f"{dim} under the name class_table, null class last, and give its file", "class_table",
            "class_table.safetensors")
    if table == facts.root / CLASS_TABLE:
        _inside(facts.root, table, f"class table {table}")
    try:
        with safe_open(str(table), framework="pt") as handle:
            shape = handle.get_slice("class_table").get_shape() if "class_table" in handle.keys() else None
    except (SafetensorError, OSError, ValueError) as error:
        raise PriorError(f"cannot read class table {table}: {_one_line(error)}") from None
    if shape is None or len(shape) != 2 or shape[0] < 2:
        raise PriorError(f"{table} must hold a 2-D tensor named class_table (num_classes + 1, D)")
    count = shape[0] - 1
    _given_classes(facts, shape[0], f"the class table {table}")
    facts.note("classes", f"{count}: the rows of {table} less the null row")
    facts.note("null class", f"row {count}: the last row of {table}")
    return count


def _scaling_factor(facts: _Facts, autoencoder: str, config: dict) -> float:
    shift = config.get("shift_factor")
    if shift not in (None, 0, 0.0):
        raise PriorError(f"{facts.where}: {autoencoder}/config.json has shift_factor {shift!r}; "
                         "ld3m-fast's autoencoders apply scaling_factor only")
    if "scaling_factor" in facts.given:
        facts.note("scaling factor", f"{facts.given['scaling_factor']}: the prior file")
        return float(facts.given["scaling_factor"])
    value = config.get("scaling_factor")
    if not (_is_number(value) and value > 0):
        raise facts.refuse("the autoencoder's scaling factor",
                           f"{autoencoder}/config.json has no positive scaling_factor; diffusers would "
                           "assume 0.18215, CompVis VQ models use 1.0", "scaling_factor", 1.0)
    facts.note("scaling factor", f"{value}: {autoencoder}/config.json scaling_factor")
    return float(value)


def _image_size(facts: _Facts, denoiser: str, config: dict, autoencoder: str, ae_config: dict) -> int:
    if "image_size" in facts.given:
        facts.note("native image size", f"{facts.given['image_size']}: the prior file")
        return facts.given["image_size"]
    blocks = ae_config.get("block_out_channels")
    side = config.get("sample_size")
    if isinstance(side, list) and len(side) == 2 and side[0] == side[1]:
        side = side[0]
    if not (_is_int(side) and side > 0) or not isinstance(blocks, list) or not blocks:
        raise facts.refuse("the native image size",
                           f"{denoiser}/config.json sample_size is {side!r}, not one latent side", "image_size", 256)
    factor = 2 ** (len(blocks) - 1)
    facts.note("native image size", f"{side * factor}: {denoiser}/config.json sample_size {side} x the "
                                     f"latent factor {factor} of {autoencoder} ({len(blocks)} levels)")
    return side * factor


def _denoiser_kind(facts: _Facts, denoiser: str, class_name: str, config: dict) -> tuple[str, str]:
    """(conditioning, the diffusers class to build) of the chosen denoiser, refused when it
    is not class-conditional the way an adapter needs."""
    if class_name == "Transformer2DModel":  # the legacy name of DiT checkpoints on the hub
        if config.get("norm_type") != "ada_norm_zero" or config.get("num_embeds_ada_norm") is None:
            raise PriorError(f"{facts.where}: {denoiser} is a Transformer2DModel with norm_type "
                             f"{config.get('norm_type')!r}, not a class-conditional DiT (ada_norm_zero)")
        return "adaln", "DiTTransformer2DModel"
    if class_name == "UNet2DModel":
        if config.get("num_class_embeds") is None:
            raise PriorError(f"{facts.where}: {denoiser} is not class-conditional (its config.json has "
                             "no num_class_embeds): LD3M needs a class-conditional prior")
        if config.get("class_embed_type") is not None:
            raise PriorError(f"{facts.where}: {denoiser} has class_embed_type "
                             f"{config['class_embed_type']!r}; ld3m-fast needs a class table "
                             "(num_class_embeds with class_embed_type null)")
    if class_name == "UNet2DConditionModel" and config.get("num_class_embeds") is not None:
        raise PriorError(f"{facts.where}: {denoiser} adds class embeddings to its time embedding and "
                         "cross-attends to a context besides; what that context is cannot be read "
                         "from the pipeline")
    return PIPELINE_DENOISERS[class_name], class_name


def _schedule(facts: _Facts, components: dict) -> str:
    def is_scheduler(class_name: str) -> bool:
        return class_name.endswith("Scheduler")

    if facts.given.get("scheduler") is None and not any(map(is_scheduler, components.values())):
        if (facts.root / SCHEDULER_CONFIG).is_file():
            facts.note("noise schedule", SCHEDULER_CONFIG)
            return "scheduler"
        raise PriorError(f"{facts.where}: the noise schedule cannot be read: model_index.json lists no "
                         f"scheduler and there is no {SCHEDULER_CONFIG}; copy the pipeline's scheduler "
                         "folder in")
    name = _pick(facts, components, is_scheduler, "scheduler")
    facts.note("noise schedule", f"{name}/scheduler_config.json ({components[name]})")
    return name


def pipeline_source(root: Path, index: dict, given: dict, *, where: str,
                    prior_file: Path | None = None) -> PriorSource:
    """The manifest of a diffusers pipeline folder, each fact read from its files or `given`
    (the facts of `prior_file`); one PriorError line for anything missing. No weights are read."""
    facts = _Facts(root, where, given, prior_file)
    components = _components(index, root / PIPELINE_INDEX)
    denoiser = _pick(facts, components, PIPELINE_DENOISERS.__contains__, "denoiser")
    autoencoder = _pick(facts, components, PIPELINE_AUTOENCODERS.__contains__, "autoencoder")
    config, ae_config = _config(facts, denoiser), _config(facts, autoencoder)
    kind, build_class = _denoiser_kind(facts, denoiser, components[denoiser], config)
    facts.note("denoiser", f"{denoiser}/ ({components[denoiser]}, model_index.json)")
    facts.note("autoencoder", f"{autoencoder}/ ({components[autoencoder]}, model_index.json)")
    labels, labels_where = _id2label(facts, index, denoiser, config)
    num_classes = _classes(facts, kind, denoiser, config, labels, labels_where)
    names = _class_names(facts, labels, labels_where, num_classes)
    scaling_factor = _scaling_factor(facts, autoencoder, ae_config)
    image_size = _image_size(facts, denoiser, config, autoencoder, ae_config)
    scheduler = _schedule(facts, components)
    manifest = {
        "format": FORMAT, "version": MANIFEST_VERSION, "conditioning": kind,
        "denoiser": {"class": build_class, "subfolder": denoiser},
        "autoencoder": {"class": components[autoencoder], "subfolder": autoencoder,
                        "scaling_factor": scaling_factor},
        "num_classes": num_classes, "image_size": image_size, "class_names": names,
        "description": f"diffusers {index.get('_class_name', 'pipeline')} folder {root.resolve()}",
    }
    _check_manifest(manifest, Path(where))
    table = (given.get("class_table") or root / CLASS_TABLE) if kind == "cross_attention" else None
    return PriorSource(root, manifest, scheduler, table, str(index.get("_class_name") or "pipeline"),
                       tuple(facts.sources))


def _class_names(facts: _Facts, labels: dict | None, where: str, num_classes: int) -> list[str] | None:
    if "class_names" in facts.given:
        names = facts.given["class_names"]
        if not (isinstance(names, list) and len(names) == num_classes and all(isinstance(n, str) for n in names)):
            raise PriorError(f"{facts.where}: the prior file's class_names must be {num_classes} strings")
        facts.note("class names", "the prior file")
        return names
    if labels is None:
        facts.note("class names", "none (no id2label)")
        return None
    if len(labels) != num_classes:
        raise PriorError(f"{facts.where}: {where} names {len(labels)} classes but the denoiser has "
                         f"{num_classes}; give class_names in a prior file or remove id2label")
    facts.note("class names", where)
    return [labels[k] for k in range(num_classes)]


def check_output_folder(out_dir: Path, force: bool) -> None:
    """Refuse a prior output folder that cannot be written, or that holds something without
    `force`, before anything is read (`prior import`, `convert`)."""
    from .._files import check_writable_folder

    check_writable_folder(out_dir, "output folder", if_not_empty=None if force else "pass --force to replace it",
                          error=PriorError)


def _check_no_overlap(out_dir: Path, source: Path) -> None:
    """Refuse an output folder inside, around or equal to the pipeline folder `source`."""
    out, src = out_dir.resolve(), source.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise PriorError(f"output folder {out_dir} overlaps the pipeline it is imported from ({source}); "
                         "write the prior folder elsewhere")


def import_prior(path, out_dir, *, force: bool = False) -> PriorSource:
    """Write the prior at `path` (a pipeline folder or prior file) as an ld3m-fast prior folder.

    The output is checked first, then the pipeline's facts (no weights read), then the weights
    are loaded strictly and written atomically (a temporary folder, then a rename); an existing
    non-empty `out_dir` is replaced only with `force`. `load_prior(out_dir)` then gives the same
    outputs as `load_prior(path)`. Returns the source, whose `facts` say where each fact came from.
    """
    from .io import build_prior, save_prior

    out_dir = Path(out_dir)
    source_path = Path(path)
    check_output_folder(out_dir, force)
    if source_path.is_dir():
        _check_no_overlap(out_dir, source_path)
    source = open_prior_source(source_path)
    _check_no_overlap(out_dir, source.root)
    prior = build_prior(source_path)
    save_prior(prior, out_dir, description=f"imported from {source.manifest['description']}")
    return source


def config_files(path) -> list[Path]:
    """The files a prior's architecture is read from (no weights): for a cache key such as the
    planner's. A prior file adds itself and its class table's header is not needed."""
    source = open_prior_source(path)
    files = [Path(path)] if Path(path).is_file() else []
    files += sorted(p for p in source.root.rglob("*.json") if p.is_file())
    return files


__all__ = ["PIPELINE_INDEX", "PRIOR_FILE_KEYS", "PriorSource", "config_files", "import_prior",
           "looks_like_hub_id", "open_prior_source", "pipeline_source", "read_prior_file"]
