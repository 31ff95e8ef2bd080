"""Step grids: shape and range contracts for every grid on every schedule it applies to, and equality
with diffusers' timesteps and Karras sigmas.

Deliberate differences, asserted below rather than hidden:

* diffusers' spacings (``linspace``, ``leading``, ``trailing``) start where diffusers starts them
  (e.g. ``leading`` at k = 901 for 10 steps), not at t_max.
* With ``final="t_min"``, a spacing whose last timestep is already k = 0 (``linspace``, and
  ``leading`` without ``steps_offset``) has ``steps`` times, i.e. one step fewer than asked:
  diffusers' DDIM (set_alpha_to_one=False) spends its last evaluation on a step from k = 0 to k = 0
  that leaves the sample unchanged; velodiff drops that no-op step.
* ``flow-shifted`` shifts every time including the last, so with shift s it ends at
  flow_shift(t_min, s) >= t_min, as diffusers' FlowMatchEulerDiscreteScheduler does.
* diffusers' ``trailing`` (np.arange(N, 0, -N / steps)) rounds into one extra timestep, -1, for
  some step counts (121 of 1000, for one); velodiff always gives ``steps`` timesteps, the same ones.
* diffusers' EulerDiscreteScheduler keeps ``linspace`` timesteps fractional; velodiff rounds them
  to trained timesteps as DDIMScheduler does.
"""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from velodiff import EDM, GRIDS, ContinuousVP, DiscreteVP, RectifiedFlow, make_grid
from velodiff.errors import VelodiffError
from velodiff.grids import TOOL_GRIDS, flow_shift
from velodiff.schedules import F64

SCHEDULES = {
    "scaled_linear": DiscreteVP.scaled_linear(),
    "squaredcos_cap_v2": DiscreteVP.squaredcos_cap_v2(),
    "zero_snr": DiscreteVP.scaled_linear().rescale_zero_terminal_snr(),
    "vp": ContinuousVP(),
    "edm": EDM(),
    "flow": RectifiedFlow(),
    "flow_shift3": RectifiedFlow(shift=3.0),
}
SPACINGS = ("linspace", "leading", "trailing")
# tests/test_aliases.py: TOOL_GRIDS; "flux" (flows only) below
CONTINUOUS_GRIDS = [g for g in GRIDS if g not in (*SPACINGS, *TOOL_GRIDS, "flux")]
SD = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def _check_shape(ts, steps, final, sched):
    assert ts.dtype == F64 and ts.ndim == 1
    assert bool((ts[1:] < ts[:-1]).all()), ts
    if final == "zero":
        assert float(ts[-1]) == 0.0
        assert float(ts[-2]) >= sched.t_min * (1 - 1e-12)
    else:
        assert float(ts[-1]) >= sched.t_min * (1 - 1e-12)


@pytest.mark.parametrize("grid", CONTINUOUS_GRIDS)
@pytest.mark.parametrize("name", SCHEDULES)
@settings(max_examples=25, deadline=None)
@given(
    steps=st.integers(1, 60),
    final=st.sampled_from(["zero", "t_min"]),
    u=st.one_of(st.none(), st.floats(0.01, 0.999)),
)
def test_grid_contract(grid, name, steps, final, u):
    # (u <= 0.999: a t_start within ~1e-15 of a flow's t = 1 has sigma/alpha ~ 1e15, where grids in
    # sigma collapse in float64 and make_grid refuses them as not strictly decreasing)
    sched = SCHEDULES[name]
    t_start = None if u is None else sched.t_min + u * (sched.t_max - sched.t_min)
    ts = make_grid(grid, sched, steps, final=final, t_start=t_start)
    assert len(ts) == steps + 1
    _check_shape(ts, steps, final, sched)
    assert float(ts[0]) == pytest.approx(sched.t_max if t_start is None else t_start, rel=1e-12)
    end = float(ts[-1] if final == "t_min" else ts[-2])
    shift = getattr(sched, "shift", 1.0) if grid == "flow-shifted" else 1.0
    if final == "t_min" or steps > 1:
        assert end == pytest.approx(float(flow_shift(torch.tensor(sched.t_min, dtype=F64), shift)), rel=1e-9)
    # the defining spacing of the two simplest grids (the final point aside): even in log-SNR / in t
    # (a flow's t = 1 has log-SNR -inf: its grid starts from the schedule's finite end, so only the
    # finite points are compared)
    inner = ts if final == "t_min" else ts[:-1]
    values = sched.log_snr(inner) if grid == "logsnr" else inner
    values = values[values.isfinite()]
    if len(values) > 2 and grid in ("logsnr", "uniform"):
        d = torch.diff(values)
        assert torch.allclose(d, d[0].expand_as(d), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", ["scaled_linear", "squaredcos_cap_v2", "zero_snr"])
@settings(max_examples=25, deadline=None)
@given(steps=st.integers(1, 200), final=st.sampled_from(["zero", "t_min"]), offset=st.sampled_from([0, 1]))
def test_spacing_contract(spacing, name, steps, final, offset):
    sched = SCHEDULES[name]
    ends_at_k0 = spacing == "linspace" or (spacing == "leading" and offset == 0)
    if ends_at_k0 and steps == 1 and final == "t_min":
        with pytest.raises(VelodiffError):  # diffusers' one step is at k = 0 itself
            make_grid(spacing, sched, steps, final=final, steps_offset=offset)
        return
    ts = make_grid(spacing, sched, steps, final=final, steps_offset=offset)
    _check_shape(ts, steps, final, sched)
    assert len(ts) == (steps if final == "t_min" and ends_at_k0 else steps + 1)
    if final == "t_min":
        assert float(ts[-1]) == sched.t_min
    ks = sched.timestep(ts[:steps] if not (final == "t_min" and ends_at_k0) else ts)
    assert torch.equal(ks, ks.round()), "spacings sit on trained timesteps"


@pytest.mark.parametrize("steps", [1, 4, 5, 10, 20, 25, 50, 120, 999])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_spacings_equal_diffusers_timesteps(spacing, steps):
    sched = SCHEDULES["scaled_linear"]
    ts = make_grid(spacing, sched, steps, final="zero", steps_offset=1)
    ks = sched.timestep(ts[:-1])
    for cls in (DDIMScheduler, DDPMScheduler):
        ref = cls(
            **{k: v for k, v in SD.items() if cls is DDIMScheduler or k != "set_alpha_to_one"},
            timestep_spacing=spacing,
        )
        ref.set_timesteps(steps)
        assert torch.equal(ks, ref.timesteps.to(F64)), (cls.__name__, ks, ref.timesteps)
    if spacing != "linspace":  # Euler's linspace timesteps are fractional (see the module docstring)
        ref = EulerDiscreteScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            steps_offset=1,
            timestep_spacing=spacing,
        )
        ref.set_timesteps(steps)
        assert torch.equal(ks, ref.timesteps.to(F64))
        # diffusers' float32 sqrt((1 - abar) / abar) loses digits to cancellation where abar ~ 1
        assert torch.allclose(sched.sigma_ve(ts), ref.sigmas.to(F64), rtol=5e-5, atol=0)


def test_trailing_never_adds_a_timestep():
    """diffusers gives 122 timesteps (the last -1) for 121 trailing steps; velodiff the first 121."""
    sched = SCHEDULES["scaled_linear"]
    ref = DDIMScheduler(**SD, timestep_spacing="trailing")
    ref.set_timesteps(121)
    ks = sched.timestep(make_grid("trailing", sched, 121)[:-1])
    assert len(ref.timesteps) == 122 and int(ref.timesteps[-1]) == -1  # diffusers' quirk, still there?
    assert torch.equal(ks, ref.timesteps[:121].to(F64))


@pytest.mark.parametrize("steps", [2, 5, 10, 25, 50])
def test_karras_equals_diffusers_karras_sigmas(steps):
    sched = SCHEDULES["scaled_linear"]
    ts = make_grid("karras", sched, steps)
    ref = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, use_karras_sigmas=True
    )
    ref.set_timesteps(steps)
    assert len(ts) == len(ref.sigmas)
    assert torch.allclose(sched.sigma_ve(ts), ref.sigmas.to(F64), rtol=5e-5, atol=0)  # float32, as above


def test_flow_shifted_equals_diffusers_flow_match():
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(12)
    # diffusers shifts its smallest sigma twice (once at init, again in set_timesteps): a schedule
    # whose t_min is the once-shifted value reproduces it
    sched = RectifiedFlow(shift=3.0, t_min=ref.sigma_min)
    ts = make_grid("flow-shifted", sched, 12)
    assert torch.allclose(ts, ref.sigmas.to(F64), rtol=1e-6, atol=1e-7)
    # a shift below 1 (the schedule takes any shift > 0) would end below t_min: it ends at t_min
    low = RectifiedFlow(shift=0.5)
    for final in ("zero", "t_min"):
        ts = make_grid("flow-shifted", low, 10, final=final)
        assert float(ts[-1 if final == "t_min" else -2]) == pytest.approx(low.t_min, rel=1e-12)


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_flux_grid_is_flux_pipelines(shift):
    """FluxPipeline's sigmas: linspace(1, 1/N, N), shifted, then 0 (its last time is the shift of 1/N,
    not t_min); from a t_start it starts there; flows only."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = RectifiedFlow(shift=shift)
    for steps in (1, 4, 28):
        ref = FlowMatchEulerDiscreteScheduler(shift=shift)
        ref.set_timesteps(sigmas=torch.linspace(1.0, 1.0 / steps, steps).tolist())
        ts = make_grid("flux", sched, steps)
        assert torch.allclose(ts, ref.sigmas.to(F64), rtol=1e-6, atol=1e-7)
        with_t_min = make_grid("flux", sched, steps, final="t_min")
        assert torch.equal(with_t_min[:-1], ts[:-1]) and float(with_t_min[-1]) == sched.t_min
        start = make_grid("flux", sched, steps, t_start=0.7)
        assert float(start[0]) == 0.7 and bool((start.diff() < 0).all())
    with pytest.raises(VelodiffError, match="rectified flow's grid"):
        make_grid("flux", DiscreteVP.scaled_linear(), 4)


def test_comfyui_levels_of_a_flow_take_a_shift():
    """ComfyUI's schedulers index a flow's levels shift((k + 1) / N): with ``shift`` the levels of that
    shift (ModelSamplingFlux's exp(mu)) instead of the schedule's; a shift on another schedule is refused."""
    from velodiff.grids import _level

    flow = RectifiedFlow(shift=1.0)
    ts = make_grid("simple", flow, 4, shift=3.0)
    assert torch.allclose(ts, make_grid("simple", RectifiedFlow(shift=3.0), 4))
    ks = torch.tensor([999.0, 749.0, 499.0, 249.0], dtype=F64)
    assert torch.allclose(ts[:-1], flow_shift((ks + 1) / 1000, 3.0))
    assert torch.equal(_level(flow, ks), flow_shift((ks + 1) / 1000, 1.0))
    with pytest.raises(VelodiffError, match="shift is a rectified flow's option"):
        make_grid("simple", DiscreteVP.scaled_linear(), 4, shift=3.0)


@pytest.mark.parametrize(
    "times, match",
    [
        ([0.5, 0.7, 0.0], "strictly decreasing"),
        ([0.9, 0.5, 0.5, 0.0], "strictly decreasing"),
        ([1.5, 0.5, 0.0], "outside the schedule's range"),
        ([0.9, 0.5, -0.1], "outside the schedule's range"),
        ([0.9, 0.0005, 0.0], "t_min"),
        ([0.9, 0.5, 0.0005], "t_min"),
        ([0.9], "at least two"),
        ([0.9, float("nan"), 0.0], "finite"),
    ],
)
def test_explicit_lists_validated(times, match):
    with pytest.raises(VelodiffError, match=match):
        make_grid(times, SCHEDULES["scaled_linear"])


def test_explicit_list_accepted_as_float64():
    ts = make_grid([0.9, 0.5, 0.1, 0.0], SCHEDULES["scaled_linear"])
    assert ts.dtype == F64 and ts.tolist() == [0.9, 0.5, 0.1, 0.0]


def test_grid_errors():
    sched = SCHEDULES["scaled_linear"]
    with pytest.raises(VelodiffError, match="valid: .*karras"):
        make_grid("nope", sched, 10)
    with pytest.raises(VelodiffError, match=r"needs steps in \[1, "):
        make_grid("karras", sched, 0)
    with pytest.raises(VelodiffError, match="t_start"):
        make_grid("karras", sched, 10, t_start=2.0)
    with pytest.raises(VelodiffError, match="discrete"):
        make_grid("leading", EDM(), 10)
    with pytest.raises(VelodiffError, match="exceed"):
        make_grid("trailing", sched, 1001)
    with pytest.raises(VelodiffError, match="valid: "):
        make_grid("karras", sched, 10, final="nope")
    for rho in (0.0, -7.0, float("nan")):  # 0 divided by zero; -7 made a grid of another shape silently
        with pytest.raises(VelodiffError, match="^grid .karras. with options .*: rho must be a number"):
            make_grid("karras", sched, 10, rho=rho)
    with pytest.raises(VelodiffError, match="make_grid's schedule is a NoiseSchedule .*, got str"):
        make_grid("karras", "scaled_linear", 10)
    for steps in ("5", 2.5, True):  # (torch's linspace signature quoted in full before)
        with pytest.raises(VelodiffError, match=r"grid 'karras' needs steps in \[1, "):
            make_grid("karras", sched, steps)


# --- review28: behaviours no test pinned ---------------------------------------------------------------


@pytest.mark.parametrize("grid", ["normal", "sgm_uniform", "simple", "ddim_uniform", "beta", "ays"])
@pytest.mark.parametrize("steps", [1, 4, 10, 25])
def test_comfyui_grids_end_at_the_smallest_level_once_with_final_t_min(grid, steps):
    """final="t_min": a ComfyUI scheduler's levels without its final sigma = 0, ending at the smallest
    level; t_min is appended only where the levels stop above it ("normal" ends at level 0 itself)."""
    sched = SCHEDULES["scaled_linear"]
    zero = make_grid(grid, sched, steps)
    ts = make_grid(grid, sched, steps, final="t_min")
    _check_shape(ts, steps, "t_min", sched)
    want = zero[:-1]
    if float(want[-1]) > sched.t_min:
        want = torch.cat([want, torch.tensor([sched.t_min], dtype=F64)])
    assert torch.equal(ts, want)
    assert float(ts[-1]) == sched.t_min and float(ts[-2]) > sched.t_min


@pytest.mark.parametrize("name", ["edm", "vp"])
@pytest.mark.parametrize("steps", [1, 5, 12])
def test_comfyui_levels_of_a_schedule_without_a_table_are_equally_spaced_in_t(name, steps):
    """A schedule with no trained table and no flow shift gets N = 1000 levels equally spaced in t, level
    0 at t_min and level N - 1 at t_max: "normal" is linspace(t_max, t_min, steps), "sgm_uniform" the
    first ``steps`` of steps + 1 such points."""
    sched = SCHEDULES[name]
    normal = make_grid("normal", sched, steps)
    assert torch.allclose(normal[:-1], torch.linspace(sched.t_max, sched.t_min, steps, dtype=F64),
                          rtol=1e-12, atol=0)
    sgm = make_grid("sgm_uniform", sched, steps)
    want = torch.linspace(sched.t_max, sched.t_min, steps + 1, dtype=F64)[:-1]
    assert torch.allclose(sgm[:-1], want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_spacings_take_as_many_steps_as_trained_timesteps(spacing):
    """As many steps as the schedule's trained timesteps is allowed (diffusers' set_timesteps(1000)):
    every timestep 999 ... 0 once, as diffusers' DDIMScheduler gives them; one more is refused."""
    sched = SCHEDULES["scaled_linear"]
    ts = make_grid(spacing, sched, 1000)
    assert len(ts) == 1001 and float(ts[-1]) == 0.0
    ddim = DDIMScheduler(**{**SD, "steps_offset": 0}, timestep_spacing=spacing)
    ddim.set_timesteps(1000)
    assert sched.timestep(ts[:-1]).round().tolist() == ddim.timesteps.tolist() == list(range(999, -1, -1))
    with pytest.raises(VelodiffError, match="exceed"):
        make_grid(spacing, sched, 1001)


def test_repeat_final_needs_final_t_min_and_two_steps():
    """diffusers' final_sigmas_type="sigma_min" form repeats the last of ``steps`` levels: it needs
    final="t_min" and at least two levels, else one line saying so (not a one-point grid's error)."""
    sched = SCHEDULES["scaled_linear"]
    for grid in ("karras", "exponential", "logsnr"):
        assert len(make_grid(grid, sched, 2, final="t_min", repeat_final=True)) == 2
        for steps, final in ((1, "t_min"), (4, "zero")):
            with pytest.raises(VelodiffError, match="repeat_final needs final='t_min' and steps >= 2"):
                make_grid(grid, sched, steps, final=final, repeat_final=True)


@pytest.mark.parametrize("steps, original", [(50, 50), (20, 20), (7, 50), (1, 1)])
def test_lcm_grid_is_diffusers_lcm_timesteps_up_to_the_original_steps(steps, original):
    """LCMScheduler takes as many steps as the original ones it was distilled on (not one more)."""
    from diffusers import LCMScheduler

    sched = SCHEDULES["scaled_linear"]
    table = {k: SD[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}
    lcm = LCMScheduler(**table, original_inference_steps=original)
    lcm.set_timesteps(steps)
    ts = make_grid("lcm", sched, steps, original_steps=original)
    assert sched.timestep(ts[:-1]).round().tolist() == lcm.timesteps.tolist()
    with pytest.raises(VelodiffError, match="exceed its"):
        make_grid("lcm", sched, original + 1, original_steps=original)


def test_linear_quadratic_starts_at_the_top_of_a_flow_below_t_1():
    """linear_quadratic starts at the schedule's top: a flow whose t_max is below 1 starts there, the
    rest of the schedule as defined (t_i = 1 - u_i)."""
    flow = RectifiedFlow(t_max=0.999)
    ts = make_grid("linear_quadratic", flow, 10)
    assert float(ts[0]) == 0.999
    assert torch.equal(ts[1:], make_grid("linear_quadratic", RectifiedFlow(), 10)[1:])


def test_beta_grid_drops_repeated_levels():
    """ComfyUI's beta scheduler rounds the Beta(0.6, 0.6) quantiles to trained levels and drops repeats
    (at 200 steps two quantiles near the ends round to one level): one level fewer, still a valid grid."""
    import numpy as np
    from scipy.stats import beta

    sched = SCHEDULES["scaled_linear"]
    ks = np.rint(beta.ppf(1 - np.arange(200) / 200, 0.6, 0.6) * 999)
    want = ks[np.r_[True, ks[1:] != ks[:-1]]]
    assert len(want) < 200
    ts = make_grid("beta", sched, 200)
    assert sched.timestep(ts[:-1]).round().tolist() == want.tolist() and float(ts[-1]) == 0.0


def test_discard_penultimate_needs_final_zero():
    """A1111's discard_next_to_last_sigma drops the level before 0: with final="t_min" there is no 0 to
    jump to, so it is refused in one line rather than dropping a real level."""
    sched = SCHEDULES["scaled_linear"]
    assert len(make_grid("karras", sched, 8, discard_penultimate=True)) == 9
    with pytest.raises(VelodiffError, match="discard_penultimate needs final='zero'"):
        make_grid("karras", sched, 8, final="t_min", discard_penultimate=True)
