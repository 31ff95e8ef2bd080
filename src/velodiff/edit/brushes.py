"""Layered region brushes (after Gholami et al. 2024, 'Layered Diffusion Brushes'): masked regions, each with
its own prompt, seed and strength, re-denoised from the cached intermediate latents of the layers below,
so an edit runs only the last ``strength`` share of the steps.

    canvas = Canvas(model, "a red circle", seed=0, steps=20, guidance=2.5)   # the base, trajectory cached
    canvas.add(mask, "a blue square", seed=3, strength=0.6)                   # a layer (index 0)
    result = canvas.render()                                                 # re-runs the dirty layers only

A layer with strength s starts at the grid step k = steps - int(steps * s) (img2img's rule) from the
composite of the layers below at that step: inside the mask m (downsampled to the latents), the sample is
re-noised with the layer's own noise, x_k = alpha_k x0_k + sigma_k eps_layer, where x0_k is the prediction
the run below made at t_k (the region keeps the coarse content at that noise level and draws new
detail); then the run goes on under the layer's prompt, and after every step the sample outside the mask
is put back to the cached trajectory below, x <- m x + (1 - m) x_below (the blend of RePaint / the
paper's masked latent blending). Outside its mask a layer's result is therefore the composite below,
exactly. Each layer caches its own trajectory, so changing, removing or moving layer j re-renders
layers j.. only; layers stack in list order (reorder with :meth:`Canvas.move`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import VelodiffError
from ..limits import check_strength, is_integer


@dataclass
class Layer:
    """A brush stroke: ``mask`` (H, W) at image or latent size, 1 = repaint; ``prompt``; ``seed`` of its
    noise; ``strength`` in (0, 1], the share of the steps it re-runs."""

    mask: Any
    prompt: str
    seed: int = 0
    strength: float = 0.6


@dataclass
class Trajectory:
    xs: list[Tensor]  # x at ts[i], i = 0..N
    x0s: list[Tensor | None]  # the prediction made at ts[i] (None where not run)
    nfe: int = 0


@dataclass
class Canvas:
    """A base generation and its brush layers (module docstring). ``options``: text2img's keywords."""

    model: Any
    prompt: str
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    layers: list[Layer] = field(default_factory=list)

    def __init__(self, model: Any, prompt: str, seed: int = 0, **options: Any) -> None:
        from ..noise import check_seed
        from ..pipelines.common import check_model
        from ..pipelines.setup import Sampling, check_output

        check_model(model)
        if not isinstance(prompt, str) or not prompt.strip():
            raise VelodiffError(f"the canvas's prompt is a non-empty string, got {prompt!r}")
        check_seed(seed)
        self.model, self.prompt, self.seed, self.layers = model, prompt, seed, []
        for k in ("seeds", "latents", "callback", "output"):
            if k in options:
                raise VelodiffError(f"Canvas takes no {k!r}; the base is one image of seed {seed}")
        Sampling.of("Canvas", options)
        check_output("pil")
        self.options = options
        self._cache: list[Trajectory] = []  # _cache[0]: the base; _cache[j + 1]: after layer j
        self.last_nfe = self.last_base_nfe = 0

    # -- layers --

    def add(self, mask: Any, prompt: str, seed: int = 0, strength: float = 0.6) -> int:
        """Add a layer on top; returns its index."""
        self.layers.append(self._checked(Layer(mask, prompt, seed, strength)))
        return len(self.layers) - 1

    def update(self, index: int, **changes: Any) -> None:
        """Change layer ``index`` (mask, prompt, seed, strength); it and the layers above re-render. A
        change refused leaves the layer as it was."""
        layer = self.layers[self._index(index)]
        unknown = sorted(set(changes) - set(layer.__dict__))
        if unknown:
            raise VelodiffError(f"a layer has no {unknown[0]!r}; change its mask, prompt, seed or strength")
        self.layers[index] = self._checked(Layer(**{**layer.__dict__, **changes}))
        del self._cache[index + 1 :]

    def remove(self, index: int) -> None:
        del self.layers[self._index(index)]
        del self._cache[index + 1 :]

    def move(self, index: int, to: int) -> None:
        """Move layer ``index`` to position ``to`` (the stack order)."""
        self._index(to)  # both checked before the stack changes (a refused move lost the layer)
        layer = self.layers.pop(self._index(index))
        self.layers.insert(to, layer)
        del self._cache[min(index, to) + 1 :]

    def _index(self, i: int) -> int:
        n = len(self.layers)
        if not is_integer(i) or not 0 <= i < n:
            raise VelodiffError(f"no layer {i}; the canvas has {len(self.layers)} layers")
        return i

    def _checked(self, layer: Layer) -> Layer:
        """The layer, checked whole when it is added or changed (not at the next render, after the good
        layer it replaced was gone)."""
        from ..noise import check_seed

        if not isinstance(layer.prompt, str) or not layer.prompt.strip():
            raise VelodiffError("a layer's prompt is empty; describe what the brush paints")
        check_strength(layer.strength, "a layer's strength", zero=False)
        check_seed(layer.seed)
        from ..pipelines.img2img import check_runs_a_step

        # as img2img: no silent round-up
        check_runs_a_step(self._setup()[0].steps, float(layer.strength), self.model)
        h, w = self.model.default_size
        self._mask(layer.mask, self.model.latent_shape(1, h, w))
        return layer

    # -- rendering --

    def render(self, output: str = "pil") -> Any:
        """The composite of the base and every layer; runs only what changed since the last render.
        ``last_nfe`` holds the network calls this render made, ``last_base_nfe`` those of the base."""
        from ..pipelines.common import finish
        from ..sampling import SampleResult

        setup, h, w = self._setup()
        self.last_nfe = 0
        if not self._cache:
            self._cache.append(self._run(setup, None, self.prompt, 0, None, None))
        self.last_base_nfe = self.last_nfe  # the base's calls (0 once its trajectory is cached)
        for j in range(len(self._cache) - 1, len(self.layers)):
            layer = self.layers[j]
            self._cache.append(self._run(setup, self._cache[-1], layer.prompt, layer.seed, layer, (h, w)))
        top = self._cache[-1]
        res = SampleResult(top.xs[-1], self.last_nfe, 0, setup.steps, plan=str(setup.plan))
        return finish(
            self.model,
            res,
            setup,
            [self.seed],
            output,
            setup.ts,
            prompts=[self.prompt],
            height=h,
            width=w,
            layers=len(self.layers),
        )

    def _setup(self) -> tuple[Any, int, int]:
        from ..pipelines.setup import Sampling, make_setup

        opts = Sampling.of("Canvas", self.options)
        h, w = self.model.default_size
        setup = make_setup(self.model, opts, size=(h, w))
        if setup.solver.draws_noise(setup.options):  # an ancestral / SDE solver, or eta / s_churn above 0
            name = setup.solver.name
            raise VelodiffError(f"brushes need a deterministic solver; {name!r} draws step noise here (use "
                                "ddim, dpmpp_2m, unipc, ... with eta 0)")
        return setup, h, w

    def _mask(self, mask: Any, shape: tuple[int, ...]) -> Tensor:
        from ..pipelines.images import mask_tensor

        m = mask_tensor(mask)[:1]
        lh, lw = shape[-2:]
        f = self.model.vae_scale_factor
        if tuple(m.shape[-2:]) == (lh * f, lw * f):
            m = torch.nn.functional.interpolate(m, size=(lh, lw), mode="area")
        elif tuple(m.shape[-2:]) != (lh, lw):
            raise VelodiffError(
                f"a layer's mask is {m.shape[-1]}x{m.shape[-2]}; give it at the image's size "
                f"({lw * f}x{lh * f}) or the latents' ({lw}x{lh})"
            )
        if float(m.max()) <= 0:
            raise VelodiffError("a layer's mask covers nothing; paint the region to change in white")
        return m.to(self.model.device)

    def _run(
        self,
        setup: Any,
        below: Trajectory | None,
        prompt: str,
        seed: int,
        layer: Layer | None,
        size: tuple[int, int] | None,
    ) -> Trajectory:
        from ..noise import prior_sample
        from ..pipelines.common import encode_batch_prompts, initial_noise, run
        from ..pipelines.img2img import start_index
        from ..pipelines.setup import Sampling

        m = self.model
        h, w = m.default_size
        shape = m.latent_shape(1, h, w)
        ts, n = setup.ts, setup.steps
        if below is None:
            k, mask = 0, None
            x = prior_sample(m.schedule, float(ts[0]), initial_noise(shape, [self.seed]).to(m.device))
        else:
            assert layer is not None
            k = start_index(n, float(layer.strength), m)  # < n: _checked refused strengths that run no step
            mask = self._mask(layer.mask, shape)
            eps = initial_noise(shape, [seed]).to(m.device)
            a, s = float(m.schedule.alpha(ts[k])), float(m.schedule.sigma(ts[k]))
            x0k = below.x0s[k]
            fresh = a * x0k + s * eps if x0k is not None else below.xs[k]
            x = mask * fresh + (1 - mask) * below.xs[k]
        xs: list[Tensor] = [*(below.xs[:k] if below else []), x]
        x0s: list[Tensor | None] = [*(below.x0s[:k] if below else [])]

        def keep_outside(info: Any) -> Tensor | None:
            x0s.append(info.x0)
            if mask is None:
                xs.append(info.x)
                return None
            blended = mask * info.x + (1 - mask) * below.xs[len(xs)]  # type: ignore[union-attr]
            xs.append(blended)
            return blended

        opts = Sampling.of("Canvas", self.options)
        cond = encode_batch_prompts(m, [prompt], opts.negative, setup.plan.needs("uncond"), h, w)
        res = run(m, setup, opts, x, cond, [seed], [prompt], (h, w), ts=ts[k:], callback=keep_outside)
        x0s.append(None)
        self.last_nfe += res.nfe
        return Trajectory(xs, x0s, res.nfe)
