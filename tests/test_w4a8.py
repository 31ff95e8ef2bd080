"""The simulated W4A8 quantizer (``w4a8``): 4-bit group-wise weights with at most 16 levels per group
and half a step of error, 8-bit per-token activations with the outlier channels kept exactly, a run
close to (not equal to) the float one, and the float network back after it."""

from __future__ import annotations

import torch

import velodiff
from velodiff.accel.quantize import evaluation_error, linear_layers
from velodiff.accel.w4a8 import W4A8, quantize_activations, quantize_weight_groups
from velodiff.pipelines import text2img

torch.set_num_threads(1)


def test_weight_groups_have_16_levels_and_half_a_step_of_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 70, generator=g)  # 70 = 64 + a short last group
    q = quantize_weight_groups(w, 64)
    # all of one sign: the range holds 0 (a storable zero point), the short group's too
    positive = torch.rand(6, 70, generator=g) + 1
    for ws, qs in ((w, q), (positive, quantize_weight_groups(positive, 64))):
        for group in (slice(0, 64), slice(64, 70)):
            block = ws[:, group]
            step = (block.amax(1).clamp(min=0) - block.amin(1).clamp(max=0)) / 15
            assert all(len(torch.unique(row)) <= 16 for row in qs[:, group])
            assert ((qs[:, group] - block).abs() <= step[:, None] / 2 + 1e-6).all()
    assert (
        torch.equal(quantize_weight_groups(q, 64), q)
        or (quantize_weight_groups(q, 64) - q).abs().max() < 1e-5
    )


def test_activations_keep_the_outlier_channels_and_round_the_rest():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 10, 100, generator=g)
    x[..., 7] *= 50  # an outlier channel
    q = quantize_activations(x, 0.01)
    assert torch.equal(q[..., 7], x[..., 7])
    neg = x.clone()
    neg[..., 3] = -50 * neg[..., 3].abs()  # outliers by magnitude: a large negative channel is kept too
    assert torch.equal(quantize_activations(neg, 0.02)[..., 3], neg[..., 3])
    rest = torch.cat([x[..., :7], x[..., 8:]], -1)
    qr = torch.cat([q[..., :7], q[..., 8:]], -1)
    step = rest.abs().amax(-1, keepdim=True) / 127
    assert ((qr - rest).abs() <= step / 2 + 1e-6).all() and not torch.equal(qr, rest)
    q0 = quantize_activations(x, 0.0)  # no outlier kept: the big channel sets every token's step
    assert (q0 - x).abs().max() > (q - x).abs().max()


def test_a_run_is_close_to_float_and_leaves_the_float_network():
    model = velodiff.load("default")
    before = {n: m.weight for n, m in linear_layers(model.network)}
    err = evaluation_error(model, W4A8(), t=0.5, seed=0, prompt="a red circle")
    assert 1e-4 < err < 0.1
    kw = dict(steps=3, seeds=[0], output="latent")
    plain = text2img(model, "a red circle", **kw).latents
    quant = text2img(model, "a red circle", plan="w4a8", **kw).latents
    assert 0 < float((quant - plain).abs().max()) < 0.5 * float(plain.abs().max())
    assert all(m.weight is before[n] for n, m in linear_layers(model.network))
    assert torch.equal(text2img(model, "a red circle", **kw).latents, plain)


def test_one_set_of_quantized_weights_per_network():
    """Runs at different group sizes keep only the last size's weights (a server takes any size from a
    request); a size used again is quantized again, to the same values."""
    from velodiff.accel import w4a8

    model = velodiff.load("default")
    kw = dict(steps=2, seeds=[0], output="latent")
    first = text2img(model, "a red circle", plan="w4a8:group_size=32", **kw).latents
    for g in (8, 16, 64):
        text2img(model, "a red circle", plan=f"w4a8:group_size={g}", **kw)
    assert w4a8._WEIGHTS[model.network][0][0] == 64
    assert sum(1 for net in w4a8._WEIGHTS if net is model.network) == 1
    assert torch.equal(text2img(model, "a red circle", plan="w4a8:group_size=32", **kw).latents, first)


def test_weights_made_by_a_plain_run_serve_a_later_run_with_gradients():
    model = velodiff.load("default")
    kw = dict(steps=2, seeds=[0], output="latent")
    text2img(model, "three blue squares", plan="w4a8", **kw)  # quantizes, under inference mode
    steered = text2img(model, "three blue squares", plan="w4a8+classifier:head=colors,through=network", **kw)
    assert "classifier" in steered.plan


def test_an_image_is_the_same_alone_and_in_a_batch():
    """The outlier channels are picked per sample: another image in the batch (or CFG's unconditional
    row) does not change which channels of this one stay in float, so a server may batch w4a8 jobs."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 10, 100, generator=g)
    x[1, :, 5] *= 80  # an outlier in the second sample only
    both = quantize_activations(x, 0.01)
    for i in range(3):
        assert torch.equal(both[i : i + 1], quantize_activations(x[i : i + 1], 0.01))
    # (through the whole network the batched matmuls' round-off can still flip a rounding: differences of
    # a quantization step, not the other image's outliers)


def test_gradients_pass_straight_through_the_rounding():
    """The straight-through estimator: the slope of the quantized activations is the identity's, where
    the rounding alone would give zero (and guidance through a w4a8 network would see no gradient)."""
    x = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    q = quantize_activations(x, 0.05)
    (q * torch.arange(64.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(64.0).expand(2, 4, 64))
    with torch.no_grad():
        assert torch.equal(quantize_activations(x, 0.05), q.detach())  # the values are the rounded ones


def test_activations_are_multiples_of_each_tokens_max_over_127():
    """Symmetric 8 bits: each token's rounded values are whole multiples of its largest (non-outlier)
    magnitude over 127, from -127 to 127, and that largest value is kept exactly."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 40, generator=g)
    q = quantize_activations(x, 0.0)
    amax = x.abs().amax(-1, keepdim=True)
    k = q * 127 / amax
    assert (k - k.round()).abs().max() < 1e-4 and k.abs().max() <= 127 + 1e-4
    at = x.abs().argmax(-1, keepdim=True)
    torch.testing.assert_close(q.gather(-1, at), x.gather(-1, at), rtol=1e-6, atol=0)


def test_weight_groups_dequantize_onto_an_integer_zero_point_grid():
    """Asymmetric 4 bits with an integer zero point (what a kernel stores): every dequantized value of a
    group is a whole multiple of its step, so 0 is exactly representable."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(4, 32, generator=g) + 0.3
    q = quantize_weight_groups(w, 16)
    for group in (slice(0, 16), slice(16, 32)):
        block, qs = w[:, group], q[:, group]
        step = (block.amax(1, keepdim=True) - block.amin(1, keepdim=True)) / 15
        k = qs / step
        assert (k - k.round()).abs().max() < 1e-4


def test_the_rule_runs_each_linear_on_its_4_bit_weights_and_8_bit_inputs_with_its_options():
    """On a network of one Linear: w4a8:group_size=G,outliers=F computes Linear(quantize_activations(x, F))
    with the weight quantize_weight_groups(w, G), and the float layer after the run."""
    import torch.nn.functional as F

    from velodiff.plan import RunInfo

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32))
    x = torch.randn(2, 5, 64)
    x[..., 3] *= 40
    plain = net(x)
    for group_size, outliers in ((16, 0.0), (32, 0.1)):
        rule = W4A8(group_size=group_size, outliers=outliers)
        info = RunInfo(schedule=None, ts=torch.tensor([1.0, 0.0]), solver=None, batch=2, conds={},
                       network=net)
        rule.check(info)
        rule.begin(info)
        try:
            got = net(x)
        finally:
            rule.end()
        want = F.linear(quantize_activations(x, outliers), quantize_weight_groups(net[0].weight, group_size),
                        net[0].bias)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(net(x), plain)


def test_every_dequantized_weight_is_a_4_bit_code_with_a_storable_zero_point():
    """What a W4A8 kernel stores: per group a scale s and a zero point z in [0, 15], per weight a code q in
    [0, 15]; each dequantized weight is (q - z) s. A group all of one sign (here all positive) needs 0
    inside its range for z to be storable (unclamped, z was about -150: a result no kernel gives)."""
    from velodiff.accel.w4a8 import quantize_weight_groups

    torch.manual_seed(0)
    w = torch.cat([1 + 0.1 * torch.rand(4, 16), torch.randn(4, 16), -2 - torch.rand(4, 16)])
    dq = quantize_weight_groups(w, 16)
    lo, hi = w.amin(1, keepdim=True).clamp(max=0), w.amax(1, keepdim=True).clamp(min=0)
    s = (hi - lo) / 15
    z = torch.round(-lo / s)
    codes = dq / s + z
    assert bool(((z >= 0) & (z <= 15)).all())
    torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)
    assert bool(((codes.round() >= 0) & (codes.round() <= 15)).all())
    assert float((dq - w).abs().max()) <= float(s.max()) / 2 + 1e-6  # round to nearest within the range
