"""`make demo`'s quality table reads DoG < CFG < fine-tuned only on every demo seed (issue 14
item 3): the demo's own defaults (samples, steps, the best scales of RESULTS.md's sweep) and its own
quality function, for the first three --seed values. A pair, a guide or a scale choice that makes
DoG no better than CFG, or guidance no better than none, fails here before a user sees it."""
import argparse

import pytest

from dgfast.zoo import load_pair
from dgfast.zoo.demo import add_arguments, best_scales, check_args, mode_quality


@pytest.fixture(scope="module")
def demo_setup():
    args = add_arguments(argparse.ArgumentParser()).parse_args([])
    check_args(args)
    return load_pair(), {"finetuned": 1.0, **best_scales()}, args


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_demo_table_orders_dog_cfg_finetuned(demo_setup, seed):
    (finetuned, pretrained, info), scales, args = demo_setup
    q = mode_quality(finetuned, pretrained, info, scales, args.quality_samples, args.steps, seed)
    fd = {m: round(r["fd"], 3) for m, r in q.items()}
    assert fd["dog"] < fd["cfg"] < fd["finetuned"], fd
