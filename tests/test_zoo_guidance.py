"""The shipped pair shows Domain Guidance's claim on a quick fixed-seed check (issue 14 item 5):
guided by the pre-trained model's null branch (DoG), samples land nearer the target domain than
guided by the fine-tuned model's own null branch (CFG) at the same scale, and both beat no guidance
at a small scale. dgfast/zoo/RESULTS.md has the 3-seed x 1000-sample sweep this samples from.

The scales: the check asks for DoG ahead of CFG at w = 2, where the sweep separates them by far
more than the seed spread (dgfast/zoo/RESULTS.md: 20.9 +- 0.2 vs 34.2 +- 0.2), and for DoG at a small
scale ahead of no guidance: a guide that lost the pre-trained branch (or its null label) makes DoG
into CFG or worse. test_zoo_demo_order checks the order at each mode's best scale."""
from zoo_quick import quick_scorer

SAMPLES, STEPS = 200, "20"  # ~25 s on one core; measured here: FT 21.8, DoG 1.2 17.8, DoG 2 21.4, CFG 2 34.6


def test_dog_beats_cfg_and_no_guidance():
    score = quick_scorer(SAMPLES)

    def fd(mode, scale):
        return score(mode, scale, steps=STEPS)["fd"]
    got = {"finetuned": fd("finetuned", 1.0), "dog 1.2": fd("dog", 1.2), "dog 2": fd("dog", 2.0),
           "cfg 2": fd("cfg", 2.0)}
    assert got["dog 2"] < 0.85 * got["cfg 2"], got
    assert got["dog 1.2"] < got["finetuned"], got
