"""Respacing and per-step coefficients against the values worked out in
docs/upstream_sampling.md §2.2-2.4 (written here as literals, not recomputed)."""
import numpy as np
import pytest
import torch

from dgfast.ops import NUM_COEFS
from dgfast.schedule import Schedule, space_timesteps

# --------------------------------------------------------------------------------------------
# Respacing (§2.2)
# --------------------------------------------------------------------------------------------

STEPS_50 = [0, 20, 41, 61, 82, 102, 122, 143, 163, 183, 204, 224, 245, 265, 285, 306, 326, 347, 367, 387,
            408, 428, 449, 469, 489, 510, 530, 550, 571, 591, 612, 632, 652, 673, 693, 714, 734, 754, 775, 795,
            816, 836, 856, 877, 897, 917, 938, 958, 979, 999]
# stride 41.625 hits exact .5 ties: 166.5 -> 166, 499.5 -> 500, 832.5 -> 832 (half to even)
STEPS_25 = [0, 42, 83, 125, 166, 208, 250, 291, 333, 375, 416, 458, 500, 541, 583, 624, 666, 708, 749, 791,
            832, 874, 916, 957, 999]
# "250": stride 999/249; 4-gaps except 5-gaps after sorted indices 41, 124, 207 (round(k*0.01205) steps up
# at k = 42, 125, 208), so k -> 4k + (0, 1, 2, 3) over the four runs; ends 983, 987, 991, 995, 999.
STEPS_250 = ([4 * k for k in range(0, 42)] + [4 * k + 1 for k in range(42, 125)]
             + [4 * k + 2 for k in range(125, 208)] + [4 * k + 3 for k in range(208, 250)])
# "100": k * 999/99 = 10k + k/11 (never a tie), so k -> 10k + round(k/11): 11-gaps after 50, 151, ...
STEPS_100 = [10 * k + round(k / 11) for k in range(100)]
# sections of 334, 333, 333 steps with strides 37, 332/14, 332/19
STEPS_10_15_20 = [0, 37, 74, 111, 148, 185, 222, 259, 296, 333,
                  334, 358, 381, 405, 429, 453, 476, 500, 524, 547, 571, 595, 619, 642, 666,
                  667, 684, 702, 719, 737, 754, 772, 789, 807, 824, 842, 859, 877, 894, 912, 929, 947, 964, 982, 999]


def test_respacing_250():
    got = space_timesteps(1000, "250")
    assert got == STEPS_250
    assert len(got) == 250 and 999 in got and 996 not in got
    gaps = np.diff(got)
    assert (gaps == 4).sum() == 246 and (gaps == 5).sum() == 3
    assert int(np.argmax(gaps == 5)) == 41  # the first 5-gap, as docs/upstream_sampling.md §2.2 states
    assert got[-5:] == [983, 987, 991, 995, 999]


def test_respacing_50_25():
    assert space_timesteps(1000, "50") == STEPS_50
    assert space_timesteps(1000, "25") == STEPS_25
    assert 167 not in STEPS_25 and 833 not in STEPS_25  # what floor(x + 0.5) would give


def test_respacing_100_1000():
    got = space_timesteps(1000, "100")
    assert got[-3:] == [979, 989, 999] and got[:3] == [0, 10, 20] and len(got) == 100
    assert got == STEPS_100
    assert got[5:7] == [50, 61]
    assert space_timesteps(1000, "1000") == list(range(1000))


def test_respacing_int_and_list_forms():
    assert space_timesteps(1000, 50) == STEPS_50
    assert space_timesteps(1000, [50]) == STEPS_50
    assert space_timesteps(1000, "10,15,20") == STEPS_10_15_20
    assert space_timesteps(1000, [10, 15, 20]) == STEPS_10_15_20
    # a 1-step section takes its start; sections can abut
    assert space_timesteps(1000, [3, 1]) == [0, 250, 499, 500]


@pytest.mark.parametrize("spec,stride,last", [("ddim50", 20, 980), ("ddim25", 40, 960), ("ddim100", 10, 990),
                                               ("ddim250", 4, 996), ("ddim10", 100, 900)])
def test_respacing_ddim(spec, stride, last):
    got = space_timesteps(1000, spec)
    assert got == list(range(0, 1000, stride))
    assert got[-1] == last


def test_50_is_not_ddim50():
    assert space_timesteps(1000, "50") != space_timesteps(1000, "ddim50")


@pytest.mark.parametrize("spec", ["ddim300", "0", "abc", "ddimx", "1001", "600,600", "10,,5", "", [0], [5, -1]])
def test_respacing_errors(spec):
    with pytest.raises(ValueError, match="steps"):
        space_timesteps(1000, spec)


@pytest.mark.parametrize("steps", [0, -3, "0", "abc", "ddim300", "1001"])
def test_schedule_from_steps_errors(steps):
    with pytest.raises(ValueError, match="steps"):
        Schedule.from_steps(steps)


@pytest.mark.parametrize("steps", [None, 2.5, True])
def test_schedule_from_steps_type_errors(steps):
    with pytest.raises(TypeError, match="steps"):
        Schedule.from_steps(steps)


# --------------------------------------------------------------------------------------------
# Tables and per-step float32 coefficients (§2.1, §2.3, §2.4, §2.7)
# --------------------------------------------------------------------------------------------

def float64_tables(kept):
    """The reference's float64 arithmetic, written out independently of dgfast.schedule."""
    base = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    ac_full = np.cumprod(1.0 - base)
    betas, last = [], 1.0
    for i in kept:  # SpacedDiffusion: betas recomputed from ratios of alpha-bar
        betas.append(1 - ac_full[i] / last)
        last = ac_full[i]
    b = np.array(betas, dtype=np.float64)
    ac = np.cumprod(1.0 - b)
    acp = np.append(1.0, ac[:-1])
    pv = b * (1.0 - acp) / (1.0 - ac)
    return dict(
        A=np.sqrt(1.0 / ac), B=np.sqrt(1.0 / ac - 1), C1=b * np.sqrt(acp) / (1.0 - ac),
        C2=(1.0 - acp) * np.sqrt(1.0 - b) / (1.0 - ac), Lmin=np.log(np.append(pv[1], pv[1:])), Lmax=np.log(b),
        ac=ac, acp=acp)


@pytest.mark.parametrize("steps,kept", [("250", STEPS_250), ("50", STEPS_50), ("25", STEPS_25),
                                        ("ddim50", list(range(0, 1000, 20)))])
def test_timestep_map(steps, kept):
    s = Schedule.from_steps(steps)
    assert s.timestep_map.tolist() == kept
    assert s.num_steps == len(kept)
    assert s.betas.dtype == np.float64


def test_base_schedule():
    s = Schedule.from_steps("1000")
    assert s.betas[0] == 1 - (1 - 1e-4)  # recomputed from the ratio ac[0] / 1.0, not the raw 1e-4
    np.testing.assert_allclose(s.betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-9)
    np.testing.assert_allclose(s.tables["alphas_cumprod"][-1], 4.0358e-5, rtol=1e-4)


@pytest.mark.parametrize("steps,kept", [("250", STEPS_250), ("50", STEPS_50), ("25", STEPS_25),
                                        ("ddim50", list(range(0, 1000, 20))), ("1000", list(range(1000)))])
def test_ddpm_coefs_are_f32_of_float64(steps, kept):
    coefs = Schedule.from_steps(steps).ddpm_coefs()
    assert coefs.dtype == np.float32 and coefs.shape == (len(kept), NUM_COEFS)
    ref = float64_tables(kept)
    for col, name in enumerate(["A", "B", "C1", "C2", "Lmin", "Lmax"]):
        # one rounding float64 -> float32, compared bitwise
        np.testing.assert_array_equal(coefs[:, col], ref[name].astype(np.float32), err_msg=name)
    assert coefs[0, 2] == 1.0 and coefs[0, 3] == 0.0  # coef1[0] == 1, coef2[0] == 0 exactly in f32
    assert coefs[0, 4] == coefs[1, 4]  # post_logvar_clipped[0] reuses index 1
    np.testing.assert_array_equal(coefs[:, 6], (np.arange(len(kept)) != 0).astype(np.float32))


def test_lmin_index0_reuses_index1():
    ref = float64_tables(STEPS_50)
    assert ref["Lmin"][0] == ref["Lmin"][1]
    coefs = Schedule.from_steps("50").ddpm_coefs()
    assert coefs[0, 4] == coefs[1, 4]


def test_coefs_differ_from_float32_recomputation():
    # Recomputing in float32 (as diffusers does) gives other bits for many steps: the point of f32(float64).
    coefs = Schedule.from_steps("250").ddpm_coefs()
    ac32 = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32), 0)[STEPS_250]
    a32 = torch.sqrt(1 / ac32).numpy()
    assert (a32 != coefs[:, 0]).any()


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("steps", ["ddim10", "50"])
def test_ddim_coefs_follow_reference_op_order(steps, eta):
    kept = space_timesteps(1000, steps)
    ref = float64_tables(kept)
    coefs = Schedule.from_steps(steps).ddim_coefs(eta)
    ab = torch.from_numpy(ref["ac"]).float()
    abp = torch.from_numpy(ref["acp"]).float()
    sigma = eta * torch.sqrt((1 - abp) / (1 - ab)) * torch.sqrt(1 - ab / abp)
    mask = (torch.arange(len(kept)) != 0).float()
    np.testing.assert_array_equal(coefs[:, 0], ref["A"].astype(np.float32))
    np.testing.assert_array_equal(coefs[:, 1], ref["B"].astype(np.float32))
    np.testing.assert_array_equal(coefs[:, 2], torch.sqrt(abp).numpy())
    np.testing.assert_array_equal(coefs[:, 3], torch.sqrt(1 - abp - sigma ** 2).numpy())
    np.testing.assert_array_equal(coefs[:, 4], (mask * sigma).numpy())
    assert coefs[0, 2] == 1.0 and coefs[0, 4] == 0.0  # abar_prev[0] = 1: the last step returns pred_x0
