"""Pipelines: encode -> sample with velodiff's core -> decode, for any LoadedModel.

from velodiff.models import load
from velodiff.pipelines import text2img
result = text2img(load("sd15/"), "a red cube on a table", steps=20, seeds=[1, 2])
result.images[0].save("cube.png"); result.nfe, result.evals
"""

from .common import GenerationResult, initial_noise
from .img2img import img2img
from .inpaint import inpaint
from .text2img import text2img

__all__ = ["GenerationResult", "img2img", "initial_noise", "inpaint", "text2img"]
