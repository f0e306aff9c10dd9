"""The timing half of bench/frontier.py: a few frontier points on a small batch, side by side in one
group with the baseline (DDPM-250) first. Quality (FD, accuracy) is frontier.py's, in bench/RESULTS.md.

    OMP_NUM_THREADS=1 pytest bench/bench_frontier.py --benchmark-only --benchmark-columns=min,median,rounds

extra_info holds each point's forwards per sample (fine-tuned + pre-trained), the machine-independent
cost; compare the minimum times (noisy 2-core box).
"""
import pytest
import torch

import frontier
from dgfast.zoo import load_pair
from dgfast.zoo.demo import best_scales
from dgfast.zoo.evaluate import balanced_labels, sample_mode

POINTS = ["ddpm:250", "ddim:25", "dpm2m:20", "dpmpp-2m-karras:20", "dpmpp-2m-karras:12", frontier.RECOMMENDED]
N = 8


@pytest.fixture(scope="module")
def setup():
    models = load_pair()
    scale = best_scales()["dog"]
    y = balanced_labels(N, models[2]["finetuned"]["config"]["num_classes"])
    sample_mode(*models, "dog", scale, y[:2], [0, 1], steps="2")  # pairing (weight prepacking): not timed
    return models, scale, y


@pytest.mark.parametrize("name", POINTS)
def test_frontier_point(benchmark, setup, name):
    point = frontier.Point.parse(name)
    if point.sampler not in frontier.NATIVE:
        pytest.importorskip("diffusers")
    models, scale, y = setup
    kw = point.sample_kwargs()

    def run():
        return sample_mode(*models, "dog", scale, y, list(range(N)), **kw)

    ft, pre = frontier.count_forwards(point, *models, scale)
    benchmark.group = f"dgfast-frontier n={N} DoG w={scale:g}"
    benchmark.extra_info.update(finetuned_forwards=ft, pretrained_forwards=pre, torch=torch.__version__)
    x = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    assert x.shape[0] == N and torch.isfinite(x).all()
