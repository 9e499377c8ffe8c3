"""One run description, one assembler: the planner walks the iteration the run builds.

For a set of configs, the run's assembled iteration (`build_setup`, with the step context its
`Distiller` makes) and the planner's walk of the same config (`walked_description`) are compared
as descriptions: the chain (timesteps, per-step noise, guidance, skip weights), its gradient mode
and chunking, the prior's architecture, the algorithm and its network, the augmentation, the
dtype, this process's rows and the class groups. Equal descriptions, equal digests."""
import pytest

from ld3m_fast import build_tiny_prior, save_prior
from ld3m_fast.distill.algorithms import NetworkSpec
from ld3m_fast.distill.assemble import describe_step, digest
from ld3m_fast.distill.buffers import build_buffer
from ld3m_fast.distill.config import DistillConfig, resolve_defaults
from ld3m_fast.distill.planner.memory import memory_budget
from ld3m_fast.distill.planner.plan import choose_knobs, planning_config
from ld3m_fast.distill.planner.simulate import Walk, walked_description
from ld3m_fast.distill.run import Distiller
from ld3m_fast.distill.setup import build_setup
from ld3m_fast.distributed import Single

from test_loop import CLASSES, RES, write_image_folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from ld3m_fast.data import load_dataset

    root = tmp_path_factory.mktemp("description")
    save_prior(build_tiny_prior(num_classes=10, image_size=RES, seed=0), root / "prior")
    write_image_folder(root / "data" / "train", per_class=4, seed=0)
    data = load_dataset(root / "data", split="train", res=RES, cache_dir=root / "cache")
    build_buffer(root / "buffer", NetworkSpec(num_classes=CLASSES, res=RES, width=8), data.images, data.labels,
                 num_experts=1, epochs=3, keep_epochs=3, batch_size=20, seed=0)
    return root


def _config(workspace, tmp_path, **settings):
    values = dict(data=str(workspace / "data"), prior=str(workspace / "prior"), ipc=2, steps=2, res=RES, width=8,
                  batch_real=4, iterations=1, progress=False, cache_dir=str(workspace / "cache"), max_per_class=4,
                  out=str(tmp_path / "run"), syn_steps=2, expert_epochs=1, buffer=str(workspace / "buffer"),
                  threads=1, chunk=2)
    values.update(settings)
    return DistillConfig(**values)


class _RankZeroOfTwo(Single):
    """Rank 0 of two processes, for building a run's step context without a process group."""

    world_size = 2


def _run_description(config, tmp_path, world_size=1):
    setup = build_setup(resolve_defaults(config))
    comm = _RankZeroOfTwo() if world_size == 2 else Single()
    distiller = Distiller(setup, tmp_path / "unused", comm=comm)
    return setup, describe_step(setup.iteration, distiller.context, setup.synthetic.labels)


CASES = {
    "eta 0.5 (per-step noise)": dict(eta=0.5),
    "released-compat at T=6 (7 released steps)": dict(released_compat=True, steps=6, grad_mode="released",
                                                     chunk=None),
    "MTT": dict(algorithm="mtt", micro_batch=2),
    "DC": dict(algorithm="dc"),
    "bf16": dict(dtype="bf16"),
    "stored steps, selective checkpointing, class groups": dict(store_steps=2, sac_min_flops=100.0, decoder_chunk=1),
    "mean skip, guidance 1": dict(skip="mean", guidance=1.0),
}


@pytest.mark.parametrize("settings", CASES.values(), ids=CASES.keys())
def test_the_planner_walks_the_iteration_the_run_builds(workspace, tmp_path, settings):
    config = _config(workspace, tmp_path, **settings)
    _, run = _run_description(config, tmp_path)
    planned = walked_description(Walk.of(planning_config(config), CLASSES))
    assert planned == run
    assert digest(planned) == digest(run)


def test_what_the_descriptions_hold(workspace, tmp_path):
    """The settings the planner used to miss (eta, the released timestep list) are in them."""
    eta = walked_description(Walk.of(planning_config(_config(workspace, tmp_path, eta=0.5)), CLASSES))
    assert eta["generator"]["per_step_noise"] and eta["generator"]["eta"] == 0.5
    released = walked_description(Walk.of(planning_config(_config(workspace, tmp_path, **CASES[
        "released-compat at T=6 (7 released steps)"])), CLASSES))
    assert released["generator"]["steps"] == 7 and released["generator"]["clamp"]
    assert released["generator"]["checkpoint_attention"]  # auto: on with --released-compat --grad-mode released
    plain = walked_description(Walk.of(planning_config(_config(workspace, tmp_path)), CLASSES))
    assert plain["generator"]["steps"] == 2 and not plain["generator"]["per_step_noise"]
    assert digest(plain) != digest(eta) != digest(released)


def test_one_rank_of_two(workspace, tmp_path):
    config = _config(workspace, tmp_path)
    _, run = _run_description(config, tmp_path, world_size=2)
    planned = walked_description(Walk.of(planning_config(config), CLASSES, world_size=2))
    assert planned == run
    assert run["rows"] == [0, 4] and run["total_images"] == 6  # rank 0: classes 0-1 of 3, IPC 2


def test_chunk_auto_runs_the_walk_the_planner_chose(workspace, tmp_path):
    config = _config(workspace, tmp_path, chunk="auto", memory_budget="1GiB", memory_reserve="0")
    setup, run = _run_description(config, tmp_path)
    knobs, best = choose_knobs(config, CLASSES, memory_budget("1GiB", "0"), progress=False)
    assert setup.plan["knobs"] == knobs
    assert walked_description(best.walk) == run
