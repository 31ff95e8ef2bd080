"""Other tools' sampler and scheduler names (``velodiff.aliases``): the table is consistent, every place
that takes a name resolves it, and each alias reproduces its reference from the same noise and times.

References, per row of the table:

* diffusers' scheduler classes: the scheduler itself, run on the exact Gaussian-mixture oracle
  (``velodiff.oracle``) under Stable Diffusion's schedule, mapped by ``from_diffusers`` from the live
  scheduler object and from the typed ``Class:flag=value`` form. diffusers keeps its sigma tables in
  float32, so agreement is ~1e-6 on samples of size ~4 (tolerance 2e-5, as tests/test_parity_basic.py).
  diffusers' Karras / Lu grids round the model's timestep while stepping with the unrounded sigma; the
  oracle here is evaluated at the sigma (a continuous-time model), which is what velodiff does.
* k-diffusion / ComfyUI sampler names and A1111's labels: k-diffusion's sampler (``tests/kdiffusion.py``)
  on the alias's grid (Karras' where the name fixes none) in float64, to 1e-9.
* ComfyUI's and A1111's scheduler names: the grid's noise levels against the scheduler's definition
  written here a second time over diffusers' float64 beta table (k-diffusion's get_sigmas_* for
  Karras / exponential / polyexponential), and diffusers' published AYS schedules.

Not compared, and why: ComfyUI-only samplers without a k-diffusion or diffusers implementation
(``lcm``: checked against its definition; ``ipndm``, ``ipndm_v``, ``uni_pc``: the solvers' own parity
tests cover the steps, tests/test_multistep_parity.py, ipndm_v against diff-solvers' iPNDM_v weights;
``deis`` is marked approximate: ComfyUI's is diff-solvers' t-AB, not diffusers' DEIS); diffusers'
DPMSolverSDEScheduler, whose Brownian tree cannot be given a noise source (its steps are k-diffusion's
sample_dpmpp_sde, compared with injected noise); LCMScheduler (its boundary condition belongs to an LCM
network's denoiser).
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import AysSchedules

from kdiffusion import load_k_sampling
from velodiff import GRIDS, SOLVERS, DiscreteVP, RectifiedFlow, VelodiffError, get_solver, make_grid, sample
from velodiff.aliases import (
    ALIASES,
    DISCARD,
    SAMPLER,
    SCHEDULER,
    find,
    from_diffusers,
    normalize,
    resolve_solver,
)
from velodiff.denoisers import eps_from_x0
from velodiff.oracle import GaussianMixture, MixtureDenoiser, starting_noise
from velodiff.plan import Plan
from velodiff.schedules import F64

K = load_k_sampling()
needs_k = pytest.mark.skipif(K is None, reason="k-diffusion is not installed")

SCHED = DiscreteVP.scaled_linear()
SHAPE = (2, 6)
MIX = GaussianMixture.random(SHAPE, components=3, seed=1)
DEN = MixtureDenoiser(MIX, SCHED)
X = starting_noise(SHAPE, 4, seed=3)
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
#: diffusers' scaled_linear table in float64, written independently of velodiff's DiscreteVP
BETAS = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
SIGMAS = np.sqrt((1 - np.cumprod(1 - BETAS)) / np.cumprod(1 - BETAS))  # sigma / alpha at k = 0..999
TOL_DIFFUSERS, TOL_K = 2e-5, 1e-9
FLOW = RectifiedFlow(shift=3.0)
FLOW_GRIDS = ("linear_quadratic",)  # defined for rectified flows only


def _target_exists(a) -> bool:
    return (a.solver is None or a.solver in SOLVERS) and (a.grid is None or a.grid in GRIDS)


# --- the table ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("alias", ALIASES, ids=lambda a: f"{a.kind}:{a.name}")
def test_every_alias_resolves_to_a_valid_target(alias):
    if alias.grid == "calibrated":
        pytest.skip("the model's calibrated grid: test_gits_maps_to_the_calibrated_grid")
    assert _target_exists(alias), alias
    assert alias.kind in (SAMPLER, SCHEDULER) and alias.final in (None, "zero", "t_min")
    if alias.kind == SAMPLER:
        spec = get_solver(alias.name)
        own = alias.name in SOLVERS  # velodiff's own name wins (the row documents the difference)
        assert spec.name == (alias.name if own else alias.solver)
        assert set(alias.solver_options) <= set(SOLVERS[alias.solver].defaults)
        if not own and alias.name not in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
            assert {k: spec.defaults[k] for k in alias.solver_options} == dict(alias.solver_options)
    else:
        sched = FLOW if alias.grid in FLOW_GRIDS else SCHED
        ts = make_grid(alias.name, sched, 10)
        assert torch.equal(ts, make_grid(alias.grid, sched, 10, **alias.grid_options))
    if alias.grid is not None and alias.grid not in FLOW_GRIDS:
        make_grid(alias.grid, SCHED, 10, final=alias.final or "zero", **alias.grid_options)


def test_names_are_matched_normalized_and_exact_spelling_first():
    assert normalize("DPM++ 2M SDE Karras") == "dpmpp_2m_sde_karras"
    assert find("dpmpp_2m_karras", SAMPLER).name == "DPM++ 2M Karras"
    assert find("euler A", SAMPLER).name == "Euler a"
    # ComfyUI's sampler "ddim" (no grid) and A1111's "DDIM" (its timesteps, ending at alphas_cumprod[0])
    assert find("DDIM", SAMPLER).grid == "ddim_uniform" and find("Ddim", SAMPLER).grid is None
    assert find("DDIM", SCHEDULER).grid == "ddim_uniform"  # A1111's schedule type
    # in a plan string, where + joins items, a label is written normalized
    plan = Plan.parse("solver=dpmpp_2m_sde_karras+grid=align_your_steps+steps=8")
    assert plan.settings["solver"] == "dpmpp_2m_sde_karras"
    assert get_solver(plan.settings["solver"]).name == "sde_dpmpp_2m"
    assert torch.equal(make_grid("align_your_steps", SCHED, 8), make_grid("ays", SCHED, 8))


def test_own_names_match_case_insensitively_and_win():
    """velodiff's own names are matched normalized too, before other tools' rows (README): DPMPP_2M is
    velodiff's dpmpp_2m (lower_order_final on), while A1111's exact "DPM++ 2M" stays A1111's."""
    assert get_solver("DPMPP_2M").defaults == get_solver("dpmpp_2m").defaults
    assert get_solver("DPMPP_2M").defaults["lower_order_final"] is True
    assert get_solver("DPM++ 2M").defaults["lower_order_final"] is False
    assert resolve_solver("UNIPC").alias is None and resolve_solver("UniPC").alias.source == "A1111"
    for name, own in (("AYS", "ays"), ("LOGSNR", "logsnr"), ("Trailing", "trailing"), ("KARRAS", "karras")):
        assert torch.equal(make_grid(name, SCHED, 8), make_grid(own, SCHED, 8))
    from velodiff.commands.names import check_grid_name, check_solver_name

    check_grid_name("AYS")
    check_solver_name("Euler_Ancestral")


def test_unknown_names_list_near_matches():
    with pytest.raises(VelodiffError) as e:
        get_solver("dpmpp_2m_sdee")
    msg = str(e.value)
    assert "unknown solver 'dpmpp_2m_sdee'" in msg and "did you mean 'dpmpp_2m_sde'" in msg
    assert "velodiff solvers --aliases" in msg and "\n" not in msg
    with pytest.raises(VelodiffError, match="did you mean 'DPM\\+\\+ 2M Karras'"):
        get_solver("DPM++ 2M Karas")
    with pytest.raises(VelodiffError, match="unknown grid 'sgm_unifrom'.*did you mean 'sgm_uniform'"):
        make_grid("sgm_unifrom", SCHED, 10)
    with pytest.raises(VelodiffError, match="flag 'use_karas_sigmas'; did you mean 'use_karras_sigmas'"):
        get_solver("DPMSolverMultistepScheduler:use_karas_sigmas=true")
    with pytest.raises(VelodiffError, match="flag 'foo' has no velodiff equivalent yet"):
        get_solver("DPMSolverMultistepScheduler:foo=1")
    with pytest.raises(VelodiffError, match="no diffusers scheduler class; did you mean 'DPMSolverMultistep"):
        get_solver("DPMSolverMultistepSchedular:use_karras_sigmas=true")
    lower = resolve_solver("dpmsolvermultistepscheduler:use_karras_sigmas=true")  # as the bare name resolves
    assert lower == resolve_solver("DPMSolverMultistepScheduler:use_karras_sigmas=true")
    with pytest.raises(VelodiffError, match="algorithm_type='dpmsolver', solver_order=2.*no velodiff solver"):
        get_solver("DPMSolverMultistepScheduler:algorithm_type=dpmsolver,solver_order=2")
    with pytest.raises(VelodiffError, match="solver 'euler' has no option 'bogus'"):  # its own name: options
        get_solver("euler:bogus=1")


def test_cli_check_and_table(capsys):
    from velodiff.commands.names import check_solver_name
    from velodiff.commands.solvers import solvers

    check_solver_name("DPM++ 2M SDE Karras")
    with pytest.raises(VelodiffError, match="did you mean"):
        check_solver_name("dpmpp_3m_sd")
    solvers(aliases=True)
    out = capsys.readouterr().out
    assert "DPM++ 2M Karras" in out and "align_your_steps" in out and "DPMSolverMultistepScheduler" in out


def test_gits_maps_to_the_calibrated_grid():
    """ComfyUI's gits is the model's own GITS grid: velodiff's calibrated grid (a GITS dynamic program on
    the model's trajectory, then refined), which needs the model: make_grid says so in one line."""
    alias = find("gits", SCHEDULER)
    assert alias.grid == "calibrated"
    for name in ("gits", "calibrated"):
        with pytest.raises(VelodiffError, match="fitted to a model"):
            make_grid(name, SCHED, 10)


def test_pipeline_setup_takes_the_alias_grid():
    """A label that fixes a grid ("DPM++ 2M Karras") gives the run that grid unless the call names one;
    the solver gets the alias's options."""
    from types import SimpleNamespace

    from velodiff.pipelines.setup import Sampling, make_setup

    model = SimpleNamespace(
        schedule=SCHED, default_solver="dpmpp_2m", default_guidance=1.0, default_final="zero",
        default_steps=10, default_grid="trailing", default_grid_options={}, default_size=(64, 64),
        sized_grid_options=lambda height, width: {},
    )  # fmt: skip
    s = make_setup(model, Sampling(solver="DPM++ 2M Karras", steps=8))
    assert s.solver.name == "dpmpp_2m" and s.solver.defaults["lower_order_final"] is False
    assert torch.equal(s.ts, make_grid("karras", SCHED, 8))
    s = make_setup(model, Sampling(solver="DPM++ 2M Karras", steps=8, grid="exponential"))
    assert torch.equal(s.ts, make_grid("exponential", SCHED, 8))
    s = make_setup(model, Sampling(solver="DDIM", steps=10))  # A1111's: ddim_uniform to alphas_cumprod[0]
    assert torch.equal(s.ts, make_grid("ddim_uniform", SCHED, 10, final="t_min"))
    s = make_setup(model, Sampling(plan="solver=dpmpp_2m_sde_karras+steps=6"))
    assert s.solver.name == "sde_dpmpp_2m" and torch.equal(s.ts, make_grid("karras", SCHED, 6))
    s = make_setup(model, Sampling(solver="euler_ancestral", steps=6))
    assert torch.equal(s.ts, make_grid("trailing", SCHED, 6))  # no alias grid: the model's
    # A1111 1.9+: a bare label runs its sampler's default schedule type, as does "Automatic"; the DPM2 and
    # DPM++ 3M SDE samplers drop the penultimate level on any schedule type
    for solver, grid, opts in (("DPM++ 2M", "karras", {}), ("DPM++ 2M SDE", "exponential", {}),
                               ("Euler a", "normal", {}), ("DPM++ 3M SDE", "exponential", DISCARD)):
        for named in (None, "Automatic"):
            s = make_setup(model, Sampling(solver=solver, steps=8, grid=named))
            assert torch.equal(s.ts, make_grid(grid, SCHED, 8, **opts)), (solver, named)
    s = make_setup(model, Sampling(solver="DPM++ 3M SDE", steps=8, grid="Karras"))
    assert torch.equal(s.ts, make_grid("karras", SCHED, 8, discard_penultimate=True))
    s = make_setup(model, Sampling(solver="euler", steps=6, grid="Automatic"))
    assert torch.equal(s.ts, make_grid("trailing", SCHED, 6))  # velodiff's solver: the model's grid
    s = make_setup(model, Sampling(solver="DPM fast", nfe=10))  # the budget plans dpm_fast's orders
    assert s.steps == 4 and s.solver.defaults["nfe"] == 10
    assert torch.equal(s.ts, make_grid("logsnr", SCHED, 4, final="t_min"))
    assert sample(DEN, X, s.ts, s.solver).nfe == 10
    sdxl = SimpleNamespace(**{**vars(model), "family": "sdxl", "grid_defaults": {"ays": {"model": "sdxl"}}})
    s = make_setup(sdxl, Sampling(grid="align_your_steps", steps=10))
    assert SCHED.timestep(s.ts[:-1]).round().tolist() == AysSchedules["StableDiffusionXLTimesteps"]


# --- k-diffusion / ComfyUI sampler names and A1111 labels --------------------------------------------

#: k-diffusion's function for each velodiff solver an alias names (options as the alias sets them)
K_FUNCTIONS = {
    "euler": "sample_euler", "euler_ancestral": "sample_euler_ancestral", "heun": "sample_heun",
    "dpm_2": "sample_dpm_2", "dpm_2_ancestral": "sample_dpm_2_ancestral", "lms": "sample_lms",
    "dpmpp_2s_ancestral": "sample_dpmpp_2s_ancestral", "dpmpp_sde": "sample_dpmpp_sde",
    "dpmpp_2m": "sample_dpmpp_2m", "sde_dpmpp_2m": "sample_dpmpp_2m_sde",
    "sde_dpmpp_3m": "sample_dpmpp_3m_sde",
    "ddim": "sample_euler", "dpm_fast": "sample_dpm_fast", "dpm_adaptive": "sample_dpm_adaptive",
}  # fmt: skip
K_ALIASES = [
    a for a in ALIASES
    if a.kind == SAMPLER and a.source in ("k-diffusion / ComfyUI", "ComfyUI", "A1111")
    and a.solver in K_FUNCTIONS
    and a.grid not in ("ddim_uniform", "uniform")  # A1111's DDIM / UniPC: compared with diffusers below
]  # fmt: skip


class Replay:
    """One noise sequence for both sides: the k-th draw of either is z[k]."""

    def __init__(self, n: int = 40, seed: int = 7) -> None:
        self.z = starting_noise(SHAPE, 4 * n, seed=seed).reshape(n, 4, *SHAPE)
        self.k = 0

    def _next(self) -> torch.Tensor:
        self.k += 1
        return self.z[self.k - 1]

    def sampler(self, *_: object) -> torch.Tensor:
        return self._next()

    def __call__(self, i: int) -> torch.Tensor:
        return self._next()

    def between(self, t_from: float, t_to: float) -> torch.Tensor:
        return self._next()


def _k_model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    t = SCHED.t_from_sigma_ve(sigma.reshape(-1)[0].to(F64))
    return DEN(float(SCHED.alpha(t)) * x, t)


def _a1111_normal(n: int) -> torch.Tensor:
    """A1111's default discretization, k-diffusion's DiscreteSchedule.get_sigmas(n): n timesteps equally
    spaced from 999 to 0, log sigma interpolated linearly between trained ones, then 0 (by hand)."""
    k = np.linspace(999, 0, n)
    lo = np.floor(k).astype(int)
    hi = np.ceil(k).astype(int)
    w = k - lo
    sig = np.exp((1 - w) * np.log(SIGMAS[lo]) + w * np.log(SIGMAS[hi]))
    return torch.from_numpy(np.r_[sig, 0.0])


def _a1111_sigmas(grid: str | None, steps: int, discard: bool) -> torch.Tensor:
    """A1111's get_sigmas: with discard_next_to_last_sigma (its DPM2 samplers) steps + 1 sigmas, the one
    before 0 dropped."""
    sig = (_a1111_normal if grid == "normal" else lambda n: _k_sigmas(grid, n))(steps + discard)
    return torch.cat([sig[:-2], sig[-1:]]) if discard else sig


def _k_sigmas(grid: str | None, n: int) -> torch.Tensor:
    lo, hi = float(SIGMAS[0]), float(SIGMAS[-1])
    torch.set_default_dtype(F64)  # k-diffusion's get_sigmas_* ramp with the default dtype
    try:
        if grid in (None, "karras"):
            return K.get_sigmas_karras(n, lo, hi)
        if grid == "exponential":
            return K.get_sigmas_exponential(n, lo, hi)
        raise AssertionError(grid)
    finally:
        torch.set_default_dtype(torch.float32)


@needs_k
@pytest.mark.parametrize("alias", K_ALIASES, ids=lambda a: a.name)
def test_sampler_alias_matches_k_diffusion(alias):
    fn = getattr(K, K_FUNCTIONS[alias.solver])
    x_top = X * 1.0  # VP: unit marginal std at t_max
    if alias.solver in ("dpm_fast", "dpm_adaptive"):
        nfe = 8
        steps = nfe // 3 + 1 if alias.solver == "dpm_fast" else 1
        ts = make_grid(alias.grid, SCHED, steps, final=alias.final)
        sig = SCHED.sigma_ve(ts)
        kw = {"n": nfe} if alias.solver == "dpm_fast" else {}
        torch.set_default_dtype(F64)
        try:
            ref = fn(_k_model, x_top / float(SCHED.alpha(ts[0])), sig[-1], sig[0], disable=True, **kw)
        finally:
            torch.set_default_dtype(torch.float32)
        opts = {"nfe": nfe} if alias.solver == "dpm_fast" else {}
        res = sample(DEN, x_top, ts, alias.name, **opts)
        err = float((ref - res.x / float(SCHED.alpha(ts[-1]))).abs().max())
        assert err < 1e-8, err
        return
    steps = 8
    sigmas = _a1111_sigmas(alias.grid, steps, bool(alias.grid_options.get("discard_penultimate")))
    if alias.grid is None:
        ts = torch.cat([SCHED.t_from_sigma_ve(sigmas[:-1]), torch.zeros(1, dtype=F64)])
    else:  # the alias's own grid is k-diffusion's (A1111's)
        ts = make_grid(alias.grid, SCHED, steps, **alias.grid_options)
        assert torch.allclose(SCHED.sigma_ve(ts[:-1]), sigmas[:-1], rtol=1e-12, atol=0)
    a0 = float(SCHED.alpha(ts[0]))
    a, b = Replay(), Replay()
    kw = {"noise_sampler": a.sampler} if "noise_sampler" in inspect.signature(fn).parameters else {}
    if "solver_type" in alias.solver_options:  # k-diffusion's dpmpp_2m_sde(solver_type=...)
        kw["solver_type"] = alias.solver_options["solver_type"]
    ref = fn(_k_model, x_top / a0, sigmas, disable=True, **kw)
    res = sample(DEN, x_top, ts, alias.name, noise=b)
    err = float((ref - res.x).abs().max())
    assert err < TOL_K * float(ref.abs().max()), f"{alias.name}: max |k-diffusion - velodiff| = {err:.3g}"
    assert a.k == b.k


@pytest.mark.parametrize("name", ["DPM2", "DPM2 a", "DPM2 Karras", "DPM2 a Karras"])
@pytest.mark.parametrize("steps", [2, 8, 20])
def test_a1111_dpm2_labels_discard_the_penultimate_sigma(name, steps):
    """A1111's DPM2 samplers build steps + 1 sigmas and drop the one before 0 (discard_next_to_last_sigma):
    the alias's grid is that list (written here from A1111's rule over diffusers' beta table)."""
    alias = find(name, SAMPLER)
    ts = make_grid(alias.grid, SCHED, steps, final=alias.final or "zero", **alias.grid_options)
    want = _a1111_sigmas(alias.grid, steps, discard=True)
    assert len(ts) == steps + 1 and float(ts[-1]) == 0.0
    assert torch.allclose(SCHED.sigma_ve(ts[:-1]), want[:-1], rtol=1e-9, atol=0)
    res = sample(DEN, X, ts, name, noise=Replay())
    assert res.nfe == get_solver(name).nfe(steps)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_ipndm_is_lms_only_on_grids_uniform_in_rho(order):
    """iPNDM's fixed Adams-Bashforth weights are the variable-step ones (lms) where the steps in
    rho = sigma / alpha are equal, and differ elsewhere from order 2 on (its docstring)."""
    rho = torch.linspace(float(SCHED.sigma_ve(1.0)), float(SCHED.sigma_ve(SCHED.t_min)), 9, dtype=F64)
    ts = SCHED.t_from_sigma_ve(rho)
    ts[0], ts[-1] = 1.0, SCHED.t_min
    a, b = sample(DEN, X, ts, "ipndm", order=order).x, sample(DEN, X, ts, "lms", order=order).x
    assert torch.allclose(a, b, rtol=0, atol=1e-9)
    ts = make_grid("karras", SCHED, 8, final="t_min")
    a, b = sample(DEN, X, ts, "ipndm", order=order).x, sample(DEN, X, ts, "lms", order=order).x
    assert torch.allclose(a, b, rtol=0, atol=1e-9) == (order == 1)


@pytest.mark.parametrize("steps", [3, 6, 10])
def test_comfyui_deis_is_the_tab_deis_of_its_definition(steps):
    """ComfyUI's deis (diff-solvers' 'tab' DEIS, Zhang & Chen's tAB): eps as a Lagrange polynomial in the
    time tau of a VP-SDE fitted to sigma 0.002-80, integrated against d sigma; written here from that
    definition with scipy's adaptive quadrature in tau (velodiff integrates in log-SNR)."""
    from scipy.integrate import quad

    row = find("deis", SAMPLER)
    eps_s, lo, hi = 1e-3, 0.002, 80.0
    beta_d = 2 * (math.log1p(lo**2) / eps_s - math.log1p(hi**2)) / (eps_s - 1)
    beta_min = math.log1p(hi**2) - 0.5 * beta_d

    def tau(sig: float) -> float:
        return (math.sqrt(beta_min**2 + 2 * beta_d * math.log1p(sig**2)) - beta_min) / beta_d

    def dsigma(t: float) -> float:  # sigma(tau) = sqrt(exp(beta_min tau + beta_d tau^2 / 2) - 1)
        e = math.exp(beta_min * t + 0.5 * beta_d * t * t)
        return (beta_min + beta_d * t) * e / (2 * math.sqrt(e - 1))

    ts = make_grid("karras", SCHED, steps)
    sig = [float(v) for v in SCHED.sigma_ve(ts[:-1])] + [0.0]
    x, ds = X / float(SCHED.alpha(ts[0])), []  # the VE state x / alpha
    for i in range(steps):
        t_i = SCHED.t_from_sigma_ve(torch.tensor(sig[i], dtype=F64))
        d = (x - DEN(x * SCHED.alpha(t_i), t_i)) / sig[i]
        ds.append(d)
        order = 1 if sig[i + 1] == 0 else min(3, i + 1)
        if order == 1:
            x = x + (sig[i + 1] - sig[i]) * d
            continue
        nodes = [tau(sig[i - j]) for j in range(order)]

        def basis(t: float, j: int, nodes=nodes) -> float:
            return math.prod((t - nodes[m]) / (nodes[j] - nodes[m]) for m in range(len(nodes)) if m != j)

        c = [quad(lambda t, j=j: dsigma(t) * basis(t, j), tau(sig[i]), tau(sig[i + 1]), epsabs=0,
                  epsrel=1e-13)[0] for j in range(order)]
        x = x + sum(cj * ds[-1 - j] for j, cj in enumerate(c))
    res = sample(DEN, X, ts, row.solver, **row.solver_options)
    assert torch.allclose(res.x, x, rtol=0, atol=1e-9 * float(x.abs().max())), float((res.x - x).abs().max())


def test_lcm_is_its_definition():
    ts = make_grid("leading", SCHED, 4, steps_offset=1)
    z = Replay()
    res = sample(DEN, X, ts, "lcm", noise=z, boundary=False)  # k-diffusion's sample_lcm, as ComfyUI's
    x = X.clone()
    for i in range(4):
        x0 = DEN(x, ts[i])
        x = x0 if i == 3 else SCHED.alpha(ts[i + 1]) * x0 + SCHED.sigma(ts[i + 1]) * z.z[i]
    assert torch.allclose(res.x, x, rtol=0, atol=1e-12) and res.nfe == 4


# --- ComfyUI's and A1111's scheduler names -------------------------------------------------------------


def _levels_of(ks: np.ndarray) -> np.ndarray:
    """sigma / alpha at (fractional) timesteps: log sigma interpolated linearly between trained ones."""
    lo = np.clip(np.floor(ks).astype(int), 0, 998)
    w = ks - lo
    return np.exp((1 - w) * np.log(SIGMAS[lo]) + w * np.log(SIGMAS[np.minimum(lo + 1, 999)]))


def _definition(name: str, n: int) -> np.ndarray:
    """The scheduler's noise levels before the final 0, from its definition."""
    if name == "normal":
        return _levels_of(np.linspace(999, 0, n))
    if name == "sgm_uniform":
        return _levels_of(np.linspace(999, 0, n + 1)[:-1])
    if name == "simple":
        return np.array([SIGMAS[-(1 + int(i * 1000 / n))] for i in range(n)])
    if name == "ddim_uniform":
        return SIGMAS[np.arange(1, 1000, max(1000 // n, 1))][::-1]
    if name == "beta":
        from scipy.stats import beta

        ks = np.rint(beta.ppf(1 - np.arange(n) / n, 0.6, 0.6) * 999).astype(int)
        return SIGMAS[ks[np.r_[True, ks[1:] != ks[:-1]]]]
    if name == "kl_optimal":
        u = np.arange(n) / max(n - 1, 1)
        return np.tan(u * math.atan(SIGMAS[0]) + (1 - u) * math.atan(SIGMAS[-1]))
    if name == "ays":  # the AYS authors' loglinear_interp of the 10-step list ending at sigma_min
        levels = np.r_[SIGMAS[AysSchedules["StableDiffusionTimesteps"]], SIGMAS[0]]
        xs, new = np.linspace(0, 1, len(levels)), np.linspace(0, 1, n + 1)
        return np.exp(np.interp(new, xs, np.log(levels[::-1])))[::-1][:-1]
    raise AssertionError(name)


SCHEDULER_ALIASES = [
    a for a in ALIASES if a.kind == SCHEDULER and a.grid in GRIDS and a.grid not in FLOW_GRIDS
]


@pytest.mark.parametrize("steps", [1, 2, 5, 10, 50])
def test_linear_quadratic_is_movie_gens_schedule(steps):
    """Movie Gen's linear-quadratic t-schedule: equal steps of threshold_noise / L for the first L = N // 2,
    then a quadratic with the same value and slope at L that ends at t = 0; checked against the
    schedule's closed form and its defining properties."""
    ts = make_grid("linear_quadratic", FLOW, steps)
    assert len(ts) == steps + 1 and float(ts[0]) == 1.0 and float(ts[-1]) == 0.0
    u = 1.0 - ts.numpy()
    if steps == 1:
        return
    n, lin, th = steps, steps // 2, 0.025
    assert np.allclose(u[:lin], th * np.arange(lin) / lin, rtol=0, atol=1e-15)
    q = np.polyfit(np.arange(lin, n + 1), u[lin:], 2) if n - lin >= 2 else None
    if q is not None:  # the quadratic part: value theta and slope theta / L at L, 1 at N
        assert np.polyval(q, lin) == pytest.approx(th, abs=1e-12)
        assert np.polyval(np.polyder(q), lin) == pytest.approx(th / lin, abs=1e-9)
        assert np.polyval(q, n) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(VelodiffError, match="rectified flows"):
        make_grid("linear_quadratic", SCHED, steps)


@pytest.mark.parametrize("steps", [1, 4, 7, 10, 25])
@pytest.mark.parametrize("alias", SCHEDULER_ALIASES, ids=lambda a: f"{a.source}:{a.name}")
def test_scheduler_alias_matches_its_definition(alias, steps):
    ts = make_grid(alias.name, SCHED, steps)
    assert float(ts[-1]) == 0.0
    got = SCHED.sigma_ve(ts[:-1]).numpy()
    if alias.grid in ("karras", "exponential", "polyexponential"):
        if K is None:
            pytest.skip("k-diffusion is not installed")
        torch.set_default_dtype(F64)
        try:
            fn = getattr(K, f"get_sigmas_{alias.grid}")
            want = fn(steps, float(SIGMAS[0]), float(SIGMAS[-1]))[:-1].numpy()
        finally:
            torch.set_default_dtype(torch.float32)
    else:
        want = _definition(alias.grid, steps)
    assert got.shape == want.shape, (got, want)
    assert np.allclose(got, want, rtol=1e-9, atol=0), (got, want)


def test_ays_is_diffusers_published_schedule():
    ts = make_grid("align_your_steps", SCHED, 10)
    assert SCHED.timestep(ts[:-1]).round().tolist() == AysSchedules["StableDiffusionTimesteps"]
    published = np.array(AysSchedules["StableDiffusionSigmas"][:-1])  # rounded to 3 decimals there
    assert np.allclose(SCHED.sigma_ve(ts[:-1]).numpy(), published, rtol=0, atol=5e-3)
    sdxl = make_grid("ays", SCHED, 10, model="sdxl")
    assert SCHED.timestep(sdxl[:-1]).round().tolist() == AysSchedules["StableDiffusionXLTimesteps"]
    with pytest.raises(VelodiffError, match="unknown ays model 'sd3'"):
        make_grid("ays", SCHED, 10, model="sd3")
    from velodiff.schedules import EDM

    svd = make_grid("ays", EDM(t_max=700.0), 10)  # SVD's published noise levels (EDM: t = sigma)
    published = torch.tensor(AysSchedules["StableDiffusionVideoSigmas"][:-1], dtype=svd.dtype)
    assert torch.allclose(svd[:-1], published)
    with pytest.raises(VelodiffError, match="spans noise levels .* outside this schedule's"):
        make_grid("ays", EDM(), 10)  # sigma_max 80: the list cannot be placed on it


def test_karras_and_exponential_take_explicit_sigma_bounds():
    ts = make_grid("karras", SCHED, 6, sigma_min=0.1, sigma_max=10.0)
    sig = SCHED.sigma_ve(ts[:-1])
    assert float(sig[0]) == pytest.approx(10.0, rel=1e-12) and float(sig[-1]) == pytest.approx(0.1, rel=1e-12)
    ts = make_grid("exponential", SCHED, 6, sigma_min=0.5, final="t_min")
    assert float(SCHED.sigma_ve(ts[-1])) == pytest.approx(0.5, rel=1e-12)
    with pytest.raises(VelodiffError, match="sigma_max=100"):
        make_grid("karras", SCHED, 6, sigma_max=100.0)



def test_a_name_carries_its_options_as_a_plan_item_does():
    """'karras:sigma_min=0.1,sigma_max=10' is karras with those options, 'unipc:order=1' unipc with that
    option as its default, another tool's name keeps its own options under the given ones; an option the
    grid or solver lacks, or a value it refuses, is one line."""
    from velodiff.aliases import resolve_solver
    from velodiff.solvers import get_solver

    want = make_grid("karras", SCHED, 6, sigma_min=0.1, sigma_max=10.0, rho=3)
    assert torch.equal(make_grid("karras:sigma_min=0.1,sigma_max=10,rho=3", SCHED, 6), want)
    assert torch.equal(make_grid("Karras:sigma_min=0.1, sigma_max=10.0,rho=3", SCHED, 6), want)
    assert get_solver("unipc:order=1,use_corrector=false").defaults["order"] == 1
    assert get_solver("unipc:order=1,use_corrector=false").defaults["use_corrector"] is False
    assert get_solver("unipc").defaults["order"] != 1  # the registry's own is untouched
    r = resolve_solver("dpmpp_2m_sde:eta=0.5")  # ComfyUI's name: its solver, its noise option overridden
    assert r.solver == "sde_dpmpp_2m" and r.solver_options["eta"] == 0.5
    assert resolve_solver("DPM++ 2M Karras:lower_order_final=false").grid == "karras"
    for bad, match in (("karras:bogus=1", "grid 'karras' has no option 'bogus'"),
                       ("karras:rho=x", "rho must be a number above 0, got 'x'")):
        with pytest.raises(VelodiffError, match=match):
            make_grid(bad, SCHED, 6)
    with pytest.raises(VelodiffError, match="solver 'unipc' has no option 'bogus'"):
        get_solver("unipc:bogus=2")
    with pytest.raises(VelodiffError, match="unknown solver 'nosuch'"):
        get_solver("nosuch:order=1")


# --- diffusers' scheduler classes ----------------------------------------------------------------------

VE_CLASSES = (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler,
              KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler, LMSDiscreteScheduler)  # fmt: skip


def _run_diffusers(sched, steps: int, x_vp: torch.Tensor, seed: int | None = None) -> torch.Tensor:
    """diffusers' loop on the oracle. The Euler family carries x / alpha and hands the network
    scale_model_input(x) = alpha x: the call's sigma is read back from that scale, so every stage
    (Heun's, KDPM2's interpolated one) is evaluated where diffusers means it."""
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    ve = isinstance(sched, VE_CLASSES)
    x = x_vp * float((sched.sigmas[0].double() ** 2 + 1) ** 0.5) if ve else x_vp.clone()
    for i, k in enumerate(sched.timesteps):
        if ve:
            x_in = sched.scale_model_input(x, k)
            sigma = ((x.norm() / x_in.norm()) ** 2 - 1).sqrt()
            t = SCHED.t_from_sigma_ve(sigma.double())
        else:
            x_in = x
            has_sigmas = getattr(sched, "sigmas", None) is not None
            t = (
                SCHED.t_from_sigma_ve(sched.sigmas[i].double())
                if has_sigmas
                else SCHED.t_from_timestep(float(k))
            )
        eps = eps_from_x0(SCHED, x_in, t, DEN(x_in, t))
        kw = {"generator": gen} if gen is not None else {}
        x = sched.step(eps, k, x, **kw).prev_sample
    return x / float((sched.sigmas[-1].double() ** 2 + 1) ** 0.5) if ve else x  # x / alpha -> x


def _velodiff_of(sched, steps: int, x_vp: torch.Tensor, noise=None, typed: str | None = None):
    r = from_diffusers(sched)
    if typed is not None:  # the same mapping from the typed form
        t = resolve_solver(typed)
        assert (t.solver, t.grid, dict(t.grid_options), t.final) == (
            r.solver,
            r.grid,
            dict(r.grid_options),
            r.final,
        )
        assert dict(t.solver_options).items() <= {**SOLVERS[r.solver].defaults, **r.solver_options}.items()
    ts = make_grid(r.grid, SCHED, steps, final=r.final or "zero", **r.grid_options)
    return sample(DEN, x_vp, ts, r.solver, noise=noise, **r.solver_options), ts


CASES = [
    (DPMSolverMultistepScheduler, {}),
    (DPMSolverMultistepScheduler, {"timestep_spacing": "leading", "steps_offset": 1}),
    (DPMSolverMultistepScheduler, {"timestep_spacing": "trailing"}),
    (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    (DPMSolverMultistepScheduler, {"use_lu_lambdas": True}),
    (DPMSolverMultistepScheduler, {"use_exponential_sigmas": True}),
    (DPMSolverMultistepScheduler, {"solver_order": 3}),
    (DPMSolverMultistepScheduler, {"solver_order": 3, "use_karras_sigmas": True}),
    (DPMSolverMultistepScheduler, {"lower_order_final": False, "timestep_spacing": "trailing"}),
    (DPMSolverMultistepScheduler, {"final_sigmas_type": "sigma_min"}),
    (DPMSolverMultistepScheduler, {"solver_type": "heun", "use_karras_sigmas": True}),
    (EulerDiscreteScheduler, {}),
    (EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    (EulerDiscreteScheduler, {"timestep_spacing": "leading", "steps_offset": 1}),
    (HeunDiscreteScheduler, {}),
    (HeunDiscreteScheduler, {"use_karras_sigmas": True}),
    (KDPM2DiscreteScheduler, {}),
    (KDPM2DiscreteScheduler, {"use_karras_sigmas": True}),
    (LMSDiscreteScheduler, {"use_karras_sigmas": True}),
    (UniPCMultistepScheduler, {}),
    (UniPCMultistepScheduler, {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    (UniPCMultistepScheduler, {"solver_order": 3}),
    (DEISMultistepScheduler, {}),
    (DDIMScheduler, {"steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}),
    # flags that were once ignored: Karras / exponential bounds, UniPC's disable_corrector
    (EulerDiscreteScheduler, {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}),
    (EulerDiscreteScheduler, {"use_exponential_sigmas": True, "sigma_max": 10.0}),
    (UniPCMultistepScheduler, {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}),
    (UniPCMultistepScheduler, {"disable_corrector": [0, 1, 2]}),
    # sigma grids ending at sigma_min twice: a zero-length last step (grid option repeat_final)
    (DPMSolverMultistepScheduler, {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}),
    (DPMSolverMultistepScheduler, {"use_lu_lambdas": True, "final_sigmas_type": "sigma_min"}),
    (DPMSolverMultistepScheduler, {"use_exponential_sigmas": True, "final_sigmas_type": "sigma_min",
                                   "algorithm_type": "dpmsolver++", "solver_type": "heun"}),
    (DEISMultistepScheduler, {"use_karras_sigmas": True}),
    (EulerDiscreteScheduler, {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}),
    (EulerDiscreteScheduler, {"final_sigmas_type": "sigma_min"}),
    # Euler-type sigmas span the spaced timesteps' range (SDXL's "leading" config + use_karras_sigmas)
    (EulerDiscreteScheduler, {"use_karras_sigmas": True, "timestep_spacing": "leading", "steps_offset": 1}),
    (EulerDiscreteScheduler, {"use_exponential_sigmas": True, "timestep_spacing": "trailing"}),
    (EulerDiscreteScheduler, {"use_karras_sigmas": True, "timestep_spacing": "leading", "sigma_max": 3.0}),
    (HeunDiscreteScheduler, {"use_karras_sigmas": True, "timestep_spacing": "trailing"}),
    (KDPM2DiscreteScheduler, {"use_karras_sigmas": True, "timestep_spacing": "leading", "steps_offset": 1}),
    (LMSDiscreteScheduler, {"use_karras_sigmas": True, "timestep_spacing": "leading"}),
    (DPMSolverMultistepScheduler, {"use_karras_sigmas": True, "timestep_spacing": "leading"}),  # whole table
]  # fmt: skip


def _typed(cls, flags) -> str:
    return cls.__name__ + (":" + ",".join(f"{k}={v}" for k, v in flags.items()) if flags else "")


@pytest.mark.parametrize("steps", [4, 10])
@pytest.mark.parametrize("cls, flags", CASES, ids=lambda c: c.__name__ if isinstance(c, type) else str(c))
def test_diffusers_class_with_flags(cls, flags, steps):
    sched = cls(**SD, **flags)
    ref = _run_diffusers(sched, steps, X)
    res, ts = _velodiff_of(sched, steps, X, typed=_typed(cls, flags))
    err = float((ref - res.x).abs().max())
    assert err < TOL_DIFFUSERS, f"{_typed(cls, flags)}: max |diffusers - velodiff| = {err:.3g}"


LONG_CASES = [
    (UniPCMultistepScheduler, {}),
    (UniPCMultistepScheduler, {"solver_order": 3}),
    (UniPCMultistepScheduler, {"solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    (DPMSolverMultistepScheduler, {"solver_order": 3}),
    (DEISMultistepScheduler, {}),  # (order 3's closed forms cancel float32 tables to ~3e-5: parity file)
    (DEISMultistepScheduler, {"use_karras_sigmas": True}),
    (DPMSolverMultistepScheduler, {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}),
]


@pytest.mark.parametrize("steps", [15, 20])
@pytest.mark.parametrize("cls, flags", LONG_CASES, ids=lambda c: getattr(c, "__name__", str(c)))
def test_diffusers_class_with_flags_from_15_steps(cls, flags, steps):
    """From 15 steps diffusers' DPM-Solver++ and DEIS keep their order to the end, while its UniPC (as
    UniPC's own code) still lowers the last steps' order (velodiff: lower_order_final="always")."""
    test_diffusers_class_with_flags(cls, flags, steps)


@pytest.mark.parametrize("cls", [EulerAncestralDiscreteScheduler, KDPM2AncestralDiscreteScheduler])
def test_diffusers_ancestral_same_noise(cls):
    """diffusers draws one randn per step from its generator (randn_tensor, CPU, the sample's dtype)."""
    sched = cls(**SD)
    ref = _run_diffusers(sched, 8, X, seed=5)
    gen = torch.Generator().manual_seed(5)
    z = [torch.randn(X.shape, generator=gen, dtype=X.dtype) for _ in range(8)]
    res, _ = _velodiff_of(sched, 8, X, noise=lambda i: z[i])
    err = float((ref - res.x).abs().max())
    assert err < TOL_DIFFUSERS, f"{cls.__name__}: max |diffusers - velodiff| = {err:.3g}"


@pytest.mark.parametrize("flags", [{"solver_type": "midpoint"}, {"solver_type": "heun"}, {"solver_order": 1}])
def test_diffusers_sde_dpmsolver_same_noise(flags):
    """DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++") from the same noise, both solver types
    and solver_order=1 (a stochastic first-order step: DDIM with eta = 1), is velodiff's mapping of it."""
    # (default spacing: with Karras' float32 sigmas diffusers' noise terms differ from velodiff's by ~5e-5)
    sched = DPMSolverMultistepScheduler(**SD, algorithm_type="sde-dpmsolver++", **flags)
    sched.set_timesteps(8)
    z = starting_noise(SHAPE, 32, seed=9).reshape(8, 4, *SHAPE)
    x = X.clone()
    for i, k in enumerate(sched.timesteps):
        t = SCHED.t_from_sigma_ve(sched.sigmas[i].double())
        x = sched.step(eps_from_x0(SCHED, x, t, DEN(x, t)), k, x, variance_noise=z[i]).prev_sample
    typed = _typed(type(sched), {"algorithm_type": "sde-dpmsolver++", **flags})
    res, _ = _velodiff_of(sched, 8, X, noise=lambda i: z[i], typed=typed)
    err = float((x - res.x).abs().max())
    assert err < TOL_DIFFUSERS, err


def test_diffusers_ddpm_same_noise():
    sched = DDPMScheduler(**SD, clip_sample=False, steps_offset=1)
    sched.set_timesteps(10)
    gen, gen_copy = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x = X.clone()
    for k in sched.timesteps:
        t = SCHED.t_from_timestep(float(k))
        x = sched.step(eps_from_x0(SCHED, x, t, DEN(x, t)), k, x, generator=gen).prev_sample
    z = [torch.randn(X.shape, generator=gen_copy, dtype=X.dtype) for _ in range(10)]
    res, _ = _velodiff_of(sched, 10, X, noise=lambda i: z[i], typed="DDPMScheduler")
    assert float((x - res.x).abs().max()) < TOL_DIFFUSERS


def test_diffusers_flow_match_euler():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(8)
    # diffusers shifts its smallest sigma twice (tests/test_parity_basic.py): the schedule takes it as t_min
    flow = RectifiedFlow(shift=3.0, t_min=sched.sigma_min)
    den = MixtureDenoiser(MIX, flow)
    x = X.clone()
    for k in sched.timesteps:
        t = float(k) / 1000.0
        x = sched.step((x - den(x, t)) / t, k, x).prev_sample
    r = from_diffusers(sched)
    assert (r.solver, r.grid) == ("euler", "flow-shifted")
    res = sample(den, X, make_grid(r.grid, flow, 8, final=r.final), r.solver)
    assert float((x - res.x).abs().max()) < TOL_DIFFUSERS
    with pytest.raises(VelodiffError, match="use_karras_sigmas"):
        from_diffusers(FlowMatchEulerDiscreteScheduler(shift=3.0, use_karras_sigmas=True))


def test_a1111_ddim_is_diffusers_sd_ddim():
    sched = DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    ref = _run_diffusers(sched, 10, X)  # 1000 / 10 steps: A1111's ddim_uniform = diffusers' leading + 1
    alias = find("DDIM", SAMPLER)
    ts = make_grid(alias.grid, SCHED, 10, final=alias.final)
    err = float((ref - sample(DEN, X, ts, "DDIM").x).abs().max())
    assert err < TOL_DIFFUSERS, err


def test_diffusers_object_flags_refused_when_not_reproducible():
    with pytest.raises(VelodiffError, match="algorithm_type='dpmsolver'.*no velodiff solver"):
        from_diffusers(
            DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver", final_sigmas_type="sigma_min")
        )
    with pytest.raises(VelodiffError, match="use_beta_sigmas"):
        from_diffusers(EulerDiscreteScheduler(**SD, use_beta_sigmas=True))
    with pytest.raises(VelodiffError, match="no velodiff mapping yet"):
        from_diffusers("PNDMScheduler")


def test_edm_euler_reads_its_sigma_schedule_and_rho():
    from diffusers import EDMEulerScheduler

    from velodiff.schedules import EDM

    for flags, grid, opts in (({}, "karras", {}), ({"rho": 3.0}, "karras", {"rho": 3.0}),
                              ({"sigma_schedule": "exponential"}, "exponential", {}),
                              ({"sigma_min": 0.01, "sigma_max": 40.0}, "karras",
                               {"sigma_min": 0.01, "sigma_max": 40.0})):  # fmt: skip
        sched = EDMEulerScheduler(**flags)
        r = from_diffusers(sched)
        assert (r.solver, r.grid, dict(r.grid_options)) == ("euler", grid, opts)
        t = resolve_solver(_typed(EDMEulerScheduler, flags))
        assert (t.grid, dict(t.grid_options)) == (grid, opts)
        sched.set_timesteps(8)
        ts = make_grid(r.grid, EDM(), 8, final=r.final, **r.grid_options)  # EDM: t = sigma
        assert torch.allclose(ts, sched.sigmas.double(), rtol=1e-6, atol=0), flags


def test_diffusers_repeat_final_grid_is_its_levels():
    """diffusers' Karras sigmas with final_sigmas_type=sigma_min: N levels, then sigma_min again."""
    sched = DPMSolverMultistepScheduler(**SD, use_karras_sigmas=True, final_sigmas_type="sigma_min")
    sched.set_timesteps(10)
    assert float(sched.sigmas[-1]) == float(sched.sigmas[-2])
    ts = make_grid("karras", SCHED, 10, final="t_min", repeat_final=True)
    assert len(ts) == 10 and float(ts[-1]) == SCHED.t_min
    assert torch.allclose(SCHED.sigma_ve(ts), sched.sigmas[:-1].double(), rtol=5e-5, atol=0)  # float32 tables
    with pytest.raises(VelodiffError, match="repeat_final needs final='t_min'"):
        make_grid("karras", SCHED, 10, repeat_final=True)


@pytest.mark.parametrize("cls, flags, match", [
    (EulerDiscreteScheduler, {"interpolation_type": "log_linear"}, "interpolation_type='log_linear'"),
    (DDPMScheduler, {"variance_type": "fixed_large", "clip_sample": False}, "variance_type='fixed_large'"),
    (DPMSolverMultistepScheduler, {"variance_type": "learned_range"}, "variance_type='learned_range'"),
    (DEISMultistepScheduler, {"solver_order": 4}, "solver_order=4"),
    (UniPCMultistepScheduler, {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"},
     "final_sigmas_type=sigma_min with karras"),
    (DPMSolverMultistepScheduler, {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min",
                                   "solver_order": 3}, "at solver_order=3"),
    (EulerDiscreteScheduler, {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min",
                              "sigma_min": 0.1}, "and sigma_min"),
])  # fmt: skip
def test_diffusers_flags_that_change_the_result_are_refused(cls, flags, match):
    """The same one line for the live object (its config against the class's defaults) and the typed form."""
    with pytest.raises(VelodiffError, match=match):
        from_diffusers(cls(**SD, **flags))
    with pytest.raises(VelodiffError, match=match):
        resolve_solver(_typed(cls, flags))


def test_diffusers_third_order_sde_is_refused_with_its_reason():
    """diffusers' sde-dpmsolver++ order-3 x0'' coefficient tends to -1, not 0, as h -> 0 (the integral of
    2 e^{-2(h-u)} u^2 / 2 over [0, h], over h^2, is (1 - e^{-2h} - 2h) / (2h)^2 + 1/2; diffusers has
    - 1/2): refused with the reason, not reproduced."""
    with pytest.raises(VelodiffError, match="sign of its x0'' term's 1/2 flipped; use sde_dpmpp_3m"):
        from_diffusers(DPMSolverMultistepScheduler(**SD, algorithm_type="sde-dpmsolver++", solver_order=3))


def test_lambda_min_clipped_is_refused_where_it_drops_timesteps():
    """On a cosine schedule DPM-Solver's lambda_min_clipped moves diffusers' grid (995, 896, ... instead
    of 999, 899, ...): refused; on SD's betas it drops nothing and the mapping stands."""
    cos = DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1)
    cos.set_timesteps(10)
    assert int(cos.timesteps[0]) == 995
    with pytest.raises(VelodiffError, match="drops this schedule's 4 noisiest trained timesteps"):
        from_diffusers(cos)
    sd = DPMSolverMultistepScheduler(**SD, lambda_min_clipped=-5.1)
    assert from_diffusers(sd) == from_diffusers(DPMSolverMultistepScheduler(**SD))


@pytest.mark.parametrize("typed", ["EulerDiscreteScheduler:use_karras_sigmas=true,sigma_min=abc",
                                   "EDMEulerScheduler:rho=x", "EDMEulerScheduler:sigma_min=none"])
def test_diffusers_number_flags_are_one_line(typed):
    with pytest.raises(VelodiffError, match="must be a finite number"):
        resolve_solver(typed)


def test_diffusers_live_object_flags_are_checked():
    with pytest.raises(VelodiffError, match="UniPCMultistepScheduler: solver_p='DDIMScheduler'"):
        resolve_solver("UniPCMultistepScheduler:solver_p=DDIMScheduler")
    with pytest.raises(VelodiffError, match="flag 'foo' has no velodiff equivalent"):
        from_diffusers(EulerDiscreteScheduler(**SD), {"foo": 1})
    # another class's entries that from_config carries over are not read by the class: not refused
    other = {**EulerDiscreteScheduler(**SD).config, "skip_prk_steps": True}
    sched = DPMSolverMultistepScheduler.from_config(other)
    assert from_diffusers(sched).solver == "dpmpp_2m"


@pytest.mark.parametrize("typed, match", [
    ("DPMSolverMultistepScheduler:solver_order=two",
     "^DPMSolverMultistepScheduler: solver_order must be an integer, got 'two'$"),
    ("UniPCMultistepScheduler:solver_order=2.5",
     "^UniPCMultistepScheduler: solver_order must be an integer, got '2.5'$"),
    ("DEISMultistepScheduler:solver_order=", "DEISMultistepScheduler: solver_order must be an integer"),
    ("EulerDiscreteScheduler:timestep_spacing=leading,steps_offset=one", "steps_offset must be an integer"),
    ("DPMSolverMultistepScheduler:solver_order=5", "algorithm_type='dpmsolver\\+\\+', solver_order=5"),
])  # fmt: skip
def test_diffusers_integer_flags_are_one_line(typed, match):
    with pytest.raises(VelodiffError, match=match):
        resolve_solver(typed)
    assert resolve_solver("UniPCMultistepScheduler:solver_order=3").solver_options["order"] == 3


def test_grid_options_change_the_grid_as_their_definitions_say():
    """The options beyond the defaults: polyexponential's rho (k-diffusion's), beta's unequal alpha and beta
    (the quantiles of Beta(alpha, beta), not of Beta(beta, alpha)), AYS ending at t_min when asked,
    linear_quadratic's linear_steps."""
    from scipy.stats import beta as beta_dist

    if K is not None:
        torch.set_default_dtype(F64)
        try:
            want = K.get_sigmas_polyexponential(8, float(SIGMAS[0]), float(SIGMAS[-1]), rho=2.0)[:-1].numpy()
        finally:
            torch.set_default_dtype(torch.float32)
        got = SCHED.sigma_ve(make_grid("polyexponential", SCHED, 8, rho=2.0)[:-1]).numpy()
        assert np.allclose(got, want, rtol=1e-9, atol=0)
    ks = SCHED.timestep(make_grid("beta", SCHED, 8, alpha=0.4, beta=0.9)[:-1]).round().numpy()
    want = np.unique(np.round(beta_dist.ppf(1 - np.arange(8) / 8, 0.4, 0.9) * 999))[::-1]
    assert np.array_equal(ks, want)
    ays = make_grid("ays", SCHED, 10, final="t_min")
    assert len(ays) == 11 and float(ays[-1]) == pytest.approx(SCHED.t_min)
    assert torch.equal(ays[:-1], make_grid("ays", SCHED, 10)[:-1])
    u = 1.0 - make_grid("linear_quadratic", FLOW, 10, linear_steps=3).numpy()
    assert np.allclose(u[:3], 0.025 * np.arange(3) / 3, rtol=0, atol=1e-15)
    assert not np.allclose(u[:5], 0.025 * np.arange(5) / 5, rtol=0, atol=1e-12)  # not the default L = 5


def test_comfyuis_two_unipc_samplers_are_its_two_variants():
    """ComfyUI's uni_pc runs UniPC's B(h) = h variant (bh1), uni_pc_bh2 B(h) = e^h - 1 (bh2), both order 3,
    and the two differ on a run."""
    from velodiff.solvers import get_solver

    one, two = get_solver("uni_pc"), get_solver("uni_pc_bh2")
    assert (one.name, one.defaults["solver_type"], one.defaults["order"]) == ("unipc", "bh1", 3)
    a1111 = get_solver("UniPC")  # A1111's defaults: bh1, order 3
    assert (a1111.name, a1111.defaults["solver_type"], a1111.defaults["order"]) == ("unipc", "bh1", 3)
    # ... on A1111's grid: S time-uniform steps from t = 1 to 1/N, no jump to 0 (denoise_to_zero=False)
    r = resolve_solver("UniPC")
    vp = DiscreteVP.scaled_linear()
    a1111_ts = torch.linspace(1.0, 1.0 / vp.num_train_timesteps, 11, dtype=torch.float64)
    torch.testing.assert_close(make_grid(r.grid, vp, 10, final=r.final), a1111_ts, rtol=0, atol=1e-12)
    assert (two.name, two.defaults["solver_type"], two.defaults["order"]) == ("unipc", "bh2", 3)
    ts = make_grid("karras", SCHED, 6)
    x = starting_noise(SHAPE, 2, seed=0)
    assert not torch.allclose(sample(DEN, x, ts, "uni_pc").x, sample(DEN, x, ts, "uni_pc_bh2").x)


MULTISTEP = [DPMSolverMultistepScheduler, DEISMultistepScheduler, UniPCMultistepScheduler]


@pytest.mark.parametrize("source", [*MULTISTEP, EulerDiscreteScheduler])
@pytest.mark.parametrize("cls", [*MULTISTEP, EulerDiscreteScheduler, DDIMScheduler])
def test_a_class_name_on_a_models_config_maps_as_from_config_makes_it(source, cls):
    """A class name with a model's scheduler config is what ``cls.from_config(config)`` builds: the
    config's spacing and flags the class takes, the values its __init__ rewrites rewritten (a DPM-Solver
    config's solver_type "midpoint" is UniPC's "bh2", DEIS's "logrho"), the rest dropped. What the config
    does not set is the Stable Diffusion pipelines' config of the class (DDIM: no x0 clipping, ending at
    the first trained step), not the class's own defaults."""
    config = dict(source(**SD, timestep_spacing="leading", steps_offset=1, use_karras_sigmas=False).config)
    sd = {"clip_sample": False, "set_alpha_to_one": False} if cls is DDIMScheduler else {}
    built = from_diffusers(cls.from_config(config, **sd))
    named = resolve_solver(cls.__name__, model_config=config)
    assert (named.solver, named.grid, named.grid_options, named.final) == (
        built.solver, built.grid, built.grid_options, built.final)
    defaults = SOLVERS[named.solver].defaults
    assert {**defaults, **named.solver_options} == {**defaults, **built.solver_options}
    assert named.grid == "leading"


# --- review28 ---------------------------------------------------------------------------------------------


#: A1111's modules/sd_samplers_kdiffusion.py: label -> (k-diffusion function, the options it passes)
A1111_K_CALLS = {
    "DPM++ 2M SDE": ("sample_dpmpp_2m_sde", {}),
    "DPM++ 2M SDE Heun": ("sample_dpmpp_2m_sde", {"solver_type": "heun"}),
    "DPM++ 2M SDE Heun Karras": ("sample_dpmpp_2m_sde", {"solver_type": "heun"}),
    "DPM++ 2M SDE Heun Exponential": ("sample_dpmpp_2m_sde", {"solver_type": "heun"}),
}


@needs_k
@pytest.mark.parametrize("label", A1111_K_CALLS)
def test_a1111_sde_labels_make_a1111s_k_diffusion_call(label):
    """Each label runs the k-diffusion call A1111 makes for it (its options written here, not read from
    the alias), on the label's grid and from the same noise."""
    fn_name, kw = A1111_K_CALLS[label]
    r = resolve_solver(label)
    ts = make_grid(r.grid, SCHED, 8, **r.grid_options)
    sigmas = torch.cat([SCHED.sigma_ve(ts[:-1]), torch.zeros(1, dtype=F64)])
    a, b = Replay(), Replay()
    ref = getattr(K, fn_name)(_k_model, X / float(SCHED.alpha(ts[0])), sigmas, disable=True,
                              noise_sampler=a.sampler, **kw)
    res = sample(DEN, X, ts, label, noise=b)
    err = float((ref - res.x).abs().max())
    assert err < TOL_K * float(ref.abs().max()), f"{label}: max |k-diffusion - velodiff| = {err:.3g}"


def test_a_bare_ddim_class_name_is_the_sd_pipelines_ddim():
    """"DDIMScheduler" alone means the config the Stable Diffusion pipelines give it (steps_offset 1, no
    alpha set to one, no clipping): diffusers' sample from that scheduler, timesteps 901 ... 1 at 10 steps."""
    sched = DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    ref = _run_diffusers(sched, 10, X)
    r = resolve_solver("DDIMScheduler")
    ts = make_grid(r.grid, SCHED, 10, final=r.final or "zero", **r.grid_options)
    assert SCHED.timestep(ts[:10]).round().tolist() == sched.timesteps.tolist()
    res = sample(DEN, X, ts, r.solver, **r.solver_options)
    err = float((ref - res.x).abs().max())
    assert err < TOL_DIFFUSERS, err


def test_diffusers_number_flags_read_from_json_and_refused_when_infinite():
    """A config read from JSON may hold 3.0 for an integer flag: it is 3 (2.5 is refused above); a bound
    that is not finite is refused in one line, not turned into a grid."""
    cls = "DPMSolverMultistepScheduler"
    assert from_diffusers(cls, {"solver_order": 3.0}) == from_diffusers(cls, {"solver_order": 3})
    for typed in ("EulerDiscreteScheduler:use_karras_sigmas=true,sigma_max=inf", "EDMEulerScheduler:rho=nan"):
        with pytest.raises(VelodiffError, match="must be a finite number"):
            resolve_solver(typed)


def test_unknown_names_list_near_matches_two_edits_away():
    """A name two or three edits from a solver's still gets its near match (difflib's ratio 0.6 rule)."""
    for typo, want in (("eulr_anc", "euler_ancestral"), ("dpmpp2msd", "dpmpp_2m_sde")):
        with pytest.raises(VelodiffError, match=f"did you mean .*'{want}'"):
            get_solver(typo)


def test_review36_a_names_options_are_typed_and_an_aliass_own_grid_and_end_are_kept():
    """review36: an option written in a name is an integer when it is one (order=3, not 3.0) and a JSON
    list when bracketed (unipc's per-step orders); another tool's sampler name takes the given options over
    its own (dpmpp_2m_sde's lower_order_final=False) and keeps its own grid options (A1111's DPM2: the
    penultimate level discarded) and its own final step (dpm_fast)."""
    from velodiff.aliases import resolve_solver

    given = resolve_solver("dpmpp_2m_sde:lower_order_final=true").solver_options  # given over its own False
    assert given["lower_order_final"] is True
    spec = get_solver("unipc:order=3,orders=[1,2],disable_corrector=[0]")
    assert type(spec.defaults["order"]) is int and spec.defaults["order"] == 3
    assert list(spec.defaults["orders"]) == [1, 2] and list(spec.defaults["disable_corrector"]) == [0]
    for label, option in (("DPM2 Karras", "s_noise=1.0"), ("DPM fast", "nfe=0")):
        bare, named = resolve_solver(label), resolve_solver(f"{label}:{option}")
        assert bare.grid_options or bare.final, label  # (each has something of its own to keep)
        assert (named.grid, dict(named.grid_options), named.final) == (bare.grid, dict(bare.grid_options),
                                                                      bare.final), label
