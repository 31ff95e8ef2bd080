"""Join a student's two UNet halves from run.py into a diffusers student folder velodiff loads.

    python bench/distill/gpu/join.py OUT_DIR/best-2step OUT_FOLDER 2      # the halves' prefix, the steps

The folder is the teacher's (the shipped `default`) with the joined UNet (float32) and the student's
sampling defaults (DDIM on the trailing grid, guidance 1, the trained steps), as `velodiff distill` writes
its students."""

from __future__ import annotations

import sys
from pathlib import Path

from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from velodiff.distill.teacher import save_student
from velodiff.shipped import resolve_model


def main() -> None:
    prefix, out, k = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    teacher = resolve_model("default")
    state = {**load_file(f"{prefix}-unet-0.safetensors"), **load_file(f"{prefix}-unet-1.safetensors")}
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(teacher / "unet"))
    unet.load_state_dict({key: v.float() for key, v in state.items()})
    sampling = {"solver": "ddim", "steps": k, "guidance": 1.0, "grid": "trailing", "trained_steps": k}
    card = f"# {k}-step DMD student trained on a GPU by bench/distill/gpu/run.py\n"
    save_student(teacher, unet, out, sampling, card)


if __name__ == "__main__":
    main()
