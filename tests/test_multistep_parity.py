"""UniPC, DEIS and LMS agree with diffusers' schedulers step for step; iPNDM and UniP agree with the
solvers they reduce to.

Set-up: the exact Gaussian-mixture denoiser (velodiff.oracle) under Stable Diffusion's schedule
(scaled_linear 0.00085..0.012, 1000 steps, steps_offset 1, timestep_spacing "linspace" unless a case
names another). diffusers gets model_output = eps computed from the oracle's x0 at the velodiff time of
its timestep, t = sched.t_from_timestep(k); velodiff runs on the same times, plus the scheduler's end:
0 where its last sigma is 0, t_min where it is sigma_min. Every intermediate sample is compared.

Tolerances: diffusers keeps its sigma tables in float32, which limits agreement to about 1e-5 (its
third-order DEIS closed forms cancel the most); with its tables replaced by the float64 sigmas of the
same schedule the two agree to rounding (1e-10), which shows the equations are the same, not close.

Where diffusers (0.42) differs on purpose or by accident, and how the cases avoid it:

* UniPC's code lowers the order of the last steps at every step count (its docstring says only below
  15 steps, the rule of its DPM-Solver++ and DEIS); velodiff's default follows the documented rule so
  that it keeps its order on long grids ending at t_min, and ``lower_order_final="always"`` is
  diffusers' code (what the diffusers / ComfyUI / A1111 UniPC aliases set). The default agrees below
  15 steps, and at any count for order 2 with a final jump to 0; "always" at every count.
* UniPC with solver_type "bh1" and final_sigmas_type "zero" returns NaN: the final jump has
  B(h) = h = -inf times a zero residual. bh1 is compared on a grid ending at sigma_min.
* Before the final jump to 0 diffusers computes a UniC correction that the jump discards (it returns
  the x0 evaluated at the uncorrected sample); velodiff skips it. The outputs are the same.
* DEIS: diffusers' grid ends at sigma_min (no jump) and interpolates eps in log(sigma/alpha), the
  default of velodiff's ``deis`` (the paper's time-AB is ``interp="t"``).
* LMS: its "linspace" timesteps are fractional unless 999 / (steps - 1) is an integer, and between
  trained timesteps diffusers interpolates sigma linearly where velodiff's DiscreteVP interpolates
  log alpha; 10 and 28 steps give integer timesteps, so both see the same noise levels. Its sample
  lives in x / alpha (init_noise_sigma scaling) and it integrates down to sigma = 0 with the
  polynomial, as velodiff's ``lms`` does.
"""

import pytest
import torch
from diffusers import DEISMultistepScheduler, LMSDiscreteScheduler, UniPCMultistepScheduler

from velodiff import ContinuousVP, DiscreteVP, VelodiffError, make_grid, sample
from velodiff.denoisers import eps_from_x0
from velodiff.oracle import GaussianMixture, MixtureDenoiser, starting_noise

F64 = torch.float64
SCHED = DiscreteVP.scaled_linear()
MIX = GaussianMixture.random((2,), components=3, seed=1, min_var=0.05, max_var=0.3)
DEN = MixtureDenoiser(MIX, SCHED)
X = starting_noise((2,), 16, seed=3)
SD_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, timestep_spacing="linspace",
)


def _diffusers(scheduler, steps: int, float64: bool, ve: bool = False):
    """Run a diffusers scheduler on the oracle; returns velodiff's grid and the sample after each step."""
    scheduler.set_timesteps(steps)
    ts = SCHED.t_from_timestep(scheduler.timesteps.to(F64))
    end = 0.0 if float(scheduler.sigmas[-1]) == 0.0 else SCHED.t_min
    ts = torch.cat([ts, torch.tensor([end], dtype=F64)])
    if float64:
        scheduler.sigmas = torch.where(ts > 0, SCHED.sigma_ve(ts), torch.zeros_like(ts))
    alphas = SCHED.alpha(ts)
    x = X / alphas[0] if ve else X.clone()  # LMS steps x / alpha
    traj = []
    for i, k in enumerate(scheduler.timesteps):
        t = float(ts[i])
        x_in = scheduler.scale_model_input(x, k) if ve else x  # = x in velodiff's scaling
        eps = eps_from_x0(SCHED, x_in, t, DEN(x_in, t))
        x = scheduler.step(eps, k, x).prev_sample
        traj.append(x * alphas[i + 1] if ve else x)
    return ts, traj


def _velodiff(ts, solver: str, **options):
    traj = []
    res = sample(DEN, X, ts, solver, callback=lambda info: traj.append(info.x), **options)
    assert res.nfe == len(ts) - 1  # one model evaluation per step, corrector included
    return traj


def _worst(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(float((x - y).norm() / y.norm()) for x, y in zip(a, b, strict=True))


UNIPC_CASES = [
    # (diffusers config, steps, velodiff solver, velodiff options)
    ({}, 10, "unipc", {}),
    ({}, 25, "unipc", {}),
    ({"solver_order": 3}, 10, "unipc_3", {}),
    ({"solver_order": 1}, 10, "unipc", {"order": 1}),
    ({"solver_type": "bh1", "final_sigmas_type": "sigma_min"}, 10, "unipc_bh1", {}),
    ({"solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"}, 10, "unipc_3",
     {"solver_type": "bh1"}),
    ({"disable_corrector": [0, 1, 2]}, 20, "unipc", {"disable_corrector": [0, 1, 2]}),
    ({"disable_corrector": list(range(20))}, 20, "unipc", {"use_corrector": False}),
    ({"timestep_spacing": "leading"}, 20, "unipc", {}),
    ({"timestep_spacing": "trailing", "solver_order": 3}, 12, "unipc_3", {}),
    ({"solver_order": 3}, 15, "unipc_3", {"lower_order_final": "always"}),
    ({"solver_order": 3}, 20, "unipc_3", {"lower_order_final": "always"}),
    ({"solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}, 20, "unipc_3",
     {"solver_type": "bh1", "lower_order_final": "always"}),
]


@pytest.mark.parametrize("float64,rtol", [(False, 5e-5), (True, 1e-10)], ids=["f32-tables", "f64-tables"])
@pytest.mark.parametrize("config,steps,solver,options", UNIPC_CASES)
def test_unipc_matches_diffusers(config, steps, solver, options, float64, rtol):
    ts, ref = _diffusers(UniPCMultistepScheduler(**{**SD_CONFIG, **config}), steps, float64)
    assert _worst(_velodiff(ts, solver, **options), ref) < rtol


@pytest.mark.parametrize("float64,rtol", [(False, 5e-5), (True, 1e-10)], ids=["f32-tables", "f64-tables"])
@pytest.mark.parametrize("order,solver", [(2, "deis"), (3, "deis_3")])
@pytest.mark.parametrize("steps", [10, 25])
def test_deis_matches_diffusers(order, solver, steps, float64, rtol):
    ts, ref = _diffusers(DEISMultistepScheduler(**SD_CONFIG, solver_order=order), steps, float64)
    assert ts[-1] == SCHED.t_min
    assert _worst(_velodiff(ts, solver), ref) < rtol


@pytest.mark.parametrize("float64,rtol", [(False, 5e-5), (True, 1e-10)], ids=["f32-tables", "f64-tables"])
@pytest.mark.parametrize("steps", [10, 28])
def test_lms_matches_diffusers(steps, float64, rtol):
    ts, ref = _diffusers(LMSDiscreteScheduler(**SD_CONFIG), steps, float64, ve=True)
    assert _worst(_velodiff(ts, "lms"), ref) < rtol


def test_unip2_is_dpmpp_2m():
    """UniP-2 with B(h) = e^h - 1 and a_1 = 1/2 is DPM-Solver++(2M) term for term (Zhao et al. 2023)."""
    ts = make_grid("logsnr", SCHED, 12)
    a = sample(DEN, X, ts, "unipc", use_corrector=False).x
    b = sample(DEN, X, ts, "dpmpp_2m").x
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_ipndm_is_lms_on_a_grid_uniform_in_rho():
    """On equal steps in rho the variable-step LMS coefficients are iPNDM's fixed Adams-Bashforth ones."""
    sched = ContinuousVP()
    den = MixtureDenoiser(MIX, sched)
    rhos = torch.linspace(float(sched.sigma_ve(0.3)), float(sched.sigma_ve(0.05)), 9, dtype=F64)
    ts = sched.t_from_sigma_ve(rhos)
    a = sample(den, X, ts, "ipndm").x
    b = sample(den, X, ts, "lms").x
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _ipndm_v_by_hand(hs):
    """iPNDM_v's weights (solvers/ipndm.py's docstring) in exact arithmetic, term by term."""
    from fractions import Fraction as Fr

    hs = [Fr(h) for h in hs]
    h = hs[0]
    if len(hs) == 1:
        return [Fr(1)]
    h1 = hs[1]
    w = [1 + h / (2 * h1), -h / (2 * h1), Fr(0), Fr(0)]
    if len(hs) > 2:
        h2 = hs[2]
        a = h1 / h2
        w3 = (1 - h**2 / (3 * h1 * (h1 + h2))) / 2
        w = [w[0] + w3, w[1] - (1 + a) * w3, a * w3, Fr(0)]
    if len(hs) > 3:
        h3 = hs[3]
        b, q = h2 / h3, h1 * (h1 + h2) / (h2 * (h2 + h3))
        s1, s2 = h + h1, h + h1 + h2
        w4 = ((1 - h / (3 * s1)) / 2 + (1 - h / (2 * s1)) * h / (6 * s2)) * h * s1 * s2
        w4 /= h1 * (h1 + h2) * (h1 + h2 + h3)
        w = [w[0] + w4, w[1] - (1 + a + q) * w4, w[2] + (a + q * (1 + b)) * w4, -q * a * w4]
    return w[: len(hs)]


def test_ipndm_v_weights():
    """diff-solvers' / ComfyUI's iPNDM_v: AB2 on any spacing; on equal steps AB3 at order 3 and its own
    (57, -65, 43, -11) / 24 at order 4."""
    from velodiff.solvers.ipndm import AB_COEFFS, ipndm_v_weights

    assert ipndm_v_weights((-1.0, -1.0, -1.0)) == pytest.approx(AB_COEFFS[2], rel=1e-14)
    assert ipndm_v_weights((-1.0,) * 4) == pytest.approx([57 / 24, -65 / 24, 43 / 24, -11 / 24], rel=1e-14)
    gen = torch.Generator().manual_seed(0)
    for k in (1, 2, 3, 4):
        for _ in range(5):
            hs = tuple(-float(v) for v in torch.rand(k, generator=gen, dtype=F64) * 3 + 0.1)
            want = [float(w) for w in _ipndm_v_by_hand(hs)]
            assert ipndm_v_weights(hs) == pytest.approx(want, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("order", [2, 3, 4])
def test_ipndm_v_runs_its_weights(order):
    """The run, written here in k-diffusion's variables (x / alpha and sigma / alpha = rho) on a Karras
    grid, with the weights by hand: ComfyUI's ipndm_v sampler loop; order 2 is also lms's AB2."""
    ts = make_grid("karras", SCHED, 9)
    rho = SCHED.sigma_ve(ts[:-1]).tolist() + [0.0]
    alpha = SCHED.alpha(ts).tolist()
    z, hist = X / alpha[0], []
    for i in range(len(ts) - 1):
        x0 = DEN(z * alpha[i], float(ts[i]))
        hist.append((z - x0) / rho[i])
        if rho[i + 1] == 0.0:
            z = x0
            break
        k = min(order, len(hist))
        w = _ipndm_v_by_hand([rho[i + 1 - j] - rho[i - j] for j in range(k)])
        z = z + (rho[i + 1] - rho[i]) * sum(float(c) * e for c, e in zip(w, reversed(hist[-k:]), strict=True))
    res = sample(DEN, X, ts, "ipndm_v", order=order).x
    torch.testing.assert_close(res, z, rtol=1e-12, atol=1e-12)
    if order == 2:  # (on a grid ending at t_min: lms integrates its polynomial down to 0 on a final jump)
        ts = make_grid("karras", SCHED, 9, final="t_min")
        a, b = sample(DEN, X, ts, "ipndm_v", order=2).x, sample(DEN, X, ts, "lms", order=2).x
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "solver,options",
    [("unipc", {"solver_type": "bh3"}), ("deis", {"interp": "rho"}), ("ipndm", {"order": 5}),
     ("ipndm", {"variant": "w"}),
     ("unipc", {"lower_order_final": "sometimes"})],
)
def test_bad_options_are_one_clear_error(solver, options):
    with pytest.raises(VelodiffError):
        sample(DEN, X, make_grid("logsnr", SCHED, 5), solver, **options)


def test_lower_order_final_is_diffusers_rule_below_15_steps():
    """``lower_order_final=True`` (diffusers' DPM-Solver++ / DEIS rule) lowers the order near the end of
    grids shorter than 15 steps only; "always" at every length; False never; the final jump to 0 is
    first order whatever the option."""
    from types import SimpleNamespace

    from velodiff.solvers.base import lower_order_final

    def order(steps, i, lof, ends_at_zero=False):
        ctx = SimpleNamespace(steps=steps, options={"lower_order_final": lof}, exact=lambda j: True,
                              ends_at_zero=lambda j: ends_at_zero, a=lambda j: 1.0)
        return lower_order_final(ctx, i, 3)

    assert order(14, 13, True) == 1 and order(14, 12, True) == 2 and order(14, 11, True) == 3
    assert order(15, 13, True) == 3 and order(15, 14, True) == 3  # 15 steps: diffusers keeps the order
    assert order(15, 13, "always") == 2 and order(14, 12, False) == 3
    assert order(30, 5, False, ends_at_zero=True) == 1
