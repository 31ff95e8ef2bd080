"""The ``compile`` plan rule: the run goes through torch.compile (and channels-last when asked) and the
network is eager and contiguous again after it; settings a device cannot serve are one line. The
roofline bench counts FLOPs per evaluation and relates time to the measured matmul peak."""

from __future__ import annotations

import pytest
import torch

import velodiff
from velodiff.eval.roofline import evaluation_flops, roofline
from velodiff.pipelines import text2img

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return velodiff.load("default")


def _latents(model, plan=None):
    return text2img(
        model, ["a red circle"] * 2, seeds=[0, 1], steps=3, output="latent", plan=plan or []
    ).latents


def test_compiled_runs_match_eager_and_leave_the_network_eager(model) -> None:
    unet = model.components["unet"]
    plain = _latents(model)
    calls: list[int] = []
    real = unet.compile

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    unet.compile = spy
    try:
        traced = _latents(model, ["compile:backend=eager"])  # Dynamo's tracing, eager kernels: identical
        assert calls and torch.equal(traced, plain)
        fused = _latents(model, ["compile:backend=aot_eager,channels_last=true"])
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    finally:
        del unet.compile
    assert unet._compiled_call_impl is None
    conv = unet.conv_in.weight
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(_latents(model), plain)


def test_cuda_graph_modes_on_a_cpu_are_one_line(model) -> None:
    with pytest.raises(velodiff.VelodiffError, match="uses CUDA graphs"):
        _latents(model, ["compile:mode=reduce-overhead"])
    assert model.components["unet"]._compiled_call_impl is None


def test_roofline_counts_flops_per_row_and_relates_time_to_the_limit(model) -> None:
    one, four = evaluation_flops(model, 1), evaluation_flops(model, 4)
    assert one > 1e8 and abs(four - one) / one < 1e-6  # per image row, independent of the batch
    (rec,) = roofline(model, ["none"], batch=1, steps=2, rounds=1, peak_size=256)
    assert rec["evals_per_image"] == 4 and rec["max_abs_diff_to_plain"] == 0.0  # CFG: 2 per step
    assert rec["limit_s"] == pytest.approx(rec["gflop_per_eval_row"] * 1e9 / (rec["peak_gflops"] * 1e9))
    assert rec["x_limit"] == pytest.approx(rec["s_per_eval_row"] / rec["limit_s"])


def test_a_network_the_user_compiled_is_compiled_again_after_the_run() -> None:
    """The rule puts back the network's own compiled call (a torch.compile the user made before), not the
    eager one."""
    from velodiff.accel.compile import Compile
    from velodiff.plan import RunInfo

    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    net.compile(backend="eager")
    users = net._compiled_call_impl
    run = RunInfo(schedule=None, ts=torch.tensor([1.0, 0.0]), solver=None, batch=1, conds={}, network=net)
    rule = Compile(backend="eager")
    rule.check(run)
    rule.begin(run)
    assert net._compiled_call_impl is not users
    rule.end()
    assert net._compiled_call_impl is users


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_every_cuda_graph_mode_is_refused_on_a_cpu(mode) -> None:
    from velodiff.accel.compile import Compile
    from velodiff.plan import RunInfo

    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    run = RunInfo(schedule=None, ts=torch.tensor([1.0, 0.0]), solver=None, batch=1, conds={}, network=net)
    with pytest.raises(velodiff.VelodiffError, match=f"mode '{mode}' uses CUDA graphs; on cpu use") as e:
        Compile(mode=mode).check(run)
    assert "\n" not in str(e.value)
    Compile(mode="max-autotune-no-cudagraphs").check(run)


def test_roofline_divides_the_time_by_every_image_rows_evaluations(model, monkeypatch) -> None:
    """A batch of 2 evaluates 2 image rows per evaluation: with a clock that spends 1 s on each timed run,
    seconds per evaluation row are 1 / (evaluations per image x 2)."""
    import velodiff.eval.roofline as rl

    ticks = iter(float(i) for i in range(10_000))

    class Clock:
        @staticmethod
        def perf_counter():
            return next(ticks)

    monkeypatch.setattr(rl, "time", Clock)
    (rec,) = roofline(model, ["none"], batch=2, steps=2, rounds=1, peak_size=64)
    assert rec["evals_per_image"] == 4
    assert rec["s_per_eval_row"] == pytest.approx(1.0 / (4 * 2))
