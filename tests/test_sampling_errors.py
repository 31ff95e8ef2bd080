"""User errors in the sampling core and the CLI: one clear VelodiffError line; callbacks stop."""

import math
import re

import pytest
import torch

from conftest import required_options
from velodiff import SOLVERS, DiscreteVP, ModelDenoiser, VelodiffError, get_solver, make_grid, sample
from velodiff.schedules import F64
from velodiff.solvers import SolverSpec
from velodiff.solvers.ddim import ddim_step

SCHED = DiscreteVP.scaled_linear()
X = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
TS = make_grid("uniform", SCHED, 6)


def eps_net(x, timestep, cond):
    return 0.5 * x


DEN = ModelDenoiser(eps_net, SCHED)


def test_unknown_solver_lists_valid_ones():
    with pytest.raises(VelodiffError) as e:
        sample(DEN, X, TS, "nope")
    msg = str(e.value)
    assert "unknown solver 'nope'" in msg
    for name in ("ddim", "heun", "euler_ancestral", "dpmpp_2m"):
        assert name in msg
    assert "\n" not in msg
    assert get_solver("Heun").name == "heun"  # A1111's label (velodiff.aliases)
    with pytest.raises(VelodiffError, match="valid: .*did you mean 'heun'"):
        get_solver("Hune")


def test_values_of_the_wrong_type_or_size_are_one_line():
    """The Python API's entry points name what they take (they raised AttributeError / TypeError from
    inside, or allocated a grid of 10**11 steps)."""
    from velodiff.plan import Plan

    with pytest.raises(VelodiffError, match="a solver is a name such as 'dpmpp_2m', got int"):
        get_solver(3)
    with pytest.raises(VelodiffError, match="a plan rule or a list of them, got int"):
        Plan.parse(5)
    with pytest.raises(VelodiffError, match=r"needs steps in \[1, 1000000\], got 100000000000"):
        make_grid("uniform", DiscreteVP.scaled_linear(), 10**11)


def test_plain_callable_denoiser_is_refused_in_one_line():
    """A function of (x, t) has no noise schedule: one clear line, not an AttributeError."""
    with pytest.raises(VelodiffError, match="noise schedule.*'eps_net'.*ModelDenoiser") as e:
        sample(eps_net, X, TS, "ddim")
    assert "\n" not in str(e.value)
    with pytest.raises(VelodiffError, match="ModelDenoiser"):
        sample(lambda x, t: x, X, TS, "dpmpp_2m")
    assert sample(ModelDenoiser(eps_net, SCHED), X, TS, "ddim").nfe == len(TS) - 1


def test_unknown_grid_lists_valid_ones():
    with pytest.raises(VelodiffError) as e:
        make_grid("karas", SCHED, 10)
    assert "unknown grid 'karas'" in str(e.value)
    assert all(name in str(e.value) for name in ("karras", "logsnr", "trailing", "flow-shifted"))


def test_too_few_steps():
    with pytest.raises(VelodiffError, match=r"needs steps in \[1, "):
        make_grid("karras", SCHED, 0)
    with pytest.raises(VelodiffError, match="at least two times"):
        sample(DEN, X, torch.tensor([0.5], dtype=F64), "ddim")
    needs_three = SolverSpec(name="three", step=ddim_step, order=1, min_steps=3)
    with pytest.raises(VelodiffError, match="needs at least 3 steps, got 2"):
        sample(DEN, X, torch.tensor([0.9, 0.5, 0.0], dtype=F64), needs_three)


@pytest.mark.parametrize(
    "ts, match",
    [
        ([1.2, 0.5, 0.0], "outside the schedule's range"),
        ([0.9, 0.5, -0.01], "outside the schedule's range"),
        ([0.9, 0.0004, 0.0], "t_min"),
        ([0.5, 0.9, 0.0], "strictly decreasing"),
    ],
)
def test_grid_outside_the_schedule(ts, match):
    with pytest.raises(VelodiffError, match=match):
        sample(DEN, X, torch.tensor(ts, dtype=F64), "ddim")


class NaNAt:
    """An eps network that returns NaN from its `bad`-th call on (0-based)."""

    def __init__(self, bad: int):
        self.bad, self.calls = bad, 0

    def __call__(self, x, timestep, cond):
        self.calls += 1
        out = 0.5 * x
        return out * float("nan") if self.calls > self.bad else out


@pytest.mark.parametrize(
    "solver, bad_call, step",
    [
        ("ddim", 0, 0),
        ("ddim", 3, 3),
        ("dpmpp_2m", 4, 4),
        ("heun", 3, 1),  # calls 0, 1 in step 0; 2, 3 in step 1
        ("heun", 4, 2),
        ("euler_ancestral", 2, 2),
    ],
)
@pytest.mark.parametrize("lazy", [False, True], ids=["cpu", "accelerator-path"])
def test_nan_names_the_step(solver, bad_call, step, lazy, monkeypatch):
    if lazy:  # as on a GPU: checks recorded on the device, the first failure raised after the loop
        from velodiff.sampling import FiniteCheck

        init = FiniteCheck.__init__
        monkeypatch.setattr(FiniteCheck, "__init__", lambda self, lazy: init(self, True))
    with pytest.raises(VelodiffError, match=rf"NaN or inf at step {step}\b"):
        sample(ModelDenoiser(NaNAt(bad_call), SCHED), X, TS, solver)


def test_nan_in_initial_sample():
    with pytest.raises(VelodiffError, match="initial sample"):
        sample(DEN, X * float("nan"), TS, "ddim")


def test_model_output_shape_mismatch():
    def bad_net(x, timestep, cond):
        return x[:, :2]

    with pytest.raises(VelodiffError, match=r"shape \(2, 2, 4\) for input \(2, 3, 4\)"):
        sample(ModelDenoiser(bad_net, SCHED), X, TS, "ddim")

    class BadDenoiser:  # a denoiser that is not a ModelDenoiser: the loop checks and names the step
        schedule = SCHED
        calls = 0

        def __call__(self, x, t, cond=None):
            self.calls += 1
            return x if self.calls < 3 else x[:1]

    with pytest.raises(VelodiffError, match="at step 2"):
        sample(BadDenoiser(), X, TS, "ddim")


def test_unknown_solver_option():
    said = r"solver 'ddim' has no option 'order' \(its options: eta\); 'order' is an option of deis, deis_3, "
    with pytest.raises(VelodiffError, match=said):
        sample(DEN, X, TS, "ddim", order=2)
    with pytest.raises(VelodiffError, match="has no option 'eta'"):
        sample(DEN, X, TS, "heun", eta=1.0)


@pytest.mark.parametrize(
    ("solver", "options", "message"),
    [
        ("ddim", {"eta": float("nan")}, "option eta must be a number in [0, 100], got nan"),  # ran as eta 0
        ("ddim", {"eta": -1.0}, "option eta must be a number in [0, 100], got -1.0"),
        ("ddim", {"eta": 1e9}, "option eta must be a number in [0, 100]"),
        ("sde_dpmpp_2m", {"eta": float("inf")}, "option eta must be a number"),
        ("euler", {"s_churn": -5.0}, "option s_churn must be a number in [0, inf]"),
        ("unipc", {"order": 0}, "option order must be an integer in [1, 10], got 0"),  # ran as order 1
        ("unipc", {"order": 2.5}, "option order must be an integer"),
        ("lms", {"order": 0}, "option order must be an integer in [1, 10]"),  # kept the whole history
        ("deis", {"order": 9}, "option order must be an integer in [1, 3], got 9"),  # ran as order 3
        ("unipc", {"orders": [2, 0]}, "option orders's entry must be an integer in [1, 10], got 0"),
        ("unipc", {"disable_corrector": [-1]}, "option disable_corrector's entry must be an integer in [0"),
        ("unipc", {"use_corrector": "no"}, "option use_corrector must be true or false, got 'no'"),
        ("dpm_adaptive", {"rtol": float("nan")}, "option rtol must be a number in [0, 1], got nan"),  # hung
        ("dpm_adaptive", {"atol": -1.0}, "option atol must be a number in [0, 1]"),
        ("dpm_adaptive", {"accept_safety": 10.0}, "option accept_safety must be a number in (0, 1]"),
        ("dpm_adaptive", {"h_init": 1e-300}, "option h_init must be a number in [1e-06, 10]"),
        ("dpm_adaptive", {"rtol": 0.0, "atol": 0.0}, "rtol and atol are both 0"),  # hung
        ("dpm_adaptive", {"order": 4}, "option order must be an integer in [2, 3], got 4"),
    ],
)
def test_an_option_value_a_solver_cannot_run_is_one_line(solver, options, message):
    """Option values are checked as their names are: a NaN, a negative eta or an order out of range ran
    silently as another setting, and a tolerance dpm_adaptive can never meet looped forever."""
    with pytest.raises(VelodiffError, match=f"^(solver {solver!r}|{solver}): {re.escape(message)}"):
        sample(DEN, X, TS, solver, **options)


def test_dpm_adaptive_gives_up_on_an_interval_it_cannot_cross(monkeypatch):
    """The adaptive controller's tries per grid interval are bounded (k-diffusion's are not): a step it
    never accepts is one line naming the step, not a run that never ends."""
    import velodiff.solvers.dpm_fast as dpm_fast

    monkeypatch.setattr(dpm_fast, "MAX_ATTEMPTS", 3)
    with pytest.raises(VelodiffError, match=r"^dpm_adaptive: step 0 reached only log-SNR .* in 3 tries"):
        sample(DEN, X, TS, "dpm_adaptive", rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_callback_true_stops_and_returns_x0(solver):
    seen = []

    def callback(info):
        seen.append(info)
        return info.i == 1

    res = sample(DEN, X, TS, solver, callback=callback, **required_options(solver, DEN.schedule))
    assert res.stopped and res.steps == 2 and [s.i for s in seen] == [0, 1]
    assert torch.equal(res.x, seen[-1].x0)
    assert seen[-1].t_from == float(TS[1]) and seen[-1].t == float(TS[2])  # x0 made at t_from, x is at t
    full = sample(DEN, X, TS, solver, callback=lambda info: None, **required_options(solver, DEN.schedule))
    assert not full.stopped and full.steps == len(TS) - 1


@pytest.mark.parametrize("args, message", [
    (["--solvers", "nope"], "error: unknown solver 'nope'; valid: "),
    (["--grids", "karas"], "error: unknown grid 'karas'; valid: "),
    (["--solvers", "euler_ancestral"], "error: solver 'euler_ancestral' is stochastic"),
    (["--nfe", "0"], "error: --nfe takes comma-separated integers in [1, 1000]"),
])
def test_cli_bench_solvers_bad_input_is_one_line(args, message, tmp_path, capsys):
    from velodiff.cli import main

    rc = main(["bench", "solvers", "--json", str(tmp_path / "b.json"), "--no-progress", *args])
    out = capsys.readouterr()
    assert rc == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), out.err
    assert "Traceback" not in out.err + out.out
    assert not list(tmp_path.iterdir())  # refused before any work or output


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"x": X.numpy()}, "x is a torch tensor, got ndarray"),
        ({"x": X > 0}, "x is a floating-point tensor with a batch axis, got torch.bool"),
        ({"x": torch.complex(X, X)}, "x is a floating-point tensor with a batch axis, got torch.complex128"),
        ({"x": torch.tensor(1.0)}, "x is a floating-point tensor with a batch axis"),
        ({"ts": None}, "ts is a list or tensor of times, got NoneType"),
        ({"seed": 2**64}, "seed 18446744073709551616 is outside torch's seed range"),  # ran as seed 0
        ({"seed": 1.5}, "a seed is an integer, got 1.5"),  # ran as seed 1
        ({"seed": "1"}, "a seed is an integer, got '1'"),
        ({"grad": "no"}, "grad is True or False, got 'no'"),  # ran with gradients
        ({"callback": 5}, "callback is a function of the step, got int"),
        ({"noise": 3}, "noise is a function of the step, got int"),
        ({"noise": lambda i: torch.zeros(1)}, "noise(0) returned (1,); a step's noise has the sample's"),
        ({"callback": lambda info: "no"}, "the callback returns None or False (go on), True (stop) or a"),
        ({"callback": lambda info: 1}, "the callback returns None or False"),  # stopped the run
        ({"callback": lambda info: info.x * float("nan")}, "the callback returned an x holding NaN or inf"),
        ({"context": 5}, "context maps RunInfo fields to values, got int"),
        ({"context": {"bogus": 1}}, "context has no field 'bogus'; RunInfo's fields: schedule, ts"),
    ],
)
def test_sample_arguments_are_checked_before_the_run(kwargs, message):
    """sample() is the documented core: an argument of the wrong kind is one line naming it, not a
    traceback from torch, a noise broadcast over the batch, or a run as something else (seed 2**64 as 0,
    a truthy callback reply as a stop, grad='no' with gradients)."""
    args = {"x": X, "ts": TS, "solver": "euler_ancestral", **kwargs}
    with pytest.raises(VelodiffError, match=f"^{re.escape(message)}"):
        sample(DEN, **args)
    assert sample(DEN, X, TS, "euler_ancestral", callback=lambda info: False).steps == len(TS) - 1


def test_denoise_once_checks_its_time_and_sample():
    """denoise_once (one evaluation, for tests and notebooks) refuses what sample() refuses: a time that
    is not finite or outside the schedule (a NaN time gave a NaN prediction, t = 5 one of 1e11), a sample
    holding NaN, a time per sample of another count."""
    from velodiff.sampling import denoise_once

    for t, message in ((float("nan"), "t must be finite"), (-1.0, "time -1 is outside the schedule's range"),
                       (5.0, "time 5 is outside the schedule's range"),
                       (torch.tensor([0.5, 0.5, 0.5]), r"t is one time or one per sample \(2\)")):
        with pytest.raises(VelodiffError, match=message):
            denoise_once(DEN, X, t)
    with pytest.raises(VelodiffError, match="x contains NaN or inf"):
        denoise_once(DEN, X * float("nan"), 0.5)
    assert denoise_once(DEN, X, 0.5).x0.shape == X.shape


def test_an_unknown_name_of_any_length_is_one_short_line():
    """A pasted 10 000-character name is quoted cut, with how much was left out (the line repeated it
    whole: 10 255 characters); near names are still suggested for short ones."""
    from velodiff import Plan

    cut = r"^unknown plan rule 'x{80}'\.\.\. \(9920 more characters\); valid: "
    with pytest.raises(VelodiffError, match=cut) as e:
        Plan.parse("x" * 10_000)
    assert len(str(e.value)) < 1000
    with pytest.raises(VelodiffError, match="did you mean 'pag'"):
        Plan.parse("pga")


def test_numbers_are_pythons_or_numpys_and_never_bools() -> None:
    """One rule for every number a user passes (velodiff.limits): numpy scalars count, True does not, and
    a guidance scale that is not a number is one line, not torch's or math's TypeError."""
    import numpy as np

    from velodiff.limits import check_guidance, check_strength, is_integer, is_number

    assert all(is_number(v) for v in (1, 2.5, np.float32(0.5), np.int64(3), math.inf))
    assert not any(is_number(v) for v in (True, "2", None, [1.0], torch.tensor(1.0)))
    assert all(is_integer(v) for v in (0, -7, np.int64(3), np.uint8(2)))
    assert not any(is_integer(v) for v in (False, 2.0, np.float64(2.0), "2"))
    assert check_guidance(np.float32(2.5)) == 2.5 and check_strength(np.float64(0.5)) == 0.5
    for bad in ("2", None, True, math.nan, -1):
        with pytest.raises(VelodiffError, match="guidance scale must be a finite number >= 0"):
            check_guidance(bad)


def test_nan_is_blamed_on_the_branch_or_on_the_rules_that_made_it():
    """A guidance scale that overflows w * (c - u) made NaN of finite predictions: the plan's rules are named,
    not the model; a NaN in one branch names that branch."""
    from velodiff import GuidedCond

    cond = GuidedCond(torch.ones(2, 1, 1, dtype=F64), -torch.ones(2, 1, 1, dtype=F64))

    def net(x, timestep, c):  # cond and uncond rows differ by 2 * 1e300: finite, but not once scaled
        return 1e300 * c.expand_as(x)

    den = ModelDenoiser(net, SCHED)
    with pytest.raises(VelodiffError, match=r"the plan's rules \(guidance scale 1e\+300\) made NaN or inf of "
                                            r"finite predictions at step 0"):
        sample(den, X, TS, "ddim", cond=cond, plan="cfg:scale=1e300")
    nan_uncond = ModelDenoiser(lambda x, timestep, c: torch.where(c < 0, math.nan, x), SCHED)
    with pytest.raises(VelodiffError, match="the model returned NaN or inf at step 0 .* for branch 'uncond'"):
        sample(nan_uncond, X, TS, "ddim", cond=cond, plan="cfg:scale=2")


@pytest.mark.parametrize(
    ("solver", "options", "message"),
    [
        ("lcm", {"timestep_scaling": 0.0}, "option timestep_scaling must be a number in (0, 10000], got 0.0"),
        ("dpm_adaptive", {"accept_safety": 0.0}, "option accept_safety must be a number in (0, 1], got 0.0"),
        ("dpmpp_sde", {"r": 0.0}, "option r must be a number in (0, 1], got 0.0"),
    ],
)
def test_an_open_lower_bound_refuses_its_end(solver, options, message):
    """OPTION_VALUES' open bounds exclude their end before the run (timestep_scaling 0 made LCM return
    its input as x0; accept_safety 0 accepted every step)."""
    with pytest.raises(VelodiffError, match=f"^solver {solver!r}: {re.escape(message)}"):
        sample(DEN, X, TS, solver, **options)


def test_a_grid_just_above_the_schedules_top_is_refused():
    """Times above t_max are outside the schedule, to rounding (a grid from 1.001 on a discrete schedule
    asked the network for an untrained timestep)."""
    with pytest.raises(VelodiffError, match="outside the schedule's range"):
        sample(DEN, X, torch.tensor([1.001, 0.5, 0.0], dtype=F64), "ddim")


# --- review27: a stop on the accelerator path, the rules' checks in denoise_once --------------------


def test_a_stopped_run_still_raises_the_nan_it_met(monkeypatch):
    """On an accelerator the checks are read after the loop: a callback that stops the run after a NaN
    (here at step 0, stopped at step 1) still gets the error naming the step, not the NaN as x0."""
    from velodiff.sampling import FiniteCheck

    init = FiniteCheck.__init__
    monkeypatch.setattr(FiniteCheck, "__init__", lambda self, lazy: init(self, True))
    with pytest.raises(VelodiffError, match=r"NaN or inf at step 0\b"):
        sample(ModelDenoiser(NaNAt(0), SCHED), X, TS, "ddim", callback=lambda info: info.i == 1)


def test_denoise_once_refuses_what_a_rule_refuses():
    from velodiff import GuidedCond
    from velodiff.sampling import denoise_once

    cond = GuidedCond(torch.ones(2, 3, 4, dtype=F64), torch.zeros(2, 3, 4, dtype=F64))
    with pytest.raises(VelodiffError, match="plan rule 'compose' needs prompts"):
        denoise_once(DEN, X, 0.5, cond, "compose")


def test_a_callers_brownian_noise_is_checked_too():
    """A caller's noise source with ``between`` (a Brownian one, for dpmpp_sde) has those draws checked to
    have the sample's shape as well, not broadcast over the batch."""

    class Source:
        def __call__(self, i):
            return torch.zeros_like(X)

        def between(self, t_from, t_to):
            return torch.zeros_like(X[:1])

    with pytest.raises(VelodiffError, match=r"^between\(\) returned \(1, 3, 4\); a step's noise has the"):
        sample(DEN, X, TS, "dpmpp_sde", noise=Source())


def test_limits_include_their_ends_and_errors_read_well():
    """check_guidance takes [0, high] (0 is a valid scale: unconditional), check_strength [0, 1] or, with
    zero=False, (0, 1]; a foreign error is quoted by its first line (its type's name when empty); the
    valid names of an unknown one are listed sorted."""
    from velodiff.errors import first_line, unknown_name
    from velodiff.limits import check_guidance, check_strength

    assert check_guidance(0) == 0.0 and check_guidance(3, high=3) == 3.0
    with pytest.raises(VelodiffError, match=r"must be a finite number in \[0, 3\], got 3.5"):
        check_guidance(3.5, high=3)
    assert (check_strength(0), check_strength(1), check_strength(1, zero=False)) == (0.0, 1.0, 1.0)
    for value, zero, message in ((0, False, r"must be in \(0, 1\]"), (-0.1, True, r"must be in \[0, 1\]"),
                                 (1.5, False, r"must be in \(0, 1\]")):
        with pytest.raises(VelodiffError, match=message):
            check_strength(value, zero=zero)
    assert first_line(RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")) == "CUDA out of memory."
    assert first_line(KeyError()) == "KeyError"
    assert str(unknown_name("solver", "zzz", ["b", "c", "a"])) == "unknown solver 'zzz'; valid: a, b, c"


def test_denoise_once_checks_its_run_as_sample_does():
    """denoise_once refuses in one line what sample() refuses of a run: a context that is no mapping or
    names no RunInfo field, and plan settings (a pipeline's solver and steps)."""
    from velodiff.sampling import denoise_once

    den = ModelDenoiser(lambda x, t, c: 0.5 * x, DiscreteVP.scaled_linear())
    x = torch.randn(2, 3, dtype=torch.float64)
    for kw, said in (({"context": {"bogus": 1}}, "context has no field 'bogus'"),
                     ({"context": 5}, "context maps RunInfo fields to values, got int"),
                     ({"plan": "nfe=8"}, "plan settings (nfe)")):
        with pytest.raises(VelodiffError) as e:
            denoise_once(den, x, 0.5, **kw)
        assert str(e.value).startswith(said) and "\n" not in str(e.value)
    assert denoise_once(den, x, 0.5).x0.shape == (2, 3)
