"""DeepCache on the plan (velodiff.accel.deepcache), on the shipped default model: no reuse is the plain
run bit for bit; a cached evaluation is the full one when its cache is fresh; cached steps are marked
approximate and cost their measured FLOP share; CFG, img2img and inpainting; per-run state and hooks;
one-line refusals; and equality with the peer package's DeepCacheSDHelper on the same UNet."""

import pytest
import torch

import velodiff
from conftest import spy_rule
from velodiff import Plan, VelodiffError
from velodiff.accel.deepcache import DeepCache, cached_modules, nonuniform_steps, skip_branches
from velodiff.plan import EvalRequest
from velodiff.sampling import running

PROMPTS = ["a red circle above a blue square", "two green crosses"]
SEEDS = [11, 12]


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    from velodiff.default_model import default_model_path

    return velodiff.load(default_model_path())


def _rms(a, b):
    return float((a - b).pow(2).mean().sqrt())


def _hooked(unet):
    return [n for n, m in unet.named_modules()
            if getattr(m, "_diffusers_hook", None) and m._diffusers_hook.get_hook("velodiff_deepcache")]


def test_no_reuse_is_bit_identical_to_no_plan(model):
    from velodiff.pipelines import text2img

    plain = text2img(model, PROMPTS, steps=6, seeds=SEEDS, output="latent")
    for spec in ("deepcache:interval=1", "deepcache:interval=1,branch=3", "deepcache:interval=4,start=1"):
        r = text2img(model, PROMPTS, steps=6, seeds=SEEDS, output="latent", plan=spec)
        assert torch.equal(r.latents, plain.latents), spec
        assert r.evals == plain.evals == 12 and r.plan == spec + "+cfg"


def test_the_skipped_modules_follow_the_skip_branches(model):
    unet = model.components["unet"]
    assert skip_branches(unet) == 6  # conv_in, 1 resnet + downsampler, 1 + downsampler, 1
    names = {b: [n for n, _ in cached_modules(unet, b)] for b in range(6)}
    assert names[0] == ["down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0",
                        "up_blocks.1", "up_blocks.2.resnets.0"]
    assert names[1] == ["down_blocks.0.downsamplers.0", "down_blocks.1", "down_blocks.2", "mid_block",
                        "up_blocks.0", "up_blocks.1"]
    assert names[5] == ["mid_block"]


@pytest.mark.parametrize("branch", range(6))
def test_a_cached_evaluation_with_a_fresh_cache_is_the_full_one(model, branch):
    """Right after a full evaluation at (x, t), the shallow path with the kept deep feature gives the full
    output: what is kept is the real feature, and the cut joins where the full network does (CFG rows)."""
    from velodiff.pipelines.common import prepare_cond
    from velodiff.plan import RunInfo, branch_evaluator
    from velodiff.sampling import branches_of
    from velodiff.solvers import get_solver

    cond = prepare_cond(model, PROMPTS, None, True, 64, 64)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(branch))
    t = torch.tensor(0.55, dtype=torch.float64)
    rule = DeepCache(interval=3, branch=branch, lower_order=True)
    plan = Plan.parse([rule, "cfg:scale=3"])
    run = RunInfo(schedule=model.schedule, ts=torch.linspace(0.9, 0.0, 7, dtype=torch.float64),
                  solver=get_solver("ddim"), batch=2, conds=branches_of(cond),
                  network=model.components["unet"], guidance=3.0)
    for r in plan.rules:
        r.check(run)
    fn = plan.chain(branch_evaluator(model.denoiser))
    with torch.inference_mode(), running(plan, run):
        full = fn(EvalRequest(0, 0, t, x, run.conds))
        cached = fn(EvalRequest(1, 0, t, x, run.conds))
        other = fn(EvalRequest(2, 0, t, x + 0.3, run.conds))  # cached, from another x: not the full output
    assert full.exact and not cached.exact and rule.cached_evals == 2
    torch.testing.assert_close(cached.x0, full.x0, rtol=1e-5, atol=1e-5)
    for b in ("cond", "uncond"):
        torch.testing.assert_close(cached.parts[b], full.parts[b], rtol=1e-5, atol=1e-5)
    assert _rms(other.x0, full.x0) > 1e-3
    assert 0 < cached.cost.evals < full.cost.evals == 2 and cached.cost.nfe == 1
    assert cached.cost.evals == pytest.approx(2 * rule.share)
    assert not _hooked(model.components["unet"])


def test_cached_steps_cost_their_flop_share_and_may_lower_the_order(model):
    from velodiff.pipelines import text2img

    spy = spy_rule()
    rule = DeepCache(interval=3, lower_order=True)
    r = text2img(model, PROMPTS, steps=7, seeds=SEEDS, output="latent", plan=[spy, rule], solver="dpmpp_2m")
    assert sorted(rule.full_steps) == [0, 3, 6]
    assert [s for s, exact, _ in spy.log if exact] == [0, 3, 6]
    share = rule.share
    assert 0.01 < share < 0.5  # conv_in, one up resnet and conv_out of the default UNet
    assert all(c.evals == (2 if exact else pytest.approx(2 * share)) for _, exact, c in spy.log)
    assert r.evals == pytest.approx(3 * 2 + 4 * 2 * share) and r.nfe == 7
    spy = spy_rule()
    keep = text2img(model, PROMPTS, steps=7, seeds=SEEDS, output="latent", plan=[spy, DeepCache(interval=3)])
    assert all(exact for _, exact, _ in spy.log) and keep.evals == pytest.approx(r.evals)
    assert not torch.equal(keep.latents, r.latents)  # the solver kept its second order on cached steps


def test_an_outer_guidance_rule_keeps_a_cached_evaluation_approximate(model):
    """linear_ag's estimated steps are exact only if what it estimated from was: under DeepCache with
    lower_order its steps on cached features stay approximate (the solver lowers its order there)."""
    from velodiff.pipelines import text2img

    spy = spy_rule()
    plan = [spy, "linear_ag:every=2,warmup=3", DeepCache(interval=2, lower_order=True)]
    text2img(model, PROMPTS[:1], steps=8, seeds=SEEDS[:1], guidance=2.5, output="latent", plan=plan)
    assert [s for s, exact, _ in spy.log if not exact] == [1, 3, 5, 7]  # the cached steps, 3-7 estimated


def test_the_flop_share_is_counted_per_plan(model):
    """A cached evaluation's share depends on the other rules on the network (ToMe's merging): what a
    plan reports does not depend on which plan ran before it."""
    from velodiff.pipelines import text2img

    kw = {"steps": 6, "seeds": SEEDS[:1], "output": "latent"}
    plan = "deepcache:interval=3+tome:ratio=0.9,max_downsample=2"
    first = text2img(model, PROMPTS[:1], plan="deepcache:interval=3", **kw)
    after = text2img(model, PROMPTS[:1], plan=plan, **kw)
    assert after.evals != first.evals  # ToMe changes the share
    from velodiff.accel import deepcache

    deepcache._FLOPS.clear()
    alone = text2img(model, PROMPTS[:1], plan=plan, **kw)
    assert after.evals == alone.evals and torch.equal(after.latents, alone.latents)


def test_schedules_start_and_stop():
    dc = DeepCache(interval=3)
    assert dc.plan_steps(10) == {0, 3, 6, 9}
    dc = DeepCache(interval=3, start=0.2, stop=0.8)
    assert dc.plan_steps(10) == {0, 1, 2, 5, 8, 9}
    for m, n, c in [(20, 7, 6.0), (20, 10, 6.0), (50, 10, 15.0), (25, 9, 7.5)]:
        idx = nonuniform_steps(m, n, c, 1.4)
        assert len(idx) == n and idx[0] == 0 and idx == sorted(set(idx)) and idx[-1] < m
        gaps = [b - a for a, b in zip(idx, idx[1:], strict=False)]
        near = min(range(len(idx)), key=lambda k: abs(idx[k] - c))
        assert gaps[min(near, len(gaps) - 1)] <= min(gaps[0], gaps[-1])  # densest around the centre
    dc = DeepCache(interval=3, schedule="nonuniform")
    assert len(dc.plan_steps(20)) == 7
    # the centre is a fraction of the steps (the paper's 15 of 50 is 0.3), densest there
    assert dc.plan_steps(20) == set(nonuniform_steps(20, 7, 0.3 * 20, 1.4))
    assert DeepCache(interval=3, schedule="nonuniform", center=0.7).plan_steps(20) == set(
        nonuniform_steps(20, 7, 0.7 * 20, 1.4)) != dc.plan_steps(20)


def test_the_budgeted_schedule_reads_the_stretch_it_covers():
    """With start / stop, the dynamic program places the full steps by the calibrated changes of the
    steps it covers (steps 3-11 of 12 at start=0.25), not by the first ones of the run."""
    from velodiff.accel.cache_schedule import budgeted_schedule

    dc = DeepCache(interval=3, schedule="budget", start=0.25)
    dc.changes = [0.0, 5.0, 5.0, 0.1, 0.1, 0.1, 3.0, 4.0, 0.2, 0.2, 0.1, 0.1]
    inside = budgeted_schedule(dc.changes[3:], 3)
    assert dc.plan_steps(12) == {0, 1, 2} | {3 + i for i, full in enumerate(inside) if full}
    unsliced = budgeted_schedule(dc.changes, 3)
    assert dc.plan_steps(12) != {0, 1, 2} | {3 + i for i, full in enumerate(unsliced) if full}


def test_the_flop_share_is_measured_per_branch(model):
    """The FLOP share of a cached evaluation (the cost bench, Pareto and tune rank by) is measured per
    skip branch: a deeper branch caches less and costs more, also after a run with another branch."""
    from velodiff.pipelines import text2img

    shares = []
    for branch in (0, 3):
        rule = DeepCache(interval=2, branch=branch)
        text2img(model, PROMPTS[:1], steps=4, seeds=SEEDS[:1], output="latent", plan=[rule])
        shares.append(rule.share)
    assert 0 < shares[0] < shares[1] < 1


def test_works_with_img2img_and_inpainting(model):
    """Both pipelines run their (shortened) grids through the plan; the cached run stays nearer the plain
    one than another seed's image is (pixels, CFG 2.5, 12 steps, interval 2)."""
    from velodiff.pipelines import img2img, inpaint, text2img

    init = text2img(model, PROMPTS[::-1], steps=8, seeds=[5, 6], output="tensor").images
    mask = torch.zeros(2, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    for run, kw in [(img2img, {"image": init, "strength": 0.7}),
                    (inpaint, {"image": init, "mask": mask, "strength": 1.0})]:
        kw.update(steps=12, output="tensor", guidance=2.5)
        plain = run(model, PROMPTS, seeds=SEEDS, **kw)
        other = run(model, PROMPTS, seeds=[21, 22], **kw)
        rule = DeepCache(interval=2)
        r = run(model, PROMPTS, seeds=SEEDS, plan=[rule], **kw)
        assert rule.cached_evals > 0 and r.evals < 0.6 * plain.evals and r.plan == "deepcache:interval=2+cfg"
        assert _rms(r.images, plain.images) < 0.8 * _rms(other.images, plain.images), run.__name__


def test_state_and_hooks_do_not_outlive_a_run(model):
    from velodiff.pipelines import text2img

    unet = model.components["unet"]
    rule = DeepCache(interval=2)
    a = text2img(model, PROMPTS, steps=5, seeds=SEEDS, output="latent", plan=[rule])
    assert not _hooked(unet) and not rule.state.kept
    b = text2img(model, PROMPTS[:1], steps=5, seeds=[3], output="latent", plan=[rule])  # another batch
    c = text2img(model, PROMPTS, steps=5, seeds=SEEDS, output="latent", plan=[rule])
    assert torch.equal(a.latents, c.latents) and b.latents.shape[0] == 1

    def boom(info):
        if info.i == 2:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        text2img(model, PROMPTS, steps=5, seeds=SEEDS, output="latent", plan=[rule], callback=boom)
    assert not _hooked(unet) and not rule.state.kept
    d = text2img(model, PROMPTS, steps=5, seeds=SEEDS, output="latent", plan=[rule])
    assert torch.equal(a.latents, d.latents)
    plain = text2img(model, PROMPTS, steps=5, seeds=SEEDS, output="latent")
    assert torch.equal(plain.latents, text2img(model, PROMPTS, steps=5, seeds=SEEDS, output="latent").latents)


def test_stacks_with_per_image_adaptive_guidance_and_pag(model):
    """The rows change from step to step (AG drops an image's unconditional pass; PAG adds a branch):
    kept rows are matched by (branch, image); a row never kept runs a full evaluation."""
    from velodiff.pipelines import text2img

    kw = {"steps": 10, "output": "tensor", "guidance": 2.5}
    other = text2img(model, PROMPTS, seeds=[21, 22], **kw).images
    for plan, ref_plan in [("deepcache:interval=2+ag:threshold=0.995", "ag:threshold=0.995"),
                           ("deepcache:interval=2+pag:scale=1", "pag:scale=1")]:
        r = text2img(model, PROMPTS, seeds=SEEDS, plan=plan, **kw)
        ref = text2img(model, PROMPTS, seeds=SEEDS, plan=ref_plan, **kw)
        assert r.evals < 0.7 * ref.evals
        assert _rms(r.images, ref.images) < 0.5 * _rms(other, ref.images), plan


def test_bad_input_is_one_line(model, tmp_path):
    from velodiff.models.tiny import save_tiny
    from velodiff.pipelines import text2img

    for plan, message in [
        ("deepcache:interval=0", "plan rule 'deepcache' option 'interval' must be in [1, 1000], got 0"),
        ("deepcache:schedule=quad", "unknown value of plan rule 'deepcache' option 'schedule' 'quad'"),
        ("deepcache:interval=2.5", "plan rule 'deepcache' option 'interval': '2.5' is not a int"),
        ("deepcache:power=0.5", "plan rule 'deepcache' option 'power' must be in [1, 10], got 0.5"),
        ("deepcache:every=2", "plan rule 'deepcache' has no option 'every'"),
    ]:
        with pytest.raises(VelodiffError) as e:
            Plan.parse(plan)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    for plan, message in [
        ("deepcache:branch=6", "plan rule 'deepcache' option 'branch' must be in [0, 5] for this UNet"),
        ("deepcache:start=0.8,stop=0.2", "plan rule 'deepcache': start (0.8) must not exceed stop (0.2)"),
        ("deepcache:center=0.9", "plan rule 'deepcache': center is read only with schedule=nonuniform"),
        ("deepcache:calibration=x.json",
         "plan rule 'deepcache': calibration is read only with schedule=budget"),
    ]:
        with pytest.raises(VelodiffError) as e:
            text2img(model, PROMPTS[0], steps=2, plan=plan)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    dit = velodiff.load(save_tiny("pixart-sigma", tmp_path / "dit"))
    with pytest.raises(VelodiffError) as e:
        text2img(dit, "a red cube", steps=2, plan="deepcache")
    assert str(e.value) == ("plan rule 'deepcache' is for UNets (down and up blocks joined by skip "
                            "branches); this model's network is a PixArtTransformer2DModel")
    assert Plan.parse("deepcache:cache_interval=3,cache_branch_id=0,skip_mode=uniform").rules[0].spec() == (
        "deepcache:interval=3,branch=0,schedule=uniform")


class Recorder:
    """A diffusers hook on the UNet (test only) that records each call's inputs and output."""

    def __init__(self, unet):
        from diffusers.hooks import ModelHook

        from velodiff.accel.hooks import HookSet

        self.calls = []
        calls = self.calls

        class Hook(ModelHook):
            def pre_forward(self, module, *args, **kwargs):
                calls.append([args[0].clone(), args[1].clone(), kwargs["encoder_hidden_states"].clone()])
                return args, kwargs

            def post_forward(self, module, output):
                calls[-1].append(output[0].clone())
                return output

        self.hooks = HookSet("test_recorder")
        self.hooks.add(unet, Hook())


def test_equals_the_peer_deepcache_helper_on_the_same_unet(model):
    """The peer (DeepCache 0.1.1) patches a diffusers StableDiffusionPipeline built from the default model's
    modules; fed the very inputs of each network call of a velodiff run (CFG rows batched, DDIM), its UNet
    outputs equal velodiff's at interval 3, branch 0 (its defaults' cut), full and cached steps alike."""
    helper_mod = pytest.importorskip("DeepCache")
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from velodiff.pipelines import text2img

    unet = model.components["unet"]
    rec = Recorder(unet)
    try:
        r = text2img(model, PROMPTS, steps=7, seeds=SEEDS, solver="ddim", guidance=3.0, output="latent",
                     plan="deepcache:interval=3,branch=0")
    finally:
        rec.hooks.remove()
    assert r.plan == "deepcache:interval=3,branch=0+cfg" and len(rec.calls) == 7
    c = model.components
    pipe = StableDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                   unet=unet, scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.scheduler.timesteps = torch.stack([call[1][0] for call in rec.calls])  # one time per step
    helper = helper_mod.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    try:
        with torch.inference_mode():
            outs = [pipe.unet(x, ts[0], encoder_hidden_states=ehs, return_dict=False)[0]
                    for x, ts, ehs, _ in rec.calls]
    finally:
        helper.disable()
    for i, (out, call) in enumerate(zip(outs, rec.calls, strict=True)):
        torch.testing.assert_close(out, call[3], rtol=1e-5, atol=1e-5, msg=f"call {i}")
    assert not torch.allclose(outs[1], outs[0], atol=1e-3)


def test_cli_generate_and_plans(tmp_path, capsys):
    from velodiff.cli import main

    def cli(*args):
        try:
            return main([str(a) for a in args])
        except SystemExit as e:
            return int(e.code or 0)

    out = tmp_path / "a.png"
    plan = "deepcache:interval=3,branch=0"
    assert cli("generate", "a red circle", "-o", out, "--steps", "4", "--plan", plan) == 0
    assert out.is_file() and "plan deepcache:interval=3,branch=0+cfg)" in capsys.readouterr().out
    assert cli("generate", "a red circle", "-o", tmp_path / "b.png", "--plan", "deepcache:branch=-1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: plan rule 'deepcache' option 'branch' must be in [0, 1000], got -1"]
    assert cli("plans") == 0 and "deepcache" in capsys.readouterr().out


@pytest.mark.parametrize("branch", range(6))
def test_branch_numbering_is_the_peers_on_an_sd_layout(branch):
    """On a UNet with SD's layout (two layers and a downsampler per down block: three skips a block), the
    branch is the peer's cache_branch_id: a tiny random UNet gives the peer's outputs call by call."""
    helper_mod = pytest.importorskip("DeepCache")
    from diffusers import UNet2DConditionModel

    from velodiff.plan import EvalResult, RunInfo
    from velodiff.solvers import get_solver

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D",
        "CrossAttnUpBlock2D"), cross_attention_dim=16, norm_num_groups=8, attention_head_dim=4).eval()
    assert skip_branches(unet) == 6
    g = torch.Generator().manual_seed(1)
    ehs = torch.randn(2, 5, 16, generator=g)
    steps = [(torch.randn(2, 4, 8, 8, generator=g), 900 - 100 * i) for i in range(5)]
    rule = DeepCache(interval=2, branch=branch)
    run = RunInfo(schedule=None, ts=torch.linspace(1, 0, 6), solver=get_solver("ddim"), batch=2,
                  conds={"cond": {"encoder_hidden_states": ehs}}, network=unet)
    rule.check(run)
    ours = []
    with torch.inference_mode():
        rule.begin(run)
        try:
            for i, (x, t) in enumerate(steps):
                def inner(req, t=t):
                    return EvalResult(unet(req.x, torch.tensor(t), encoder_hidden_states=ehs).sample)

                ours.append(rule.evaluate(EvalRequest(i, 0, torch.tensor(0.5), x, run.conds), inner).x0)
        finally:
            rule.end()
        pipe = type("Pipe", (), {})()
        pipe.unet, pipe.scheduler = unet, type("Sched", (), {})()
        pipe.scheduler.timesteps = torch.tensor([t for _, t in steps])
        helper = helper_mod.DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=2, cache_branch_id=branch)
        helper.enable()
        try:
            peer = [unet(x, torch.tensor(t), encoder_hidden_states=ehs).sample for x, t in steps]
        finally:
            helper.disable()
        plain = [unet(x, torch.tensor(t), encoder_hidden_states=ehs).sample for x, t in steps]
    for i, (a, b) in enumerate(zip(ours, peer, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"branch {branch}, call {i}")
        assert torch.equal(a, plain[i]) == (i % 2 == 0)  # the cached calls (1, 3) are not the full network


def test_first_order_forecast_extrapolates_the_last_two_full_steps(model):
    """order=1 (TaylorSeer's first order on DeepCache's deep features): on a cached step s the kept
    feature F(s1) becomes F(s1) + (s - s1) (F(s1) - F(s0)) / (s1 - s0); with no cached step, or before
    two full steps exist, it is DeepCache itself."""
    from velodiff.accel.deepcache import DeepCache
    from velodiff.pipelines import text2img

    def run(spec):
        return text2img(model, PROMPTS, steps=7, seeds=SEEDS, output="latent", plan=spec).latents

    plain = run(None)
    assert torch.equal(run("deepcache:interval=1,order=1"), plain)
    # steps 0, 3, 6 are full: step 1-2 reuse (one full step so far), steps 4-5 forecast from 0 and 3
    reuse, forecast = run("deepcache:interval=3"), run("deepcache:interval=3,order=1")
    assert not torch.equal(reuse, forecast) and torch.isfinite(forecast).all()
    seen = []

    class Watch(DeepCache):
        name = "watch_deepcache"

        def evaluate(self, req, inner):
            st = self.state
            original = st.recall

            def recall(name):
                seen.append((req.step, st.weight))
                return original(name)

            st.recall = recall
            try:
                return super().evaluate(req, inner)
            finally:
                del st.recall

    text2img(model, PROMPTS, steps=7, seeds=SEEDS, output="latent", plan=[Watch(interval=3, order=1)])
    weights = {step: w for step, w in seen}
    assert weights == {1: None, 2: None, 4: 1 / 3, 5: 2 / 3}
    # Heun: a full step keeps its stage-1 features at t_{s+1}, where the next step's stage 0 runs (no
    # extrapolation there), and each stage is forecast to its own time on the grid
    seen.clear()
    text2img(model, PROMPTS, steps=7, seeds=SEEDS, output="latent", solver="heun",
             plan=[Watch(interval=3, order=1)])
    assert seen[0] == (1, 0.0) and seen[-1][0] == 5
    weights = sorted(set(seen))
    assert weights == [(1, 0.0), (1, 1.0), (2, 1.0), (2, 2.0), (4, 0.0), (4, 1.0), (5, 1.0), (5, 2.0)]


def test_start_and_stop_cover_the_steps_a_guidance_rules_start_and_stop_do():
    """As the guidance rules' start / stop (int(start * N) <= i < int(stop * N)), the cached stretch of
    an N-step run starts at step int(start * N) and every step from int(stop * N) on is full."""
    dc = DeepCache(interval=1000, start=0.25, stop=0.75)
    assert dc.plan_steps(10) == {0, 1, 2, 7, 8, 9}  # 2.5 -> 2, 7.5 -> 7
    assert DeepCache(interval=1000, stop=0.35).plan_steps(10) == {0, 3, 4, 5, 6, 7, 8, 9}  # 3.5 -> 3


def test_the_flop_share_is_per_row_whatever_the_rows_of_the_first_calls(model):
    """The share compares a cached call with a full one per row: under AG the first full call has both
    branches (4 rows) and the first cached one the conditional rows only; the share is the plain CFG
    run's, where both have 4 rows."""
    from velodiff.pipelines import text2img

    kw = {"steps": 4, "seeds": SEEDS, "output": "latent", "guidance": 2.5}
    cfg_rule, ag_rule = DeepCache(interval=2), DeepCache(interval=2)
    text2img(model, PROMPTS, plan=[cfg_rule], **kw)
    r = text2img(model, PROMPTS, plan=["ag:threshold=0.5", ag_rule], **kw)
    assert ag_rule.cached_evals == 2 and r.evals < 4 * 2 * 2  # AG dropped the unconditional rows
    assert ag_rule.share == pytest.approx(cfg_rule.share, rel=1e-6)


def test_the_forecast_state_does_not_outlive_a_run(model):
    """order=1 keeps two full steps' features during the run; none of them is held after it."""
    from velodiff.pipelines import text2img

    rule = DeepCache(interval=2, order=1)
    text2img(model, PROMPTS, steps=6, seeds=SEEDS, output="latent", plan=[rule])
    assert not rule.state.kept and not rule.state.previous and not rule.layout


def test_a_full_evaluation_that_did_not_run_the_network_leaves_nothing_to_reuse():
    """When a full step's evaluation did not go through the hooked modules (another code path served
    it), the next step has no deep features to reuse: it runs in full instead of recalling nothing."""
    from diffusers import UNet2DConditionModel

    from velodiff.plan import EvalResult, RunInfo
    from velodiff.solvers import get_solver

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D",
        "CrossAttnUpBlock2D"), cross_attention_dim=16, norm_num_groups=8, attention_head_dim=4).eval()
    ehs = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    rule = DeepCache(interval=3)
    run = RunInfo(schedule=None, ts=torch.linspace(1, 0, 4), solver=get_solver("ddim"), batch=1,
                  conds={"cond": {"encoder_hidden_states": ehs}}, network=unet)
    rule.check(run)

    def network(req):
        return EvalResult(unet(req.x, torch.tensor(500), encoder_hidden_states=ehs).sample)

    with torch.inference_mode():
        rule.begin(run)
        try:
            rule.evaluate(EvalRequest(0, 0, torch.tensor(1.0), x, run.conds), lambda req: EvalResult(req.x))
            out = rule.evaluate(EvalRequest(1, 0, torch.tensor(0.6), x, run.conds), network)
        finally:
            rule.end()
        plain = network(EvalRequest(1, 0, torch.tensor(0.6), x, run.conds))
    assert rule.cached_evals == 0 and out.exact and torch.equal(out.x0, plain.x0)
