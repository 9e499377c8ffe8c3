"""One line for every bad flag of `plan`, `buffer`, `eval`, `prior train`, `prior import`, `convert`
and `prune`: exit code 2, no traceback, and nothing written (no output file or folder, no partial
file), all before any work. `distill` has its table in tests/test_bad_inputs_run.py.

Each row builds its argv from (ws, t): the module workspace (a tiny prior, an image folder, a
small safetensors set) and the row's own empty folder, in which nothing may appear.
"""
import pytest
import torch
from safetensors.torch import save_file

from _workspace import assert_one_line_error, make_workspace, run_cli


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = make_workspace(tmp_path_factory.mktemp("badcommands"))
    (root / "a-file").write_text("not a folder\n")
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("mine\n")
    (root / "buffer").mkdir()
    (root / "buffer" / "expert_0000.safetensors").write_bytes(b"an expert")
    (root / "garbage.ckpt").write_bytes(b"\x00not a checkpoint" * 10)
    (root / "garbage.safetensors").write_bytes(b"\x00not safetensors" * 10)
    labels = torch.arange(3).repeat(2)
    save_file({"images": torch.zeros(6, 3, 16, 16, dtype=torch.uint8), "labels": labels}, root / "set.safetensors")
    return root


def plan(*extra):
    return lambda ws, t: ["plan", "--prior", ws / "prior", "--res", 16, "--ipc", 1, "--classes", 2, "--steps", 2,
                          "--chunk", 1, "--memory-budget", "4GiB", *extra]


def buffer(*extra):
    return lambda ws, t: ["buffer", "--data", ws / "data", "--cache-dir", ws / "cache", "--res", 16,
                          "--out", t / "buf", "--experts", 1, "--width", 8, "--threads", 1, *extra]


def evaluate(*extra):
    return lambda ws, t: ["eval", ws / "set.safetensors", "--data", ws / "data", "--cache-dir", ws / "cache",
                          "--out", t / "out", "--threads", 1, "--no-progress", *extra]


def train(*extra):
    return lambda ws, t: ["prior", "train", "--out", t / "prior", "--ae-steps", 1, "--unet-steps", 1,
                          "--threads", 1, *extra]


def prune(*extra):
    return lambda ws, t: ["prune", ws / "data", "--cache-dir", ws / "cache", "--res", 16,
                          "--out", t / "losses.safetensors", "--threads", 1, *extra]


def replaced(builder, flag, value):
    """`builder`'s argv with the value after `flag` replaced (an output path, say)."""
    def make(ws, t):
        argv = builder(ws, t)
        argv[argv.index(flag) + 1] = value(ws, t)
        return argv
    return make


# (name, argv from (ws, t), fragments of the one error line)
PLAN_CASES = [
    ("plan steps 1000", plan("--steps", 1000), ["--steps 1000 is not below the prior's 1000 training timesteps"]),
    ("plan steps 1001", plan("--steps", 1001), ["--steps 1001 is not below"]),
    ("plan steps 0", plan("--steps", 0), ["--steps must be >= 1"]),
    ("plan chunk 0", plan("--chunk", 0), ["--chunk must be >= 1 or auto"]),
    ("plan chunk -1", plan("--chunk", -1), ["--chunk must be >= 1 or auto"]),
    ("plan decoder chunk 0", plan("--decoder-chunk", 0), ["--decoder-chunk must be >= 1"]),
    ("plan store steps above the chain", plan("--store-steps", 5), ["--store-steps 5 is more than"]),
    ("plan micro batch 0", plan("--micro-batch", 0), ["--micro-batch must be >= 1"]),
    ("plan ipc 0", plan("--ipc", 0), ["--ipc must be >= 1"]),
    ("plan res 0", plan("--res", 0), ["--res must be >= 1"]),
    ("plan res not a multiple", plan("--res", 18), ["latent factor 4"]),
    ("plan guidance nan", plan("--guidance", "nan"), ["finite number"]),
    ("plan sac min flops nan", plan("--sac-min-flops", "nan"), ["finite number"]),
    ("plan eta 100", plan("--eta", 100), ["--eta must be <= 1"]),
    ("plan dtype", plan("--dtype", "fp8"), ["unknown --dtype 'fp8'"]),
    ("plan classes 0", plan("--classes", 0), ["argument --classes", "expected an integer >= 1"]),
    ("plan world size 0", plan("--world-size", 0), ["argument --world-size", "expected an integer >= 1"]),
    ("plan world size above the classes", plan("--world-size", 3), ["3"]),
    ("plan memory budget", plan("--memory-budget", "lots"), ["cannot read the --memory-budget"]),
    ("plan prior missing", replaced(plan(), "--prior", lambda ws, t: t / "nope"), ["--prior must be one of"]),
    ("plan released compat steps 3", plan("--released-compat", "--steps", 3), ["use --steps 2 or 4"]),
    ("plan json unwritable", plan("--json", "/proc/plan.json"), ["cannot write --json"]),
    ("plan json a folder", lambda ws, t: plan("--json", ws / "full")(ws, t), ["--json", "is a folder"]),
    ("plan json under a file", lambda ws, t: plan("--json", ws / "a-file" / "p.json")(ws, t), ["is not a folder"]),
    ("plan unknown flag", plan("--chunks", "1,2"), ["unrecognized arguments"]),
]

BUFFER_CASES = [
    ("buffer lr 0", buffer("--lr", 0), ["argument --lr", "expected a finite number > 0, got '0'"]),
    ("buffer lr nan", buffer("--lr", "nan"), ["argument --lr", "got 'nan'"]),
    ("buffer lr inf", buffer("--lr", "inf"), ["argument --lr", "got 'inf'"]),
    ("buffer lr negative", buffer("--lr", -0.1), ["argument --lr"]),
    ("buffer lr word", buffer("--lr", "fast"), ["argument --lr", "got 'fast'"]),
    ("buffer dsa garbage", buffer("--dsa", "garbage"), ["argument --dsa", "unknown DSA augmentation 'garbage'"]),
    ("buffer experts 0", buffer("--experts", 0), ["argument --experts", "expected an integer >= 1"]),
    ("buffer epochs 0", buffer("--epochs", 0), ["argument --epochs"]),
    ("buffer epochs below what MTT reads", buffer("--epochs", 1), ["--epochs 1 is fewer than the 4 epochs"]),
    ("buffer max start epoch 0", buffer("--max-start-epoch", 0), ["argument --max-start-epoch"]),
    ("buffer expert epochs 0", buffer("--expert-epochs", 0), ["argument --expert-epochs"]),
    ("buffer batch 0", buffer("--batch", 0), ["argument --batch"]),
    ("buffer width 0", buffer("--width", 0), ["argument --width"]),
    ("buffer depth 0", buffer("--depth", 0), ["argument --depth"]),
    ("buffer norm", buffer("--norm", "group"), ["argument --norm", "invalid choice"]),
    ("buffer res 0", buffer("--res", 0), ["argument --res"]),
    ("buffer res word", buffer("--res", "big"), ["argument --res", "expected an integer"]),
    ("buffer seed negative", buffer("--seed", -1), ["argument --seed"]),
    ("buffer max per class 0", buffer("--max-per-class", 0), ["argument --max-per-class"]),
    ("buffer prune percent 0", buffer("--prune-percent", 0), ["argument --prune-percent", "<= 100"]),
    ("buffer prune percent 101", buffer("--prune-percent", 101), ["argument --prune-percent"]),
    ("buffer prune order", buffer("--prune-order", "middle"), ["argument --prune-order", "invalid choice"]),
    ("buffer threads 0", buffer("--threads", 0), ["argument --threads"]),
    ("buffer threads 10000", buffer("--threads", 10000), ["--threads 10000 is more than"]),
    ("buffer device", buffer("--device", "tpu"), ["unknown --device 'tpu'"]),
    ("buffer out is a file", replaced(buffer(), "--out", lambda ws, t: ws / "a-file"),
     ["--out", "exists and is not a folder"]),
    ("buffer out under a file", replaced(buffer(), "--out", lambda ws, t: ws / "a-file" / "buf"), ["is not a folder"]),
    ("buffer out unwritable", replaced(buffer(), "--out", lambda ws, t: "/proc/buf"), ["cannot write --out"]),
    ("buffer out holds a buffer", replaced(buffer(), "--out", lambda ws, t: ws / "buffer"), ["already holds a buffer"]),
    ("buffer data missing", replaced(buffer(), "--data", lambda ws, t: t / "nope"), ["does not exist"]),
    ("buffer without --res", lambda ws, t: ["buffer", "--out", t / "buf"], ["--res"]),
]

EVAL_CASES = [
    ("eval res 0", evaluate("--res", 0), ["argument --res", "expected an integer >= 1"]),
    ("eval epochs 0", evaluate("--epochs", 0), ["argument --epochs"]),
    ("eval seeds 0", evaluate("--seeds", 0), ["argument --seeds"]),
    ("eval batch 0", evaluate("--batch", 0), ["argument --batch"]),
    ("eval lr 0", evaluate("--lr", 0), ["argument --lr"]),
    ("eval lr nan", evaluate("--lr", "nan"), ["argument --lr"]),
    ("eval max test per class 0", evaluate("--max-test-per-class", 0), ["expected an integer >= 1"]),
    ("eval temperature 0", evaluate("--temperature", 0), ["argument --temperature"]),
    ("eval teacher epochs 0", evaluate("--teacher-epochs", 0), ["argument --teacher-epochs"]),
    ("eval seed negative", evaluate("--seed", -1), ["argument --seed"]),
    ("eval threads 10000", evaluate("--threads", 10000), ["--threads 10000 is more than"]),
    ("eval protocol", evaluate("--protocol", "fast"), ["argument --protocol", "invalid choice"]),
    ("eval labels", evaluate("--labels", "fuzzy"), ["argument --labels"]),
    ("eval report", evaluate("--report", "mean"), ["argument --report"]),
    ("eval augment", evaluate("--augment", "mixup"), ["argument --augment"]),
    ("eval baselines", evaluate("--baselines", "random,coreset"), ["argument --baselines"]),
    ("eval archs", evaluate("--archs", "lenet"), ["unknown architecture 'lenet'"]),
    ("eval full real percent", evaluate("--full-real", 91), ["not a fraction in [0, 1]"]),
    ("eval full real word", evaluate("--full-real", "high"), ["is not a number"]),
    ("eval no dsa and cutmix", evaluate("--no-dsa", "--augment", "cutmix"), ["contradict each other"]),
    ("eval teacher without soft labels", evaluate("--teacher", "train"), ["add --labels soft"]),
    ("eval teacher missing", lambda ws, t: evaluate("--labels", "soft", "--teacher", t / "nope.pt")(ws, t),
     ["--teacher", "does not exist"]),
    ("eval set missing", lambda ws, t: ["eval", t / "nope.safetensors", "--out", t / "out"], ["does not exist"]),
    ("eval out is a file", replaced(evaluate(), "--out", lambda ws, t: ws / "a-file"), ["exists and is not a folder"]),
    ("eval out under a file", replaced(evaluate(), "--out", lambda ws, t: ws / "a-file" / "out"), ["is not a folder"]),
    ("eval out unwritable", replaced(evaluate(), "--out", lambda ws, t: "/proc/eval"), ["cannot write --out"]),
    ("eval device", evaluate("--device", "tpu"), ["unknown --device 'tpu'"]),
]

TRAIN_CASES = [
    ("prior train ema decay 5", train("--ema-decay", 5), ["argument --ema-decay", "<= 1"]),
    ("prior train ema decay negative", train("--ema-decay", -0.1), ["argument --ema-decay"]),
    ("prior train kl weight negative", train("--kl-weight", -1), ["argument --kl-weight", ">= 0"]),
    ("prior train guidance inf", train("--guidance", "inf"), ["argument --guidance", "got 'inf'"]),
    ("prior train guidance nan", train("--guidance", "nan"), ["argument --guidance"]),
    ("prior train sample steps 0", train("--sample-steps", 0), ["argument --sample-steps", ">= 1 and <= 999"]),
    ("prior train sample steps 1000", train("--sample-steps", 1000), ["argument --sample-steps"]),
    ("prior train ae steps 0", train("--ae-steps", 0), ["argument --ae-steps"]),
    ("prior train unet steps 0", train("--unet-steps", 0), ["argument --unet-steps"]),
    ("prior train batch size 0", train("--batch-size", 0), ["argument --batch-size"]),
    ("prior train ae batch size 0", train("--ae-batch-size", 0), ["argument --ae-batch-size"]),
    ("prior train lr 0", train("--lr", 0), ["argument --lr", "> 0"]),
    ("prior train ae lr negative", train("--ae-lr", -1), ["argument --ae-lr"]),
    ("prior train class dropout 1", train("--class-dropout", 1), ["argument --class-dropout", "< 1"]),
    ("prior train class dropout negative", train("--class-dropout", -0.5), ["argument --class-dropout"]),
    ("prior train seed negative", train("--seed", -1), ["argument --seed"]),
    ("prior train log every 0", train("--log-every", 0), ["argument --log-every"]),
    ("prior train eval images negative", train("--eval-images", -1), ["argument --eval-images", ">= 0"]),
    ("prior train max per class 0", train("--max-per-class", 0), ["argument --max-per-class"]),
    ("prior train threads 0", train("--threads", 0), ["argument --threads"]),
    ("prior train threads 10000", train("--threads", 10000), ["--threads 10000 is more than"]),
    ("prior train report unwritable", train("--report", "/proc/report.json"), ["cannot write --report"]),
    ("prior train report a folder", lambda ws, t: train("--report", ws / "full")(ws, t), ["--report", "is a folder"]),
    ("prior train samples unwritable", train("--samples", "/proc/samples.png"), ["cannot write --samples"]),
    ("prior train out is a file", replaced(train(), "--out", lambda ws, t: ws / "a-file"),
     ["--out", "exists and is not a folder"]),
    ("prior train out unwritable", replaced(train(), "--out", lambda ws, t: "/proc/prior"), ["cannot write --out"]),
    ("prior train without out", lambda ws, t: ["prior", "train"], ["--out"]),
]

IMPORT_CASES = [
    ("prior import pipeline missing", lambda ws, t: ["prior", "import", t / "nope", t / "out"], ["does not exist"]),
    ("prior import not a pipeline", lambda ws, t: ["prior", "import", ws / "full", t / "out"], ["full"]),
    ("prior import out is a file", lambda ws, t: ["prior", "import", ws / "prior", ws / "a-file"],
     ["exists and is not a folder"]),
    ("prior import out not empty", lambda ws, t: ["prior", "import", ws / "prior", ws / "full"],
     ["exists and is not empty; pass --force"]),
    ("prior import out unwritable", lambda ws, t: ["prior", "import", ws / "prior", "/proc/prior"],
     ["cannot write output folder"]),
    ("prior import unknown action", lambda ws, t: ["prior", "export"], ["invalid choice"]),
]

CONVERT_CASES = [
    ("convert checkpoint missing", lambda ws, t: ["convert", t / "nope.ckpt", t / "out"], ["does not exist"]),
    ("convert checkpoint garbage", lambda ws, t: ["convert", ws / "garbage.ckpt", t / "out"],
     ["cannot read", "as a PyTorch checkpoint"]),
    ("convert safetensors garbage", lambda ws, t: ["convert", ws / "garbage.safetensors", t / "out"],
     ["cannot read", "as a safetensors checkpoint"]),
    ("convert out is a file", lambda ws, t: ["convert", ws / "garbage.ckpt", ws / "a-file"],
     ["exists and is not a folder"]),
    ("convert out not empty", lambda ws, t: ["convert", ws / "garbage.ckpt", ws / "full"],
     ["exists and is not empty; pass --force"]),
    ("convert out unwritable", lambda ws, t: ["convert", ws / "garbage.ckpt", "/proc/prior"],
     ["cannot write output folder"]),
]

PRUNE_CASES = [
    ("prune out not safetensors", replaced(prune(), "--out", lambda ws, t: t / "losses.pt"), ["give a .safetensors"]),
    ("prune out exists", replaced(prune(), "--out", lambda ws, t: ws / "set.safetensors"), ["already exists"]),
    ("prune out unwritable", replaced(prune(), "--out", lambda ws, t: "/proc/l.safetensors"), ["cannot write --out"]),
    ("prune out a folder", replaced(prune(), "--out", lambda ws, t: ws / "buffer"), ["give a .safetensors"]),
    ("prune res 0", prune("--res", 0), ["argument --res"]),
    ("prune scorer epochs 0", prune("--scorer-epochs", 0), ["argument --scorer-epochs"]),
    ("prune max per class 0", prune("--max-per-class", 0), ["argument --max-per-class"]),
    ("prune seed negative", prune("--seed", -1), ["argument --seed"]),
    ("prune scorer missing", lambda ws, t: prune("--scorer", t / "nope.pt")(ws, t), ["--scorer", "does not exist"]),
    ("prune threads 10000", prune("--threads", 10000), ["--threads 10000 is more than"]),
    ("prune data missing", lambda ws, t: ["prune", t / "nope", "--res", 16, "--out", t / "l.safetensors",
                                          "--threads", 1], ["does not exist"]),
]

CASES = PLAN_CASES + BUFFER_CASES + EVAL_CASES + TRAIN_CASES + IMPORT_CASES + CONVERT_CASES + PRUNE_CASES


def _tree(root) -> dict:
    return {p: (p.read_bytes() if p.is_file() else None) for p in root.rglob("*") if "cache" not in p.parts}


@pytest.mark.parametrize("name, make_argv, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_flag_is_one_line(ws, tmp_path, capsys, name, make_argv, fragments):
    before = _tree(ws)
    code, _, err = run_cli(make_argv(ws, tmp_path), capsys)
    assert_one_line_error(code, err, *fragments)
    assert not list(tmp_path.iterdir())  # no output, no temporary file
    assert _tree(ws) == before  # and nothing of the inputs changed
