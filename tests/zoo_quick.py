"""Quick fixed-seed quality checks on the shipped pair, shared by test_zoo_guidance and
test_zoo_samplers: the same labels and per-sample seeds for every mode, scored by the zoo's metric."""
import torch

from dgfast.zoo import load_pair
from dgfast.zoo.evaluate import balanced_labels, sample_mode
from dgfast.zoo.metrics import load_metric


def quick_scorer(samples: int):
    """score(mode, scale, **sample_mode keywords) -> the metric's dict (fd, accuracy, n) over `samples`
    balanced labels with seeds 0..samples-1."""
    finetuned, pretrained, info = load_pair()
    metric = load_metric()
    y = balanced_labels(samples, info["finetuned"]["config"]["num_classes"])
    seeds = list(range(samples))

    def score(mode: str, scale: float, **kwargs) -> dict:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small batches: one thread is as fast, and leaves the other core alone
        try:
            return metric(sample_mode(finetuned, pretrained, info, mode, scale, y, seeds, **kwargs), y)
        finally:
            torch.set_num_threads(threads)
    return score
