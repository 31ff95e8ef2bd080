"""k-diffusion's samplers and velodiff's, step for step, to float64 round-off.

k-diffusion (MIT) is the reference where diffusers has no scheduler (dpm_2 churn, DPM++ 2S ancestral,
DPM++ SDE, DPM fast / adaptive) and where ComfyUI and A1111 call it directly. Only its ``sampling``
module is loaded (its package ``__init__`` imports training dependencies: jsonmerge, torchvision,
...), with the one helper of ``utils`` it uses; the tests are skipped where k-diffusion is not
installed (``pip install --no-deps k-diffusion``).

Set-up: the exact x0-denoiser of a Gaussian mixture (``velodiff.oracle``), float64. k-diffusion's model
is D(x~; sigma) in x~ = x / alpha: on the EDM schedule (alpha = 1, t = sigma) that is the oracle
itself; on Stable Diffusion's discrete schedule it is the oracle at t = t_from_sigma_ve(sigma) applied
to alpha(t) x~, and the comparison is of x~. Both sides get the same grid (sigma = sigma_ve(ts)) and,
where they draw noise, the same noise in the same order (k-diffusion's noise_sampler calls and its
torch.randn_like calls are replayed to velodiff's noise source).
"""

from __future__ import annotations

import pytest
import torch

from kdiffusion import load_k_sampling
from velodiff import EDM, DiscreteVP, make_grid, sample
from velodiff.oracle import GaussianMixture, MixtureDenoiser, starting_noise
from velodiff.schedules import F64

K = load_k_sampling()
pytestmark = pytest.mark.skipif(K is None, reason="k-diffusion is not installed")

SHAPE = (2, 6)
MIX = GaussianMixture.random(SHAPE, components=3, seed=1)
X = starting_noise(SHAPE, 4, seed=3)
TOL = 1e-9
SCHEDS = {"edm": EDM(), "sd": DiscreteVP.scaled_linear()}


class Setup:
    def __init__(self, name: str, grid: str = "karras", steps: int = 8, final: str = "zero") -> None:
        self.sched = SCHEDS[name]
        self.den = MixtureDenoiser(MIX, self.sched)
        self.ts = make_grid(grid, self.sched, steps, final=final)
        self.sigmas = torch.where(self.ts > 0, self.sched.sigma_ve(self.ts), torch.zeros_like(self.ts))
        a0 = float(self.sched.alpha(self.ts[0]))
        self.x = X * (a0**2 + float(self.sched.sigma(self.ts[0])) ** 2) ** 0.5  # x at ts[0]
        self.x_ve = self.x / a0
        self.calls = 0

    def model(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        s = sigma.reshape(-1)[0].to(F64)
        t = self.sched.t_from_sigma_ve(s)
        return self.den(float(self.sched.alpha(t)) * x, t)

    def velodiff_ve(self, result) -> torch.Tensor:
        a = float(self.sched.alpha(self.ts[-1]))
        return result.x / a


class Replay:
    """One noise sequence for both sides: the k-th draw of either is z[k]."""

    def __init__(self, n: int, seed: int = 7) -> None:
        self.z = starting_noise(SHAPE, 4 * n, seed=seed).reshape(n, 4, *SHAPE)
        self.k = 0

    def _next(self) -> torch.Tensor:
        self.k += 1
        return self.z[self.k - 1]

    def sampler(self, *_: object) -> torch.Tensor:  # k-diffusion's noise_sampler(sigma, sigma_next)
        return self._next()

    def __call__(self, i: int) -> torch.Tensor:  # velodiff's noise(i)
        return self._next()

    def between(self, t_from: float, t_to: float) -> torch.Tensor:  # velodiff's interval increments
        return self._next()


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    err = float((a - b).abs().max())
    assert err < tol * max(1.0, float(b.abs().max())), f"max |k-diffusion - velodiff| = {err:.3g}"


@pytest.mark.parametrize("sched", SCHEDS)
@pytest.mark.parametrize(
    "name, solver",
    [("sample_euler", "euler"), ("sample_heun", "heun"), ("sample_dpm_2", "dpm_2"), ("sample_lms", "lms"),
     ("sample_dpmpp_2m", "dpmpp_2m")],
)  # fmt: skip
def test_deterministic(sched, name, solver):
    s = Setup(sched)
    ref = getattr(K, name)(s.model, s.x_ve.clone(), s.sigmas, disable=True)
    opts = {"lower_order_final": False} if solver == "dpmpp_2m" else {}
    res = sample(s.den, s.x, s.ts, solver, **opts)
    _close(ref, s.velodiff_ve(res), 1e-6 if solver == "lms" else TOL)  # lms: scipy quad, epsrel 1e-4
    assert res.nfe == s.calls


@pytest.mark.parametrize("sched", SCHEDS)
@pytest.mark.parametrize(
    "name, solver", [("sample_euler", "euler"), ("sample_heun", "heun"), ("sample_dpm_2", "dpm_2")]
)
def test_churn(sched, name, solver):
    """EDM churn: k-diffusion draws randn_like(x) every step; velodiff draws where gamma > 0."""
    s = Setup(sched, steps=10)
    sig = s.sigmas
    kw = dict(s_churn=2.0, s_tmin=0.1, s_tmax=float(sig[1]) * 1.01, s_noise=1.003)  # not the top step
    torch.manual_seed(4)
    ref = getattr(K, name)(s.model, s.x_ve.clone(), sig, disable=True, **kw)
    torch.manual_seed(4)
    z = [torch.randn_like(s.x_ve) for _ in range(10)]
    res = sample(s.den, s.x, s.ts, solver, noise=lambda i: z[i], **kw)
    _close(ref, s.velodiff_ve(res))
    assert res.nfe == s.calls


@pytest.mark.parametrize("sched", SCHEDS)
@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize(
    "name, solver",
    [("sample_euler_ancestral", "euler_ancestral"), ("sample_dpm_2_ancestral", "dpm_2_ancestral"),
     ("sample_dpmpp_2s_ancestral", "dpmpp_2s_ancestral"), ("sample_dpmpp_sde", "dpmpp_sde"),
     ("sample_dpmpp_2m_sde", "sde_dpmpp_2m"), ("sample_dpmpp_3m_sde", "sde_dpmpp_3m")],
)  # fmt: skip
def test_stochastic_same_noise(sched, eta, name, solver):
    s = Setup(sched)
    a, b = Replay(40), Replay(40)
    ref = getattr(K, name)(
        s.model, s.x_ve.clone(), s.sigmas, disable=True, eta=eta, s_noise=0.97, noise_sampler=a.sampler
    )
    opts = {"lower_order_final": False} if solver == "sde_dpmpp_2m" else {}
    if solver == "sde_dpmpp_3m":
        opts = {"variant": "k-diffusion"}
    res = sample(s.den, s.x, s.ts, solver, noise=b, eta=eta, s_noise=0.97, **opts)
    _close(ref, s.velodiff_ve(res))
    assert a.k == b.k and res.nfe == s.calls


@pytest.mark.parametrize("sched", SCHEDS)
@pytest.mark.parametrize("nfe", [4, 6, 8, 10, 11])
def test_dpm_fast(sched, nfe):
    s = Setup(sched, grid="logsnr", steps=nfe // 3 + 1, final="t_min")
    torch.set_default_dtype(F64)  # k-diffusion builds its grid with torch.linspace of the default dtype
    try:
        ref = K.sample_dpm_fast(s.model, s.x_ve.clone(), s.sigmas[-1], s.sigmas[0], nfe, disable=True)
    finally:
        torch.set_default_dtype(torch.float32)
    res = sample(s.den, s.x, s.ts, "dpm_fast", nfe=nfe)
    _close(ref, s.velodiff_ve(res), 1e-8)
    assert res.nfe == s.calls == nfe


@pytest.mark.parametrize("sched", SCHEDS)
@pytest.mark.parametrize("order", [2, 3])
def test_dpm_adaptive(sched, order):
    s = Setup(sched, grid="logsnr", steps=1, final="t_min")
    ref, info = K.sample_dpm_adaptive(
        s.model, s.x_ve.clone(), s.sigmas[-1], s.sigmas[0], order=order, disable=True, return_info=True
    )
    res = sample(s.den, s.x, s.ts, "dpm_adaptive", order=order)
    _close(ref, s.velodiff_ve(res), 1e-8)
    assert res.nfe == s.calls == info["nfe"]


@pytest.mark.parametrize("sched", SCHEDS)
@pytest.mark.parametrize(
    "name, solver, options",
    [("sample_dpmpp_sde", "dpmpp_sde", {"r": 1 / 3}),  # the midpoint's place: r = 1/2 hides 1/(2r) = 2r
     ("sample_euler_ancestral", "euler_ancestral", {"eta": 4.0}),
     # eta 4: sigma_down = 0 at every step, the step is x0 plus all the noise: Euler-ancestral's step.
     # (k-diffusion's own sample_dpm_2_ancestral adds no noise there: its noise line sits in the DPM-2
     # branch; velodiff keeps the ancestral step's definition)
     ("sample_euler_ancestral", "dpm_2_ancestral", {"eta": 4.0})],
)  # fmt: skip
def test_stochastic_options_off_their_defaults(sched, name, solver, options):
    s = Setup(sched)
    a, b = Replay(40), Replay(40)
    kw = dict(disable=True, noise_sampler=a.sampler, **options)
    ref = getattr(K, name)(s.model, s.x_ve.clone(), s.sigmas, **kw)
    res = sample(s.den, s.x, s.ts, solver, noise=b, **options)
    _close(ref, s.velodiff_ve(res))
    assert a.k == b.k and res.nfe == s.calls


def test_churn_above_the_schedules_top_stays_at_its_top():
    """EDM churn raises sigma by (1 + gamma); on a VP schedule no sigma lies above sigma(t_max), so a step
    just below the top is churned to the top (k-diffusion's VE sigmas are unbounded; the VP model has no
    such noise level): x_hat = x + sqrt(sigma_max^2 - sigma^2) z, then the Euler step from t_max."""
    sched = SCHEDS["sd"]
    den = MixtureDenoiser(MIX, sched)
    ts = torch.tensor([0.99, 0.5], dtype=F64)
    z = starting_noise(SHAPE, 4, seed=9)
    x = X * float((sched.alpha(ts[0]) ** 2 + sched.sigma(ts[0]) ** 2) ** 0.5)
    res = sample(den, x, ts, "euler", noise=lambda i: z, s_churn=100.0)
    a, sig = float(sched.alpha(ts[0])), float(sched.sigma(ts[0]) / sched.alpha(ts[0]))
    top = torch.tensor(sched.t_max, dtype=F64)
    sig_hat = float(sched.sigma_ve(top))
    assert sig * 2**0.5 > sig_hat  # the churned sigma would be above the top
    x_hat = x / a + (sig_hat**2 - sig**2) ** 0.5 * z
    x0 = den(float(sched.alpha(top)) * x_hat, top)
    sig_next = float(sched.sigma_ve(ts[1]))
    want = float(sched.alpha(ts[1])) * (x_hat + (sig_next - sig_hat) * (x_hat - x0) / sig_hat)
    _close(want, res.x)


@pytest.mark.parametrize("sched", SCHEDS)
def test_dpm_adaptive_pid_coefficients(sched):
    """The PID controller off its defaults (proportional and derivative terms on; the defaults make it
    pure integral, where its error history is unused) takes k-diffusion's steps."""
    s = Setup(sched, grid="logsnr", steps=1, final="t_min")
    kw = dict(pcoeff=0.3, icoeff=0.6, dcoeff=0.2, rtol=0.02, atol=0.005)
    ref, info = K.sample_dpm_adaptive(
        s.model, s.x_ve.clone(), s.sigmas[-1], s.sigmas[0], order=3, disable=True, return_info=True, **kw
    )
    res = sample(s.den, s.x, s.ts, "dpm_adaptive", order=3, **kw)
    _close(ref, s.velodiff_ve(res), 1e-8)
    assert res.nfe == s.calls == info["nfe"]


class _A1111Torch:
    """A1111's TorchHijack: k-diffusion's ``torch`` module with ``randn_like`` replaced by the next draw of
    each image's own CPU generator (its ``ImageRNG`` with "RNG: CPU"), after the starting noise's."""

    def __init__(self, seeds: list[int], shape: tuple[int, ...]) -> None:
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.shape = shape
        self.start = self.next()

    def next(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(F64)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.next()

    def __getattr__(self, name: str) -> object:
        return getattr(torch, name)


@pytest.mark.parametrize("sched", SCHEDS)
@pytest.mark.parametrize(
    "name, solver, kw",
    [("sample_euler_ancestral", "euler_ancestral", {}), ("sample_dpm_2_ancestral", "dpm_2_ancestral", {}),
     ("sample_dpmpp_2s_ancestral", "dpmpp_2s_ancestral", {}),
     ("sample_euler", "euler", {"s_churn": 2.0, "s_tmin": 0.1})],
)  # fmt: skip
def test_a1111_cpu_noise_is_what_a1111_gives_k_diffusion(sched, name, solver, kw, monkeypatch):
    """noise a1111-cpu (``GeneratorNoise``, a generator per image): the starting noise and every step's
    noise as A1111 draws them with "RNG: CPU" (replayed into k-diffusion's randn_like), including Euler's
    churn, for which k-diffusion draws on every step but uses the draw only where gamma > 0."""
    from velodiff.noise import GeneratorNoise

    seeds = [5, 2**40 + 3, 9, 11]
    s = Setup(sched)
    hijack = _A1111Torch(seeds, SHAPE)
    monkeypatch.setattr(K, "torch", hijack)
    scale = (float(s.sched.alpha(s.ts[0])) ** 2 + float(s.sched.sigma(s.ts[0])) ** 2) ** 0.5
    a0 = float(s.sched.alpha(s.ts[0]))
    if "s_tmin" in kw:
        kw = {**kw, "s_tmax": float(s.sigmas[1]) * 1.01}  # churn on some steps, not on all
    ref = getattr(K, name)(s.model, hijack.start * scale / a0, s.sigmas, disable=True, **kw)
    streams = GeneratorNoise((4, *SHAPE), seeds, dtype=F64)
    assert torch.equal(streams.first().to(F64), hijack.start)
    res = sample(s.den, streams.first().to(F64) * scale, s.ts, solver, noise=streams, **kw)
    _close(ref, s.velodiff_ve(res))


@pytest.mark.parametrize("sched", SCHEDS)
@pytest.mark.parametrize(
    "name, solver", [("sample_dpmpp_sde", "dpmpp_sde"), ("sample_dpmpp_2m_sde", "sde_dpmpp_2m")]
)
def test_a1111_cpu_brownian_noise_is_k_diffusions_tree_per_image(sched, name, solver):
    """noise a1111-cpu's Brownian steps (``SigmaBrownianNoise``): k-diffusion's BrownianTreeNoiseSampler
    with one tree per image seeded by the image's seed, over sigma in [the grid's least positive sigma,
    its largest], as A1111 builds it for DPM++ SDE and DPM++ 2M SDE."""
    from velodiff.noise import SigmaBrownianNoise

    seeds = [5, 2**40 + 3, 9, 11]
    s = Setup(sched)
    sig = s.sigmas
    kd_noise = K.BrownianTreeNoiseSampler(s.x_ve, sig[sig > 0].min(), sig.max(), seed=seeds)
    ref = getattr(K, name)(s.model, s.x_ve.clone(), s.sigmas, disable=True, noise_sampler=kd_noise)
    opts = {"lower_order_final": False} if solver == "sde_dpmpp_2m" else {}
    noise = SigmaBrownianNoise(s.x, seeds, s.ts, s.sched)
    res = sample(s.den, s.x, s.ts, solver, noise=noise, **opts)
    _close(ref, s.velodiff_ve(res), 1e-6)


class _R29A1111NV(_A1111Torch):
    """A1111's TorchHijack with "RNG: NV": each image's own Philox generator (A1111's rng_philox, which
    tests/test_noise.py checks velodiff.philox against to the bit), one offset per call."""

    def __init__(self, seeds: list[int], shape: tuple[int, ...]) -> None:
        from velodiff.philox import PhiloxGenerator

        self.philox = [PhiloxGenerator(s) for s in seeds]
        self.shape = shape
        self.start = self.next()

    def next(self) -> torch.Tensor:
        return torch.stack([torch.from_numpy(g.randn(self.shape)) for g in self.philox]).to(F64)


@pytest.mark.parametrize("source", ["CPU", "NV"])
@pytest.mark.parametrize(
    "name, solver",
    [("sample_heun", "heun"), ("sample_dpm_2", "dpm_2"), ("sample_euler", "euler"),
     ("sample_dpm_2_ancestral", "dpm_2_ancestral")],
)  # fmt: skip
def test_a1111_noise_with_churn_on_some_steps_and_both_sources(name, solver, source, monkeypatch):
    """A1111's step noise through k-diffusion for the churn samplers (Heun, DPM2, Euler: k-diffusion draws
    eps on every step, also where gamma = 0, so step i takes draw i + 1 even when earlier steps had no
    churn) and DPM2 a, with "RNG: CPU" and "RNG: NV": velodiff's GeneratorNoise per image gives the same."""
    from velodiff.noise import GeneratorNoise

    seeds = [5, 2**40 + 3, 9, 11]
    s = Setup("sd")
    hijack = (_A1111Torch if source == "CPU" else _R29A1111NV)(seeds, SHAPE)
    monkeypatch.setattr(K, "torch", hijack)
    kw = {} if "ancestral" in name else {"s_churn": 2.0, "s_tmin": 0.1, "s_tmax": float(s.sigmas[3]) * 1.01}
    scale = (float(s.sched.alpha(s.ts[0])) ** 2 + float(s.sched.sigma(s.ts[0])) ** 2) ** 0.5
    a0 = float(s.sched.alpha(s.ts[0]))
    ref = getattr(K, name)(s.model, hijack.start * scale / a0, s.sigmas, disable=True, **kw)
    streams = GeneratorNoise((4, *SHAPE), seeds, source, dtype=F64)
    assert torch.equal(streams.first().to(F64), hijack.start)
    res = sample(s.den, streams.first().to(F64) * scale, s.ts, solver, noise=streams, **kw)
    _close(ref, s.velodiff_ve(res))


def test_a1111_brownian_noise_drives_dpmpp_3m_sde_as_k_diffusion():
    """DPM++ 3M SDE (A1111 marks it brownian_noise too): k-diffusion's per-image Brownian trees over
    [least positive sigma, largest sigma], as velodiff's SigmaBrownianNoise, with the k-diffusion variant
    of the third-order correction."""
    from velodiff.noise import SigmaBrownianNoise

    seeds = [5, 2**40 + 3, 9, 11]
    s = Setup("sd")
    sig = s.sigmas
    kd_noise = K.BrownianTreeNoiseSampler(s.x_ve, sig[sig > 0].min(), sig.max(), seed=seeds)
    ref = K.sample_dpmpp_3m_sde(s.model, s.x_ve.clone(), s.sigmas, disable=True, noise_sampler=kd_noise)
    noise = SigmaBrownianNoise(s.x, seeds, s.ts, s.sched)
    res = sample(s.den, s.x, s.ts, "sde_dpmpp_3m", noise=noise, variant="k-diffusion")
    _close(ref, s.velodiff_ve(res), 1e-6)
