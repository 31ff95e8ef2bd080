"""Every `velodiff distill` method trains on a CUDA device end to end and its student loads (skipped
without one: the CPU tests cover the methods' properties; this proves that nothing in them is tied to
the CPU, as the schedule's interpolation tables and the reflow straightness report once were)."""

from __future__ import annotations

import pytest
import torch

from velodiff.cli import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = ["--batch", "2", "--checkpoint-every", "1", "--device", "cuda", "--quiet"]
METHODS = {
    "reflow": ["--pairs", "2", "--eval-pairs", "1", "--teacher-steps", "2", "--ode-steps", "2",
               "--reflow-steps", "2", "--distill-steps", "2"],
    "dmd": ["--pairs", "2", "--eval-pairs", "1", "--teacher-steps", "2", "--steps", "3",
            "--student-steps", "2", "--fake-updates", "2", "--gan-weight", "0.01", "--real-images", "4"],
    "lcm": ["--steps", "2", "--cache-size", "4", "--origin-steps", "10"],
    "guided": ["--steps", "2", "--cache-size", "4"],
    "progressive": ["--steps", "2", "--rounds", "1", "--teacher-steps", "4", "--cache-size", "4"],
    "prune": ["--method", "magnitude", "--target-flops", "0.8", "--steps", "2", "--cache-size", "4"],
    "prune-ld": ["--method", "ld", "--calib-prompts", "2", "--calib-steps", "2", "--target-flops", "0.8",
                 "--steps", "2", "--cache-size", "4"],
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_method_trains_on_cuda_and_its_student_loads(method: str, tmp_path) -> None:
    import velodiff
    from velodiff.pipelines.text2img import text2img

    out = tmp_path / "student"
    argv = ["distill", method.split("-")[0], "--out", str(out), "--run", str(tmp_path / "run"),
            *METHODS[method], *TINY]
    try:
        code = main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    assert code == 0
    model = velodiff.load(out, device="cuda")
    images = text2img(model, ["a red circle"], output="latent").latents
    assert images.device.type == "cuda" and bool(torch.isfinite(images).all())
