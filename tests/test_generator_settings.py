"""The generator's recompute knobs as distill settings: flags, config keys, one-line errors."""
import argparse

import pytest

from ld3m_fast import LD3MError
from ld3m_fast.cli import distill as cli_distill
from ld3m_fast.cli.settings import explicit_settings
from ld3m_fast.distill.config import DistillConfig
from ld3m_fast.distill.assemble import chunk_knobs


def test_flags_reach_the_generator():
    parser = argparse.ArgumentParser()
    cli_distill.add_arguments(parser)
    args = parser.parse_args(["--chunk", "5", "--decoder-chunk", "2", "--store-steps", "3",
                              "--sac-min-flops", "17280", "--steps", "10"])
    config = DistillConfig(**explicit_settings(args))
    assert chunk_knobs(config) == dict(chunk_size=5, decoder_chunk=2, store_steps=3, sac_min_flops=17280.0)
    assert chunk_knobs(DistillConfig()) == dict(chunk_size=None, decoder_chunk=None, store_steps=0,
                                                sac_min_flops=None)
    assert DistillConfig.from_dict({"store_steps": 4, "decoder_chunk": 1}).store_steps == 4


@pytest.mark.parametrize("settings,fragment", [
    (dict(grad_mode="released", store_steps=2), "--grad-mode recompute"),
    (dict(grad_mode="autograd", decoder_chunk=2), "--grad-mode recompute"),
    (dict(steps=4, store_steps=5), "more than the chain's 4 steps"),
])
def test_impossible_knobs_are_one_line_errors(settings, fragment):
    with pytest.raises(LD3MError, match=fragment):
        DistillConfig(**settings).check_method()


def test_out_of_range_values_are_rejected_by_validation():
    for settings, flag in ((dict(decoder_chunk=0), "--decoder-chunk"), (dict(store_steps=-1), "--store-steps"),
                           (dict(sac_min_flops=-1.0), "--sac-min-flops")):
        config = DistillConfig(prior="p", iterations=1, batch_real=1, **settings)
        with pytest.raises(LD3MError, match=flag):
            config.validate()
