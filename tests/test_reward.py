"""Reward steering (plan rule ``reward``, FlowChef-style): on the shipped model a reward rises with the
scale and the run spends no extra network evaluation; scale 0 and prompts without a target are the
plain run bit for bit; it runs on a flow model (tiny SD3); bad input is one line."""

import pytest
import torch

import velodiff
from velodiff import VelodiffError
from velodiff.guidance.reward import RewardSteering
from velodiff.pipelines import text2img


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    from velodiff.default_model import default_model_path

    return velodiff.load(default_model_path())


def redness(images: torch.Tensor) -> torch.Tensor:
    return images[:, 0].mean((1, 2)) - images[:, 1:].mean((1, 2, 3))


def test_the_reward_rises_with_the_scale_at_no_extra_network_cost(model):
    kw = dict(seeds=[0, 1, 2], steps=12, guidance=2.5, output="tensor")
    prompts = ["a blue square", "a green circle", "a white cross"]
    plain = text2img(model, prompts, **kw)
    rewards = [redness(plain.images)]
    for scale in (0.05, 0.2):
        res = text2img(model, prompts, plan=[RewardSteering(reward=redness, scale=scale)], **kw)
        assert res.evals == plain.evals  # no network pass and no network backward added
        rewards.append(redness(res.images))
    assert (rewards[1] > rewards[0]).all() and (rewards[2] > rewards[1]).all(), rewards


def test_no_scale_or_no_target_is_the_plain_run(model):
    kw = dict(seeds=[3], steps=6, guidance=2.5, output="latent")
    plain = text2img(model, "a red circle", **kw)
    for plan in ["reward:scale=0", [RewardSteering(reward=redness, scale=0)]]:
        steered = text2img(model, "a red circle", plan=plan, **kw)
        assert torch.equal(steered.latents, plain.latents)
    outside = "a photo of a cat"  # not the shapes world's grammar: the head reads no target
    plain = text2img(model, outside, **kw)
    assert torch.equal(text2img(model, outside, plan="reward:target=count", **kw).latents, plain.latents)
    moved = text2img(model, "two red circles", plan="reward:target=count,scale=0.2", **kw).latents
    assert not torch.equal(moved, text2img(model, "two red circles", **kw).latents)


def test_a_flow_model_is_steered_too(tmp_path):
    """Tiny SD3 (rectified flow, random weights): the rule takes sigma from the flow schedule and the
    reward of the result rises."""
    from velodiff.models import load
    from velodiff.models.tiny import save_tiny

    flow = load(save_tiny("sd3", tmp_path / "sd3"))
    flow.max_sequence_length = 32
    kw = dict(seeds=[0], steps=4, guidance=1.0, output="tensor")
    plain = text2img(flow, "a red cat", **kw)
    steered = text2img(flow, "a red cat", plan=[RewardSteering(reward=redness, scale=0.5)], **kw)
    assert redness(steered.images) > redness(plain.images)


def test_bad_input_is_one_line(model):
    with pytest.raises(VelodiffError, match="return one number per image"):
        text2img(model, "a red circle", steps=2, plan=[RewardSteering(reward=lambda im: im.mean())])
    with pytest.raises(VelodiffError, match="'target'"):
        text2img(model, "a red circle", steps=2, plan="reward:target=beauty")
    from velodiff import make_grid
    from velodiff.sampling import sample

    ts = make_grid("uniform", model.schedule, 4)
    with pytest.raises(VelodiffError, match="needs a loaded model"):
        sample(model.denoiser, torch.randn(1, 4, 8, 8), ts, "ddim", plan=[RewardSteering(reward=redness)])


@pytest.mark.parametrize("rule", ["reward:target=count,scale=0.2",
                                  "classifier:head=colors,scale=3,through=network",
                                  "compose:scale=3"])
def test_start_and_stop_confine_the_steering_to_their_steps(model, rule):
    """Every steering rule's start / stop (diffusers guiders' fractions of the steps): the steps before
    start are the plain run's, and a rule active on no step is the plain run (its passes uncounted).
    (Composable prompts outside their steps are the first part's plain run.)"""
    xs: dict[str, list[torch.Tensor]] = {}

    def run(prompt, plan, key):
        xs[key] = []
        return text2img(model, prompt, plan=plan, callback=lambda info: xs[key].append(info.x.clone()),
                        seeds=[3], steps=6, guidance=2.5, output="latent")

    prompt = "two red circles AND a blue square" if rule.startswith("compose") else "two red circles"
    plain = run("two red circles", None, "plain")
    never = run(prompt, f"{rule},start=0.5,stop=0.5", "never")
    assert torch.equal(never.latents, plain.latents) and never.evals == plain.evals
    late = run(prompt, f"{rule},start=0.5", "late")
    assert all(torch.equal(a, b) for a, b in zip(xs["late"][:3], xs["plain"][:3], strict=True))
    assert not torch.equal(late.latents, plain.latents)


def test_each_image_is_steered_by_its_own_gradient():
    """The step is the reward's gradient normalised by its RMS per image (FlowChef's step size per sample):
    an image steers the same alone or beside another whose gradient is of another size."""
    m = velodiff.load("default")
    kw = dict(steps=6, guidance=2.5, output="latent", plan=[RewardSteering(reward=redness, scale=0.3)])
    alone = text2img(m, ["a blue square"], seeds=[0], **kw).latents
    pair = text2img(m, ["a blue square", "three white crosses"], seeds=[0, 1], **kw).latents
    torch.testing.assert_close(pair[:1], alone, rtol=0, atol=1e-4)
