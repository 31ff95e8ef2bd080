"""Classifier guidance through x0 (EluCD): targets read off the prompt, the guided image moves toward the
classifier's target, images without a target are left alone, and bad settings are one line."""

import numpy as np
import pytest
import torch

import velodiff
from velodiff import VelodiffError
from velodiff.guidance.classifier import ClassifierGuidance, log_likelihood, prompt_target


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    from velodiff.default_model import default_model_path

    return velodiff.load(default_model_path())


def brightness(images):
    """A two-class 'classifier' (bright, dark)."""
    m = images.mean(dim=(1, 2, 3)) - 0.5
    return torch.stack([2 * m, -2 * m], dim=1)


def test_targets_from_the_prompt():
    from velodiff.data.shapes import color_shape_pairs as _pairs

    assert prompt_target("three blue squares", "count") == 2
    assert prompt_target("a red circle and two green crosses", "count") == 2
    assert prompt_target("a photo of a red circle above a blue square", "count") == 1
    pairs = _pairs()
    got = prompt_target("a red circle and two green crosses", "pairs")
    assert [pairs[i] for i in got] == sorted([("red", "circle"), ("green", "cross")], key=pairs.index)
    assert prompt_target("a cat on a sofa", "count") is None


def test_calibrated_likelihood():
    logits = torch.tensor([2.0, 0.0, -1.0])
    plain = log_likelihood(logits, 0, 1.0, 1.0, False)
    assert torch.allclose(plain, torch.log_softmax(logits, 0)[0])
    # EluCD's margin discount d < 1 keeps part of the joint term: T l_y - logsumexp(T d l)
    assert torch.allclose(log_likelihood(logits, 0, 2.0, 0.5, False), 4.0 - torch.logsumexp(logits, 0))
    multi = log_likelihood(logits, [0, 2], 1.0, 1.0, True)
    expected = torch.nn.functional.logsigmoid(torch.tensor([2.0, 0.0, -1.0]) * torch.tensor([1, -1, 1.0]))
    assert torch.allclose(multi, expected.sum())


def scene_score(images, prompts):
    """The FD-shapes encoder's log-likelihood of each image's prompt-derived scene."""
    from velodiff.eval.features import load_encoder

    rule = ClassifierGuidance(head="scene")
    x = torch.stack([torch.from_numpy(np.asarray(i).copy()).permute(2, 0, 1) for i in images])
    with torch.no_grad():
        logits = load_encoder().logits(x)
    return [float(rule.log_likelihood(logits, i, prompt_target(p, "scene"))) for i, p in enumerate(prompts)]


@pytest.mark.parametrize("through", ["x0", "network"])
def test_guidance_raises_the_classifier_likelihood(model, through):
    from velodiff.pipelines import text2img

    prompts = ["three white squares", "two cyan squares", "three blue squares", "three green crosses"]
    kw = dict(seeds=[0, 1, 2, 3], steps=20, guidance=2.5)
    plain = text2img(model, prompts, **kw)
    guided = text2img(model, prompts, **kw, plan=f"classifier:head=scene,scale=3,through={through}")
    before, after = scene_score(plain.images, prompts), scene_score(guided.images, prompts)
    # (one image may lose a little; the mean gains 1.5 for both routes)
    assert np.mean(after) > np.mean(before) + 0.75, (before, after)
    # the route through the network costs a second conditional pass per guided evaluation, counted
    extra = (guided.nfe - plain.nfe, guided.evals - plain.evals)
    assert extra == ((0, 0) if through == "x0" else (plain.nfe, plain.nfe)), extra


def test_images_without_a_target_are_left_alone(model):
    from velodiff.pipelines import text2img

    # an image whose prompt is outside the shapes world's grammar is sampled unguided
    a = text2img(model, ["two red circles", "hello world"], seeds=[0, 1], steps=4, output="latent")
    b = text2img(
        model, ["two red circles", "hello world"], seeds=[0, 1], steps=4, output="latent",
        plan="classifier:head=pairs,scale=3",
    )
    assert torch.equal(a.latents[1], b.latents[1]) and not torch.equal(a.latents[0], b.latents[0])
    assert b.plan == "cfg+classifier:head=pairs,scale=3"


def test_refusals(model):
    from velodiff.pipelines import text2img

    with pytest.raises(VelodiffError, match="pass both classifier and targets"):
        ClassifierGuidance(brightness)
    with pytest.raises(VelodiffError, match="2 targets for a batch of 1"):
        text2img(model, "a red circle", steps=2, plan=[ClassifierGuidance(brightness, [0, 1])])
    with pytest.raises(VelodiffError, match="'head'"):
        text2img(model, "a red circle", steps=2, plan="classifier:head=shape")
    from velodiff import make_grid
    from velodiff.sampling import sample

    ts = make_grid("uniform", model.schedule, 4)
    with pytest.raises(VelodiffError, match="needs a loaded model"):
        sample(model.denoiser, torch.randn(1, 4, 8, 8), ts, "ddim", plan="classifier")


def test_any_softmax_classifier_from_python(model):
    """A classifier and targets given from Python steer exactly as the plan string's head does."""
    from velodiff.eval.features import load_encoder
    from velodiff.pipelines import text2img

    prompts = ["three white squares", "two cyan squares"]
    targets = [prompt_target(p, "count") for p in prompts]
    kw = dict(seeds=[0, 1], steps=6, guidance=2.5, output="latent")
    by_name = text2img(model, prompts, **kw, plan="classifier:head=count,scale=3,temperature=2")
    def counter(images):
        return load_encoder().logits(images)["count"]

    rule = ClassifierGuidance(counter, targets, scale=3, temperature=2)
    by_object = text2img(model, prompts, **kw, plan=[rule])
    plain = text2img(model, prompts, **kw)
    assert torch.equal(by_name.latents, by_object.latents) and not torch.equal(plain.latents, by_name.latents)


def test_the_shipped_pair_counter_reads_clean_renders():
    """The classifier trained on clean renders counts each colour-shape pair of scenes it never saw."""
    from velodiff.data.shapes import color_shape_pairs as _pairs
    from velodiff.guidance.pair_counter import accuracy, load_counter, make_dataset

    x, t = make_dataset(200, seed=9000, degrade_fraction=0.0)
    acc = accuracy(load_counter(), x, t)
    assert acc["exact"] >= 0.9 and acc["named_pairs"] >= 0.9, acc
    target = prompt_target("two blue squares and a red circle", "pair_counts")
    named = {_pairs()[i]: n for i, n in enumerate(target) if n}
    assert named == {("blue", "square"): 2, ("red", "circle"): 1}


@pytest.mark.parametrize("through", ["x0", "network"])
def test_the_guidance_step_is_elucds_on_x0_and_universal_guidances_through_the_network(model, through):
    """The step added to x0 is s w(t) sigma^2 g times 1 / (alpha^2 + sigma^2) through x0 (the Gaussian
    denoiser's Jacobian) or 1 / alpha through the network, w(t) = 1 + gamma sin(pi t / t_max) (EluCD's
    schedule); checked with the gradient g fixed, at the first steered step."""
    import math

    from velodiff.pipelines import text2img

    def x0s(plan):
        seen = []
        res = text2img(model, "two red circles", seeds=[0], steps=4, guidance=2.5, output="latent", plan=plan,
                       callback=lambda info: seen.append(info.x0.clone()))
        return seen, res.ts

    plain, ts = x0s(None)
    sched = model.schedule
    t = ts[1]
    a, sig = float(sched.alpha(t)), float(sched.sigma(t))
    for gamma in (0.0, 0.5):
        rule = ClassifierGuidance(lambda images: images.mean(dim=(2, 3)), [0], scale=2.0, gamma=gamma,
                                  through=through, start=0.25)
        rule.gradient = lambda req, x0: torch.ones_like(x0)  # a known g: only the step is checked
        steered, _ = x0s([rule])
        assert torch.equal(steered[0], plain[0])  # step 0 is before start
        w = 1 + gamma * math.sin(math.pi * float(t) / sched.t_max)
        factor = 1 / (a**2 + sig**2) if through == "x0" else 1 / a
        want = torch.full_like(plain[1], 2.0 * w * sig**2 * factor)
        torch.testing.assert_close(steered[1] - plain[1], want, rtol=1e-4, atol=1e-5)


def test_the_pair_count_head_is_a_softmax_per_pair():
    """head=pair_counts reads a count class per colour-shape pair (the counter's (pairs, counts) logits):
    its log-likelihood is the sum over the pairs of log softmax(pair k's logits)[target count of pair k],
    not a multi-label head over named classes."""
    from velodiff.guidance.pair_counter import COUNTS

    target = prompt_target("two blue squares and a red circle", "pair_counts")
    logits = torch.randn(2, len(target), COUNTS, generator=torch.Generator().manual_seed(0))
    rule = ClassifierGuidance(head="pair_counts")
    got = rule.log_likelihood({"pair_counts": logits}, 1, target)
    want = torch.log_softmax(logits[1], -1)[torch.arange(len(target)), torch.tensor(target)].sum()
    assert torch.allclose(got, want)


def test_a_run_without_prompts_or_a_classifier_is_refused(model):
    """The plan string's classifier reads its target off the prompts: a bare sample() with a model but no
    prompts (and no classifier= with targets=) is one line, not a silently unguided run."""
    from velodiff import make_grid
    from velodiff.sampling import sample

    ts = make_grid("uniform", model.schedule, 2)
    cond = model.encode_prompt(["two red circles"], guided=False)
    with pytest.raises(VelodiffError, match=r"'classifier' needs the run's prompts \(or a classifier=") as e:
        sample(model.denoiser, torch.randn(1, 4, 16, 16), ts, "ddim", cond=cond, plan="classifier",
               context={"model": model})
    assert "\n" not in str(e.value)
