"""The step plan (velodiff.plan): plan strings, the accelerator lifecycle, cost counted after the call,
approximate evaluations and the solvers' answer to them, callbacks that edit x, gradients; and that
the seam changes nothing without a plan (bit-identical to the loop as it was before the seam)."""

from dataclasses import replace

import pytest
import torch

from conftest import required_options
from velodiff import (
    SOLVERS,
    DiscreteVP,
    GuidedCond,
    ModelDenoiser,
    Plan,
    VelodiffError,
    get_solver,
    make_grid,
)
from velodiff.denoisers import Cost, concat_cond
from velodiff.noise import BrownianNoise, GaussianNoise
from velodiff.oracle import GaussianMixture, MixtureDenoiser, starting_noise
from velodiff.plan import Accelerator, EvalResult, Option, register_rule
from velodiff.sampling import sample
from velodiff.schedules import F64
from velodiff.solvers import StepContext

SCHED = DiscreteVP.scaled_linear()
MIX = GaussianMixture.random((16,), components=3, seed=1)
ORACLE = MixtureDenoiser(MIX, SCHED)
X = starting_noise((16,), 2, seed=3)
COND = torch.linspace(-1, 1, 32, dtype=F64).reshape(2, 16)
UNCOND = torch.zeros(2, 16, dtype=F64)


def network(x, timestep, cond):
    k = timestep.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) / 1000.0
    return torch.tanh(0.7 * x + cond * (1.0 + k)) + 0.3 * cond - 0.2 * k


TOY = ModelDenoiser(network, SCHED)


# --- the plan string -------------------------------------------------------------------------------


def test_plan_strings_canonical_and_errors():
    p = Plan.parse("pag:pag_scale=2 + ag:threshold=0.999")
    assert str(p) == "ag:threshold=0.999+pag:scale=2"  # by layer, aliases resolved, numbers as %g
    assert str(Plan.parse(str(p))) == str(p)
    assert str(Plan.parse("none")) == str(Plan.parse("")) == str(Plan.parse(None)) == "none"
    assert str(Plan.parse("pag:applied_layers=mid|up")) == "pag:applied_layers=mid|up"
    for bad, message in [
        ("agg", "unknown plan rule 'agg'; valid: ag, "),
        ("ag:thresh=0.9", "plan rule 'ag' has no option 'thresh'; options: scale, start, stop, threshold"),
        ("ag:threshold=2", "plan rule 'ag' option 'threshold' must be in [-1, 1], got 2"),
        ("ag:threshold=high", "plan rule 'ag' option 'threshold': 'high' is not a float"),
        ("ag:threshold", "plan rule 'ag': write options as key=value, got 'threshold'"),
        ("ag:threshold=0.9,threshold=0.8", "plan rule 'ag': option 'threshold' given twice"),
        ("ag+apg", "plan rules 'ag' and 'apg' both claim the 'uncond' branch; keep one"),
        ("deepcache+fbcache", "plan rules 'deepcache' and 'fbcache' are both a feature cache; keep one"),
        ("int8+int8:activations=dynamic", "plan rules 'int8' and 'int8' are both a quantization; keep one"),
        ("feature_change+feature_change", "plan rules 'feature_change' and 'feature_change' are both the"),
        ("linear_ag:every=1", "plan rule 'linear_ag' option 'every' must be in [2, 1000], got 1"),
        ("cfg:scale=nan", "plan rule 'cfg' option 'scale' must be finite"),
        ("pag:applied_layers=mid|[", "plan rule 'pag' option 'applied_layers': '[' is not a regular expr"),
        ("feature_change:blocks=(", "plan rule 'feature_change' option 'blocks': '(' is not a regular"),
        ("steps=100000000+ag", "plan setting steps must be in [1, 1000], got 100000000"),
        ("rescale+rescale", "plan rule 'rescale' given twice; keep one"),  # it was applied twice
        ("steps=2+ag+steps=5", "plan setting 'steps' given twice; keep one"),  # the last silently won
        ("cfg:start=0.9,stop=0.1", "plan rule 'cfg': start (0.9) must not exceed stop (0.1)"),  # at parse
        ("ag+", "plan item '' names no rule (a '+' with nothing after it?)"),
        (["rescale", "rescale:phi=0.3"], "plan rule 'rescale' given twice; keep one"),  # a list, too
        (["steps=8", "steps=5"], "plan setting 'steps' given twice; keep one"),
    ]:
        with pytest.raises(VelodiffError) as e:
            Plan.parse(bad)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_canonical_strings_keep_every_digit_and_parse_back():
    """str(plan) is what a server, a sweep and a set store and run again: the same values, exactly,
    and never an exponent's '+' (which joins plan items); a typed '1e+3' is a number."""
    for text, key, value in [
        ("ag:threshold=0.9999995", "threshold", 0.9999995),  # was written 'threshold=1'
        ("cfg:scale=7.1234567", "scale", 7.1234567),
        ("cfg:t_hi=1000000", "t_hi", 1e6),  # was written 't_hi=1e+06', which did not parse
        ("cfg:scale=1e+3", "scale", 1000.0),
        ("cfg:scale=2.5e-1", "scale", 0.25),
    ]:
        written = str(Plan.parse(text))
        assert "e+" not in written
        assert Plan.parse(written).rules[0].values[key] == value, (text, written)
    assert str(Plan.parse("cfg:scale=2.5+pag:scale=3")) == "cfg:scale=2.5+pag:scale=3"  # short as before
    # a text option holding the plan's separators (given from Python) has no string: refused when set
    from velodiff.plan import parse_rule

    assert str(Plan.parse("sld:concept=red triangle")) == "sld:concept=red triangle"
    for text in ("red, big triangle", "circle+square", "a # b"):
        with pytest.raises(VelodiffError, match="could not be written back as a string"):
            Plan([type(parse_rule("sld"))(concept=text)])


def test_plan_settings_and_plan_files(tmp_path):
    """A plan may fix the run (solver, grid, steps or nfe, guidance): parsed, canonical (settings
    first), read from @FILE (one item per line, comments), each bad value one line."""
    p = Plan.parse("ag:threshold=0.99+solver=unipc+nfe=8+guidance=3")
    assert p.settings == {"solver": "unipc", "nfe": 8, "guidance": 3.0}
    assert str(p) == "solver=unipc+nfe=8+guidance=3+ag:threshold=0.99" == str(Plan.parse(str(p)))
    f = tmp_path / "plan.txt"
    f.write_text("# found by velodiff tune\nsolver=unipc\nnfe=8   # budget\n\nag:threshold=0.99\n")
    assert str(Plan.parse(f"@{f}")) == "solver=unipc+nfe=8+ag:threshold=0.99"
    assert str(Plan.parse(["solver=ddim", "ag"])) == "solver=ddim+ag"
    (tmp_path / "empty.txt").write_text("# nothing\n")
    for bad, message in [
        ("solver=nope", "unknown solver 'nope'"),
        ("steps=0", "plan setting steps must be in [1, 1000], got 0"),
        ("nfe=x", "plan setting nfe='x': not an integer"),
        ("guidance=-1", "plan setting guidance must be a finite number >= 0"),
        ("sampler=ddim", "unknown plan setting 'sampler'; valid: grid, guidance, nfe, solver, steps"),
        ("steps=4+nfe=8", "a plan sets steps or nfe, not both"),
        (f"@{tmp_path / 'missing.txt'}", "cannot read the plan file"),
        (f"@{tmp_path / 'empty.txt'}", "the plan file"),
    ]:
        with pytest.raises(VelodiffError) as e:
            Plan.parse(bad)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(VelodiffError, match="sample\\(\\) and denoise_once\\(\\) take them"):
        sample(TOY, X, make_grid("logsnr", SCHED, 4), "ddim", cond=COND, plan="solver=euler")


# --- lifecycle, stacking, cost ---------------------------------------------------------------------


class Recorder(Accelerator):
    """Logs its lifecycle; at layer `layer`."""

    name = "recorder"

    def __init__(self, log, tag, layer=0):
        super().__init__()
        self.log, self.tag, self.layer = log, tag, layer

    def begin(self, run):
        super().begin(run)
        self.log.append((self.tag, "begin"))

    def evaluate(self, req, inner):
        self.log.append((self.tag, "eval", req.step, req.stage))
        return inner(req)

    def after_step(self, info):
        self.log.append((self.tag, "after", info.i))

    def end(self):
        self.log.append((self.tag, "end"))


def test_lifecycle_order_and_end_on_failure():
    log = []
    outer, inner = Recorder(log, "outer", layer=5), Recorder(log, "inner", layer=1)
    ts = make_grid("uniform", SCHED, 2)
    sample(ORACLE, X, ts, "heun", plan=[inner, outer])  # given inner first: layers decide
    evals = [e for e in log if e[1] == "eval"]
    assert log[:2] == [("outer", "begin"), ("inner", "begin")]
    assert log[-2:] == [("inner", "end"), ("outer", "end")]
    assert [e[2:] for e in evals[::2]] == [(0, 0), (0, 1), (1, 0)]  # heun: 2 stages, then the final jump
    assert all(evals[k][0] == "outer" and evals[k + 1][0] == "inner" for k in range(0, len(evals), 2))
    assert [e for e in log if e[1] == "after"] == [("inner", "after", 0), ("outer", "after", 0),
                                                   ("inner", "after", 1), ("outer", "after", 1)]

    log.clear()

    def nan_net(x, timestep, cond):
        return x * float("nan")

    with pytest.raises(VelodiffError, match="NaN"):
        sample(ModelDenoiser(nan_net, SCHED), X, ts, "ddim", plan=[outer])
    assert log[-1] == ("outer", "end")  # hooks come off however the run ends


def test_an_end_that_fails_after_a_good_run_is_raised_and_the_others_still_end():
    """A rule that cannot take its hooks off would leave the next run on that network altered: its
    error is raised, after every other rule has ended."""
    log = []

    class StuckEnd(Recorder):
        def end(self):
            super().end()
            raise RuntimeError("hooks stuck")

    outer, stuck = Recorder(log, "outer", layer=5), StuckEnd(log, "stuck", layer=1)
    with pytest.raises(RuntimeError, match="hooks stuck"):
        sample(ORACLE, X, make_grid("uniform", SCHED, 2), "ddim", plan=[outer, stuck])
    assert log[-2:] == [("stuck", "end"), ("outer", "end")]


def test_a_rule_whose_begin_fails_is_ended_too():
    """A begin that raises half-way (after installing something) is undone at once, the rules begun
    before it too, and the begin's error is the one raised even if that end fails."""
    log = []

    class HalfBegun(Recorder):
        def begin(self, run):
            super().begin(run)  # "installed"
            raise VelodiffError("begin failed")

        def end(self):
            super().end()
            raise RuntimeError("nothing to undo")

    outer, failing = Recorder(log, "outer", layer=5), HalfBegun(log, "failing", layer=1)
    with pytest.raises(VelodiffError, match="begin failed"):
        sample(ORACLE, X, make_grid("uniform", SCHED, 2), "ddim", plan=[outer, failing])
    assert log == [("outer", "begin"), ("failing", "begin"), ("failing", "end"), ("outer", "end")]


class Skipper(Accelerator):
    """Answers odd steps without the network (a cache would): free, and not exact."""

    name = "skipper"

    def begin(self, run):
        super().begin(run)
        self.last = None

    def evaluate(self, req, inner):
        if req.step % 2 and self.last is not None:  # every requested branch, from the last evaluation
            return EvalResult(self.last.x0, dict(self.last.parts), Cost(0, 0), exact=False)
        self.last = inner(req)
        return self.last


def test_cost_is_counted_after_the_call():
    calls = []

    def counting(x, timestep, cond):
        calls.append(x.shape[0])
        return network(x, timestep, cond)

    den = ModelDenoiser(counting, SCHED)
    ts = make_grid("uniform", SCHED, 6)
    res = sample(den, X, ts, "ddim", cond=COND, plan=[Skipper()])
    assert res.nfe == len(calls) == 3 and res.evals == 3
    calls.clear()
    res = sample(den, X, ts, "ddim", cond=GuidedCond(COND, UNCOND), plan=[Skipper(), "cfg:scale=3"])
    assert res.nfe == 3 and res.evals == 6 and calls == [4, 4, 4]


# --- approximate evaluations and the solvers ---------------------------------------------------------


class AllApproximate(Accelerator):
    name = "all_approximate"

    def evaluate(self, req, inner):
        r = inner(req)
        r.exact = False
        return r


MULTISTEP = ["dpmpp_2m", "dpmpp_3m", "deis", "deis_3", "ipndm", "lms", "unipc", "unipc_3"]


@pytest.mark.parametrize("solver", MULTISTEP)
def test_multistep_solvers_drop_to_first_order_on_approximate_evaluations(solver):
    """Every evaluation approximate: no history point may enter a higher-order term and UniPC skips its
    corrector, so each multistep solver takes DDIM's steps (to round-off)."""
    ts = make_grid("logsnr", SCHED, 8)
    got = sample(ORACLE, X, ts, solver, plan=[AllApproximate()]).x
    ddim = sample(ORACLE, X, ts, "ddim").x
    exact = sample(ORACLE, X, ts, solver).x
    assert torch.allclose(got, ddim, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(exact, ddim, rtol=1e-4, atol=1e-4)  # with exact evaluations they differ


def test_usable_order_restarts_after_an_estimate():
    from velodiff.solvers.base import EvalRecord, usable_order

    record = EvalRecord()
    for step, exact in enumerate([True, True, False, True, True, True]):
        record.note(step, exact, None)
    ctx = StepContext(denoise=None, schedule=SCHED, ts=torch.zeros(7), alphas=torch.ones(7), sigmas=None,
                      lambdas=None, noise=None, record=record)
    assert [usable_order(ctx, i, 3) for i in range(6)] == [1, 2, 1, 1, 2, 3]
    # an evaluation at alpha = 0 (pure noise: infinite rho and lambda) joins no multistep formula
    exact = EvalRecord()
    for step in range(6):
        exact.note(step, True, None)
    ctx = replace(ctx, alphas=torch.tensor([0.0, 1, 1, 1, 1, 1, 1]), record=exact)
    assert [usable_order(ctx, i, 3) for i in range(5)] == [1, 1, 2, 3, 3]


# --- callbacks edit x; rules edit x; gradients ---------------------------------------------------------


def test_callback_returns_an_edited_x():
    ts = make_grid("uniform", SCHED, 5)
    start = torch.full_like(X, 0.3)

    def reset(info):
        return start if info.i == 0 else None

    edited = sample(TOY, X, ts, "ddim", cond=COND, callback=reset).x
    assert torch.equal(edited, sample(TOY, start, ts[1:], "ddim", cond=COND).x)
    with pytest.raises(VelodiffError, match=r"the callback returned x of shape \(1, 16\)"):
        sample(TOY, X, ts, "ddim", cond=COND, callback=lambda info: start[:1])


class Clamp(Accelerator):
    name = "clamp"

    def after_step(self, info):
        return info.x.clamp(-0.1, 0.1)


def test_rule_edits_before_the_callback_sees_x():
    seen = []
    ts = make_grid("uniform", SCHED, 4)
    sample(TOY, X, ts, "ddim", cond=COND, plan=[Clamp()], callback=lambda info: seen.append(info.x))
    assert all(float(x.abs().max()) <= 0.1 for x in seen)


class NeedsGrad(Accelerator):
    name = "needs_grad"
    needs_grad = True


def test_gradients_only_when_asked():
    ts = make_grid("uniform", SCHED, 3)
    x = X.clone().requires_grad_(True)
    assert not sample(TOY, x, ts, "ddim", cond=COND).x.requires_grad  # inference mode by default
    for kw in ({"grad": True}, {"plan": [NeedsGrad()]}):
        out = sample(TOY, x, ts, "ddim", cond=COND, **kw).x
        (g,) = torch.autograd.grad(out.sum(), x)
        assert torch.isfinite(g).all() and float(g.abs().sum()) > 0


def test_state_never_leaks_between_runs():
    """One plan object run twice (adaptive guidance keeps per-image state) gives the same result."""
    ts = make_grid("uniform", SCHED, 8)
    plan = Plan.parse("ag:threshold=0.9,scale=3")
    runs = [sample(TOY, X, ts, "dpmpp_2m", cond=GuidedCond(COND, UNCOND), plan=plan) for _ in range(2)]
    fresh = sample(TOY, X, ts, "dpmpp_2m", cond=GuidedCond(COND, UNCOND), plan="ag:threshold=0.9,scale=3")
    assert torch.equal(runs[0].x, runs[1].x) and torch.equal(runs[0].x, fresh.x)
    assert runs[0].evals == runs[1].evals == fresh.evals < 2 * runs[0].nfe


# --- the seam changes nothing without a plan ---------------------------------------------------------


def old_loop(denoiser, x, ts, solver, cond, scale):
    """The sampling loop as it was before the seam: the solver's denoise is the guided denoiser itself
    (CFG on one batched call, Ho & Salimans Eq. 6 on x0)."""
    spec = get_solver(solver)

    def denoise(x_in, t):
        if scale == 1.0:
            return denoiser(x_in, t, cond.cond)
        x0_c, x0_u = denoiser(torch.cat([x_in, x_in]), t, concat_cond(cond.cond, cond.uncond)).chunk(2)
        return x0_u + scale * (x0_c - x0_u)

    ts = torch.as_tensor(ts, dtype=F64)
    noise = None
    if spec.noise != "none":  # sample()'s default noise for a seed of 0
        noise = BrownianNoise(x, 0, ts) if spec.noise == "brownian" else GaussianNoise(x, 0)
    ctx = StepContext(denoise=denoise, schedule=SCHED, ts=ts, alphas=SCHED.alpha(ts), sigmas=SCHED.sigma(ts),
                      lambdas=SCHED.log_snr(ts), noise=noise,
                      options={**spec.defaults, **required_options(spec.name, SCHED)})
    state = None
    for i in range(ctx.steps):
        x, _, state = spec.step(ctx, i, x, state)
    return x


@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("scale", [1.0, 3.5])
def test_no_plan_is_bit_identical_to_the_loop_before_the_seam(solver, scale):
    ts = make_grid("logsnr", SCHED, 7)
    cond = GuidedCond(COND, UNCOND)
    plan = "none" if scale == 1.0 else f"cfg:scale={scale}"
    got = sample(TOY, X, ts, solver, cond=cond.cond if scale == 1.0 else cond, plan=plan,
                 **required_options(solver, SCHED)).x
    assert torch.equal(got, old_loop(TOY, X.clone(), ts, solver, cond, scale))


def test_rule_options_are_declared_and_checked():
    @register_rule
    class Tmp(Accelerator):
        name = "tmp_rule_for_test"
        options = {"k": Option(2, "an int", kind=int, lo=1, hi=4),
                   "mode": Option("a", "a or b", kind=str, choices=("a", "b"))}

    try:
        assert Plan.parse("tmp_rule_for_test:k=3,mode=b").rules[0].k == 3
        with pytest.raises(VelodiffError, match="unknown value"):
            Plan.parse("tmp_rule_for_test:mode=c")
        with pytest.raises(VelodiffError, match=r"must be in \[1, 4\]"):
            Tmp(k=9)
    finally:
        from velodiff.plan import RULES

        RULES.pop("tmp_rule_for_test")


def test_a_branch_with_its_own_input_and_rows():
    """``with_branch(..., rows, x)``: the branch is the denoiser at its own input, for its rows only, in
    the same batched call as the others (one NFE); the other branches see x."""
    from velodiff.plan import EvalRequest, branch_evaluator

    t = torch.tensor(500.0, dtype=F64)
    other = X + 0.5
    req = EvalRequest(0, 0, t, X, {"cond": COND, "uncond": UNCOND}).with_branch("uncond")
    req = req.with_branch("own", COND.flip(0), rows=torch.tensor([1]), x=other)
    r = branch_evaluator(TOY)(req)
    assert r.cost == Cost(1, 2.5)
    assert torch.allclose(r.parts["cond"], TOY(X, t, COND))
    assert torch.allclose(r.parts["uncond"], TOY(X, t, UNCOND))
    assert torch.allclose(r.parts["own"], TOY(other[1:], t, COND.flip(0)[1:]))
    with pytest.raises(VelodiffError, match="own input needs a new branch"):
        req.with_branch("cond", x=other)
    # a branch a rule above asked for on every row stays whole when a rule below asks for some rows
    whole = EvalRequest(0, 0, t, X, {"cond": COND, "uncond": UNCOND}).with_branch("uncond")
    assert whole.with_branch("uncond", rows=torch.tensor([0])).size("uncond") == X.shape[0]


@pytest.mark.parametrize("solver", ["sde_dpmpp_2m", "sde_dpmpp_3m", "dpm_solver_v3"])
def test_the_other_multistep_solvers_drop_to_first_order_on_approximate_evaluations(solver):
    """As above for the SDE multistep solvers without noise (eta 0) and DPM-Solver-v3 with degenerate
    statistics (its corrector skipped too): DDIM's steps, v3's to its integral tables' accuracy."""
    ts = make_grid("logsnr", SCHED, 8)
    opts = {"eta": 0.0} if solver.startswith("sde") else required_options(solver, SCHED)
    tol = 1e-9 if solver.startswith("sde") else 1e-4
    got = sample(ORACLE, X, ts, solver, plan=[AllApproximate()], **opts).x
    ddim = sample(ORACLE, X, ts, "ddim").x
    exact = sample(ORACLE, X, ts, solver, **opts).x
    assert torch.allclose(got, ddim, rtol=tol, atol=tol)
    assert not torch.allclose(exact, ddim, rtol=1e-2, atol=1e-2)


# --- review27: option parsing, plan composition, the batched call's rows ------------------------------


def test_option_values_parse_and_bounds_are_inclusive():
    """An option's string parses as documented (bools: true/false/1/0/yes/no), an int option refuses a
    fraction and a bool (2.5 ran as 2, True as 1), and its range [lo, hi] includes both ends."""
    from velodiff.plan import RULES, check_option

    flag = Option(False, "a flag", kind=bool)
    pairs = [("yes", True), ("no", False), ("1", True), ("0", False), ("TRUE", True), ("False", False)]
    for text, value in pairs:
        assert check_option("r", "flag", flag, text) is value, text

    @register_rule
    class Tmp(Accelerator):
        name = "tmp_rule_for_review27"
        options = {"k": Option(2, "an int", kind=int, lo=1, hi=4),
                   "f": Option(0.5, "a float", lo=0.0, hi=1.0)}

    try:
        assert (Tmp(k=1).k, Tmp(k=4).k, Tmp(k=3.0).k) == (1, 4, 3)
        assert (Tmp(f=0.0).f, Tmp(f=1).f) == (0.0, 1.0)
        assert Plan.parse("tmp_rule_for_review27:k=4,f=1").rules[0].values == {"k": 4, "f": 1.0}
        for bad, message in [({"k": 2.5}, "is not a int"), ({"k": True}, "is not a int"),
                             ({"k": 0}, r"must be in \[1, 4\]"), ({"f": 1.5}, r"must be in \[0, 1\]")]:
            with pytest.raises(VelodiffError, match=message):
                Tmp(**bad)
    finally:
        RULES.pop("tmp_rule_for_review27")


def test_an_empty_setting_is_named():
    for text in ("solver=", "grid= "):
        with pytest.raises(VelodiffError, match=f"^plan setting '{text.split('=')[0]}' is empty$"):
            Plan.parse(text)


def test_rules_of_one_layer_stack_in_the_order_written():
    """Among rules of one layer the plan string is read inner to outer ("pag+sld": sld wraps pag), as
    objects, as a string, as a list holding a string; str() writes the same order back, and a plan's
    derived plans (with_rules, without, without_settings) keep it, settings included where they should."""
    log = []
    a, b = Recorder(log, "a"), Recorder(log, "b")
    sample(ORACLE, X, make_grid("uniform", SCHED, 1), "ddim", plan=[a, b])
    assert [e[0] for e in log if e[1] in ("begin", "eval")] == ["b", "a", "b", "a"]
    assert [e[0] for e in log if e[1] == "end"] == ["a", "b"]
    text = "pag+sld:concept=nudity"
    p = Plan.parse(text)
    assert str(p) == text and [r.name for r in p.rules] == ["sld", "pag"]
    assert str(Plan.parse([text, "ag"])) == str(Plan.parse(text + "+ag")) == "ag+pag+sld:concept=nudity"
    full = Plan.parse("nfe=8+" + text)
    assert str(full.with_rules([])) == str(full) == "nfe=8+" + text
    assert str(full.without_settings()) == text
    assert str(full.without(full.find("sld"))) == "nfe=8+pag"
    assert str(full.without(full.find("pag"))) == "nfe=8+sld:concept=nudity"


def test_what_a_plan_fixes_and_needs():
    """fixed_guidance: the scale of the rule owning the unconditional branch, else the guidance setting;
    needs: a branch a rule owns or reads; a plan of settings alone is a plan (not 'none')."""
    assert Plan.parse("guidance=3+cfg:scale=4").fixed_guidance() == 4.0
    assert Plan.parse("guidance=3+pag").fixed_guidance() == 3.0
    assert Plan.parse("guidance=3+cfg").fixed_guidance() == 3.0  # cfg without a scale: the setting's
    assert Plan.parse("pag").fixed_guidance() is None
    assert Plan.parse("compose").needs("uncond") and Plan.parse("sld:concept=nudity").needs("uncond")
    assert not Plan.parse("compose").claims("uncond") and not Plan.parse("pag").needs("uncond")
    for text in ("nfe=8", "guidance=2", "ag", "none"):
        p = Plan.parse(text)
        assert bool(p) == (str(p) != "none"), text


def test_cost_adds_up():
    assert Cost(1, 2) + Cost(3, 0.5) == Cost(4, 2.5)
    assert Cost(0, 0) + Cost(2, 1.5) == Cost(2, 1.5)


def test_rows_name_each_branchs_block_of_the_batched_call():
    """req.rows(name): the rows of the branch in the one network call, blocks in request order (a branch
    evaluated for some rows is that many rows long)."""
    from velodiff.plan import EvalRequest, branch_evaluator

    seen = []

    def recording(x, timestep, cond):
        seen.append(x.clone())
        return network(x, timestep, cond)

    t = torch.tensor(500.0, dtype=F64)
    req = EvalRequest(0, 0, t, X, {"cond": COND, "uncond": UNCOND})
    req = req.with_branch("uncond", rows=torch.tensor([1]))
    req = req.with_branch("own", COND.flip(0), x=X + 0.5)
    branch_evaluator(ModelDenoiser(recording, SCHED))(req)
    assert [req.rows(b) for b in req.branches] == [slice(0, 2), slice(2, 3), slice(3, 5)]
    (batch,) = seen
    assert len(batch) == 5
    assert torch.equal(batch[req.rows("uncond")], batch[req.rows("cond")][1:])  # the same x, row 1 only
    assert not torch.equal(batch[req.rows("own")], batch[req.rows("cond")])  # its own input


def test_a_time_per_sample_reaches_every_branch():
    """A per-sample t (one time per image) is each row's time in every branch of the batched call, for
    branches of every row and of some rows: each part is the denoiser alone at that row's time."""
    from velodiff.plan import EvalRequest, branch_evaluator

    t = torch.tensor([300.0, 700.0], dtype=F64)
    base = EvalRequest(0, 0, t, X, {"cond": COND, "uncond": UNCOND})
    alone = [TOY(X[k : k + 1], t[k : k + 1], COND[k : k + 1]) for k in range(2)]
    r = branch_evaluator(TOY)(base.with_branch("uncond"))
    assert torch.allclose(r.parts["cond"], torch.cat(alone))
    assert torch.allclose(r.parts["uncond"][1:], TOY(X[1:], t[1:], UNCOND[1:]))
    r = branch_evaluator(TOY)(base.with_branch("uncond", rows=torch.tensor([1])))
    assert torch.allclose(r.parts["cond"], torch.cat(alone))
    assert torch.allclose(r.parts["uncond"], TOY(X[1:], t[1:], UNCOND[1:]))


# --- review27: the loop around the rules (edits carried on, extra cost, the run's options and seeds) ---


class Reset(Accelerator):
    """After step 0, puts the sample at ``start`` (an inpainting rule's edit, in its simplest form)."""

    name = "reset"

    def __init__(self, start):
        super().__init__()
        self.start = start

    def after_step(self, info):
        return self.start if info.i == 0 else None


def test_a_rules_edit_is_the_x_the_run_goes_on_from():
    ts = make_grid("uniform", SCHED, 5)
    start = torch.full_like(X, 0.3)
    edited = sample(TOY, X, ts, "ddim", cond=COND, plan=[Reset(start)]).x
    assert torch.equal(edited, sample(TOY, start, ts[1:], "ddim", cond=COND).x)


class SideCost(Accelerator):
    """Runs one network-sample evaluation of its own per step (layout guidance's gradient pass)."""

    name = "side_cost"

    def after_step(self, info):
        self.spent = True

    def extra_cost(self):
        spent, self.spent = getattr(self, "spent", False), False
        return Cost(1, 1.5) if spent else Cost(0, 0)


def test_a_rules_own_evaluations_are_counted():
    ts = make_grid("uniform", SCHED, 4)
    res = sample(TOY, X, ts, "ddim", cond=COND, plan=[SideCost()])
    assert res.nfe == 4 + 4 and res.evals == 4 + 4 * 1.5


def test_a_rule_sees_the_runs_options_and_seeds():
    """The solver's options reach the rules' checks (recur refuses a step that draws noise: ddim with eta
    > 0); the per-image seeds a pipeline gives in ``context`` are the ones a rule draws from, so image k
    of a batch is the image a run of it alone with seed k makes."""
    ts = make_grid("uniform", SCHED, 4)
    with pytest.raises(VelodiffError, match="plan rule 'recur' retakes the steps of a deterministic solver"):
        sample(TOY, X, ts, "ddim", cond=COND, plan="recur", eta=0.5)
    batch = sample(TOY, X, ts, "ddim", cond=COND, plan="recur", context={"seeds": (5, 6)}).x
    alone = sample(TOY, X[1:], ts, "ddim", cond=COND[1:], plan="recur", seed=6).x
    assert torch.allclose(batch[1:], alone, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(batch, sample(TOY, X, ts, "ddim", cond=COND, plan="recur").x)


def test_the_seed_draws_the_step_noise():
    ts = make_grid("uniform", SCHED, 4)
    got = sample(TOY, X, ts, "euler_ancestral", cond=COND, seed=7).x
    assert torch.equal(got, sample(TOY, X, ts, "euler_ancestral", cond=COND, noise=GaussianNoise(X, 7)).x)
    assert not torch.allclose(got, sample(TOY, X, ts, "euler_ancestral", cond=COND, seed=0).x)


class Probe(Accelerator):
    """Notes, at begin, the run's plan string and whether another thread could take the network's lock."""

    name = "probe"

    def begin(self, run):
        import threading

        from velodiff.sampling import network_lock

        super().begin(run)
        self.plan, self.other_could_lock = run.plan, None
        if run.network is None:
            return
        lock, got = network_lock(run.network), []

        def other():
            ok = lock.acquire(blocking=False)
            if ok:
                lock.release()
            got.append(ok)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        self.other_could_lock = got[0] if got else None


def test_a_run_holds_its_networks_lock_and_tells_the_rules_its_plan():
    """Runs of one network take turns (its rules swap weights and hooks on it): while one runs, another
    thread cannot take the network's lock; the rules are told the run's canonical plan string."""
    from velodiff.sampling import network_lock

    net = torch.nn.Linear(1, 1)
    assert network_lock(net) is network_lock(net) is not network_lock(torch.nn.Linear(1, 1))
    probe = Probe()
    sample(TOY, X, make_grid("uniform", SCHED, 2), "ddim", cond=GuidedCond(COND, UNCOND),
           plan=[probe, "cfg:scale=2"], context={"network": net})
    assert probe.other_could_lock is False and probe.plan == "probe+cfg:scale=2"
    assert network_lock(net).acquire(blocking=False)  # released after the run (re-entrant: this thread's)
    network_lock(net).release()


def test_denoise_once_is_the_evaluation_of_that_step_of_the_run():
    """denoise_once(..., step=k, ts=grid) is what step k of a run over the grid gets (cfg stopped after
    half the steps guides step 0, not step 3); without ts the run is the one step from the largest t to 0."""
    from velodiff.sampling import denoise_once

    ts = make_grid("uniform", SCHED, 4)
    t = torch.tensor(float(ts[0]) * 0.9, dtype=F64)
    cond = GuidedCond(COND, UNCOND)
    c, u = TOY(X, t, COND), TOY(X, t, UNCOND)
    plan = "cfg:scale=3,stop=0.5"
    assert torch.allclose(denoise_once(TOY, X, t, cond, plan, step=0, ts=ts).x0, u + 3 * (c - u))
    assert torch.allclose(denoise_once(TOY, X, t, cond, plan, step=3, ts=ts).x0, c)
    probe = Probe()
    denoise_once(TOY, X, torch.tensor([0.3, 0.7], dtype=F64), COND, [probe])
    assert probe.run.ts.tolist() == [0.7, 0.0]


def test_the_rule_table_describes_each_rule():
    """rule_table (``velodiff plans``, the docs): every registered rule with its layer, the branches it
    claims and its options' defaults."""
    from velodiff.plan import RULES, rule_table

    table = {row["name"]: row for row in rule_table()}
    assert set(table) == set(RULES)
    assert table["cfg"]["claims"] == ["uncond"] and table["pag"]["claims"] == ["perturbed"]
    assert table["compose"]["claims"] == ["parts"] and table["rescale"]["claims"] == []
    for name, row in table.items():
        cls = RULES[name]
        assert row["layer"] == cls.layer and [o["name"] for o in row["options"]] == list(cls.options)
        assert all(o["default"] == cls.options[o["name"]].default for o in row["options"])


def test_a_text_option_ending_in_a_digit_and_e_keeps_the_plan_string_round_trip():
    """"+" joins items except inside an exponent (scale=1e+3): a text value ending in a digit and e
    ("type 1e") followed by another rule still reads back as the plan that wrote it."""
    from velodiff.plan import parse_rule

    sld = type(parse_rule("sld"))
    p = Plan([sld(concept="type 1e"), parse_rule("pag")])
    assert str(Plan.parse(str(p))) == str(p) == "sld:concept=type 1e+pag"
    assert str(Plan.parse("cfg:scale=1e+3+pag")) == "cfg:scale=1000+pag"
