"""Quantization plan rules (velodiff.accel.quantize, torchao): the network runs with quantized Linear
weights for the run and its own weights after it; the error of one evaluation is small and measured;
the rules stack with guidance and block hooks; schemes a device cannot run are one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("torchao")

import velodiff  # noqa: E402
from velodiff.accel.quantize import Int8, evaluation_error, linear_layers  # noqa: E402
from velodiff.default_model import default_model_path  # noqa: E402
from velodiff.errors import VelodiffError  # noqa: E402
from velodiff.pipelines import text2img  # noqa: E402

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def model():
    path = Path(default_model_path())
    if not (path / "model_index.json").is_file():
        pytest.skip(f"no default model at {path}")
    return velodiff.load(path)


def run(model, plan, **kw):
    return text2img(model, [PROMPT] * 2, steps=6, guidance=2.5, seeds=[0, 1], output="tensor", plan=plan,
                    **kw)


def test_int8_runs_quantized_then_restores_the_weights(model):
    network = model.network
    layers = linear_layers(network)
    assert layers, "the default UNet has Linear layers to quantize"
    originals = {n: m.weight for n, m in layers}
    seen = []

    def look(info):
        seen.append({type(m.weight).__name__ for _, m in layers})

    plain = run(model, None)
    quantized = run(model, "int8", callback=look)
    again = run(model, None)
    assert seen and all(kinds == {"Int8Tensor"} for kinds in seen)  # every step ran on int8 weights
    assert all(m.weight is originals[n] for n, m in layers)  # the float weights are back, the same objects
    assert torch.equal(again.images, plain.images)
    d = (quantized.images - plain.images).abs()
    assert 0 < d.mean() < 0.01, d.mean()  # close to the float run, and not the float run itself
    assert quantized.plan == "int8+cfg" and quantized.nfe == plain.nfe


def test_runs_of_one_network_from_two_threads_take_turns(model):
    """A run's rules swap the shared network's weights (int8) for that run: a run of the same network
    from another thread waits for it to end, so it neither runs on the int8 weights nor leaves them on."""
    import threading

    inside, release, out, seen = threading.Event(), threading.Event(), {}, []

    def hold(info):  # run A stops in its first step until released
        if info.i == 0:
            inside.set()
            release.wait(timeout=60)

    def watch(info):  # run B: was run A holding the network when this step ran?
        seen.append(inside.is_set() and not release.is_set())

    plain = run(model, None)
    a = threading.Thread(target=lambda: out.update(a=run(model, "int8", callback=hold)))
    a.start()
    assert inside.wait(timeout=60)
    b = threading.Thread(target=lambda: out.update(b=run(model, None, callback=watch)))
    b.start()
    b.join(timeout=2)  # without the turn-taking, B runs to its end here, during A's run
    release.set()
    a.join()
    b.join()
    assert seen and not any(seen)
    assert torch.equal(out["b"].images, plain.images)
    assert torch.equal(run(model, None).images, plain.images)  # nothing left on the network


def test_each_scheme_keeps_its_own_quantized_weights(model):
    """int8 and int8:activations=dynamic on one network (a server, a sweep) each run their own weights;
    spellings of one scheme share them."""
    from velodiff import Plan

    weight_only, dynamic, spelled = (Plan.parse(s).rules[0] for s in
                                     ("int8", "int8:activations=dynamic", "int8:activations=none"))
    a, d = weight_only.quantized_weights(model.network), dynamic.quantized_weights(model.network)
    assert a.keys() == d.keys() and all(a[k] is not d[k] for k in a)
    assert spelled.quantized_weights(model.network) is a


def test_a_network_edited_in_place_is_quantized_again(model):
    """The kept quantized weights belong to the weights they were made from: an in-place edit of the
    network (apply_erasure, a fused LoRA) makes int8 and w4a8 quantize it again."""
    from velodiff.accel.quantize import linear_layers
    from velodiff.accel.w4a8 import W4A8

    rule, w4 = Int8(), W4A8()
    before, before4 = rule.quantized_weights(model.network), w4.weights(model.network)
    assert rule.quantized_weights(model.network) is before and w4.weights(model.network) is before4
    name, layer = linear_layers(model.network)[0]
    saved = layer.weight.detach().clone()
    try:
        with torch.no_grad():
            layer.weight.mul_(2.0)
        after, after4 = rule.quantized_weights(model.network), w4.weights(model.network)
        assert after is not before and after4 is not before4
        assert not torch.equal(after[name].dequantize(), before[name].dequantize())
    finally:
        with torch.no_grad():
            layer.weight.copy_(saved)


@pytest.mark.parametrize(("activations", "bound"), [("none", 0.01), ("dynamic", 0.02)])
def test_one_evaluation_error_is_small(model, activations, bound):
    """Measured on the shipped UNet: 0.0024 (weight-only) and 0.0048 (dynamic int8 activations)."""
    err = evaluation_error(model, Int8(activations=activations), prompt=PROMPT)
    assert 0 < err < bound, err


def test_int8_stacks_with_guidance_and_block_hooks(model):
    from velodiff.accel.hooks import FeatureChange

    changes = FeatureChange(blocks=("mid_block",))
    r = run(model, ["int8:activations=dynamic", "pag:scale=2", changes])
    assert r.plan.startswith("int8:activations=dynamic") and "pag" in r.plan
    assert len(changes.curves()["mid_block"]) == 5  # the hooks saw the quantized network's blocks


def test_schemes_this_device_cannot_run_are_one_line(model):
    for plan in ("int4", "fp8", "fp8:activations=dynamic"):
        with pytest.raises(VelodiffError, match="needs a cuda device") as e:
            run(model, plan)
        assert len(str(e.value).splitlines()) == 1
    with pytest.raises(VelodiffError, match="activations"):
        velodiff.plan.Plan.parse("int8:activations=static")
    with pytest.raises(VelodiffError, match="group_size"):
        velodiff.plan.Plan.parse("int4:group_size=48").rules[0].check(None)


def test_int4_quantizes_the_linears_its_groups_divide_and_refuses_a_network_with_none(monkeypatch):
    from velodiff.accel.quantize import Int4
    from velodiff.plan import RunInfo

    rule = Int4(group_size=64)
    assert rule.quantizable(torch.nn.Linear(192, 16)) and not rule.quantizable(torch.nn.Linear(96, 16))
    monkeypatch.setattr(Int4, "devices", ("cpu", "cuda"))  # reach the layer rule on a CPU
    net = torch.nn.Sequential(torch.nn.Linear(48, 48), torch.nn.Linear(48, 32))
    info = RunInfo(schedule=None, ts=torch.tensor([1.0, 0.0]), solver=None, batch=1, conds={}, network=net)
    with pytest.raises(VelodiffError, match="input width is a multiple of group_size 64") as e:
        rule.check(info)
    assert len(str(e.value).splitlines()) == 1
    Int4(group_size=32).check(RunInfo(schedule=None, ts=torch.tensor([1.0, 0.0]), solver=None, batch=1,
                                      conds={}, network=torch.nn.Sequential(torch.nn.Linear(64, 64))))


def test_cli_reports_each_rules_single_evaluation_error(tmp_path, capsys):
    import json

    from velodiff.cli import main

    def cli(*args):
        try:
            return main(list(args))
        except SystemExit as e:
            return int(e.code or 0)

    out = tmp_path / "q.json"
    assert cli("bench", "quantize", "--prompts", "1", "--plans", "int8;w4a8", "--json", str(out)) == 0
    records = {r["plan"]: r for r in json.loads(out.read_text())["records"]}
    assert 0 < records["int8"]["median"] < records["w4a8"]["median"] < 0.1  # 4-bit weights err more
    assert records["int8"]["n"] == 5 and "| `w4a8` |" in capsys.readouterr().out
    assert cli("bench", "quantize", "--plans", "deepcache") == 2
    assert "is not one quantization rule" in capsys.readouterr().err
    # the command's records are the Python API's
    import velodiff
    from velodiff.accel.quantize import evaluation_report
    from velodiff.eval.shapes_eval import load_prompts

    same = evaluation_report(velodiff.load("default"), ["int8", "w4a8"], [load_prompts("v1")[0].text])
    assert same == list(records.values())


def test_weights_quantized_by_a_plain_run_serve_a_later_run_with_gradients(model):
    """The quantized weights are kept per network; made during an inference-mode run, they must not be
    inference tensors, or a later gradient rule (layout guidance) fails to save them for backward."""
    r = run(model, "int8")  # quantizes, under inference mode
    guided = run(model, "int8+layout:steps=0.5,iters=1")
    assert guided.plan.startswith("int8+layout") and not torch.equal(guided.images, r.images)


def test_linear_layers_are_those_at_least_16_wide_with_an_input_width_divisible_by_16():
    net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(24, 32), torch.nn.Linear(32, 8),
                              torch.nn.Linear(48, 64))
    assert [n for n, _ in linear_layers(net)] == ["0", "3"]


def test_a_weight_replaced_by_a_new_tensor_is_quantized_again():
    """Loading or unloading a LoRA may put new weight tensors in place (each at in-place version 0): the
    kept quantized copies follow the weights the network holds now (int8 and w4a8)."""
    from velodiff.accel.w4a8 import W4A8, quantize_weight_groups

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 32))
    int8, w4 = Int8(), W4A8(group_size=16)
    for scale in (2.0, 3.0):
        net[0].weight = torch.nn.Parameter(torch.randn(32, 32) * scale)
        q = int8.quantized_weights(net)["0"].dequantize()
        torch.testing.assert_close(q, net[0].weight.detach(), rtol=0, atol=0.05 * scale)
        assert torch.equal(w4.weights(net)["0"], quantize_weight_groups(net[0].weight.detach(), 16))


def test_the_report_draws_each_prompts_own_noise(model):
    """Prompt i is evaluated from noise seed i: the same prompt twice is two samples of the error."""
    from velodiff.accel.quantize import evaluation_report

    (rec,) = evaluation_report(model, ["int8"], [PROMPT, PROMPT], times=(0.5,))
    assert rec["n"] == 2 and rec["max"] > rec["median"]


def test_a_report_plan_is_one_quantization_rule_alone():
    from velodiff.accel.quantize import quantization_rules

    for plans in (["int8+pag"], ["tome+int8"], ["pag+w4a8"], ["pag"], []):
        with pytest.raises(VelodiffError, match="quantization rule"):
            quantization_rules(plans)
    plans = ["int8", "w4a8:group_size=32"]
    assert [t for t, _ in quantization_rules(plans)] == plans


def test_a_weight_replaced_after_the_old_one_was_freed_is_quantized_again():
    """Unloading a LoRA (or load_state_dict(assign=True)) frees a weight and puts a new tensor in its
    place, often at the freed one's address and at version 0: the quantized copies kept for the old
    weight must not serve the new one (an id and a version alone matched in 19 of 20 swaps)."""
    from velodiff.accel.quantize import Int8
    from velodiff.accel.w4a8 import W4A8, quantize_weight_groups

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 32))
    w4, i8 = W4A8(group_size=16), Int8()
    for trial in range(10):
        i8.quantized_weights(net), w4.weights(net)  # kept for the weight of this round
        del net[0].weight
        net[0].weight = torch.nn.Parameter(torch.randn(32, 32) * (trial + 2))
        w = net[0].weight.detach()
        assert torch.equal(w4.weights(net)["0"], quantize_weight_groups(w, 16)), trial
        assert torch.allclose(i8.quantized_weights(net)["0"].dequantize(), w, atol=0.05 * (trial + 2)), trial
