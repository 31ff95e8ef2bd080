"""The models a server holds and what it runs with them: a request's checks (one line each, before it is
queued) and one batch of compatible jobs through ``velodiff.pipelines.text2img`` (with layout guidance
on a job's boxes), or one collage job alone through ``velodiff.edit.collage``.

A model is loaded once, on first use (the served one at start-up). Requests name it by the name the
server was started with (``--model``), or by a shipped name (``default``). A job's parameters are
normalized here (the model's defaults filled in, the plan written canonically), so jobs that sample
alike share one ``batch_key`` and run as one batch.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..commands.names import BATCH_NOISE, NOISE_MODES
from ..errors import VelodiffError, unknown_name
from ..images import png_bytes
from ..limits import SEED_END, SEED_MIN, check_guidance

#: the parameters that must agree for jobs to share a batch (prompt, seed and n may differ)
BATCH_FIELDS = ("model", "width", "height", "steps", "solver", "solver_options", "grid", "guidance",
                "negative", "plan", "layout", "noise")


@dataclass
class Request:
    """What a client asks for (every API turns its own body into this)."""

    prompt: str
    model: str | None = None
    negative: str | None = None
    width: int | None = None
    height: int | None = None
    n: int = 1
    seed: int | None = None
    steps: int | None = None
    solver: str | None = None
    #: the solver's options (set by an API whose sampler names carry them, as ComfyUI's rows do)
    solver_options: dict[str, Any] | None = None
    grid: str | None = None
    guidance: float | None = None
    plan: str | None = None
    #: object boxes, "red circle: 0.1,0.1,0.45,0.45; ..." (``velodiff generate --layout``'s)
    layout: str | None = None
    #: "guidance" (layout guidance steers attention into the boxes) or "collage" (velodiff.edit.collage)
    layout_mode: str = "guidance"
    #: the noise mode (``velodiff generate --noise``); torch or cuda (one generator for the job's images, as
    #: ComfyUI draws a batch's starting noise) runs the job in a batch of its own
    noise: str = "velodiff"
    timeout_s: float | None = None
    preview: bool = False


def batch_key(params: dict[str, Any]) -> str:
    """Jobs of one key may share a network call. A collage (drawn an object at a time), a plan whose rule
    decides for the whole batch (``Accelerator.couples_batch``) and torch or cuda noise (one generator for
    the call's images) would make an image change with the jobs beside it: they get a key of their own."""
    from ..plan import Plan

    coupled = any(r.couples_batch for r in Plan.parse(params.get("plan")).rules)
    if params.get("kind") == "collage" or coupled or params.get("noise") in BATCH_NOISE:
        import uuid

        return f"alone:{uuid.uuid4().hex}"
    return json.dumps({k: params.get(k) for k in BATCH_FIELDS}, sort_keys=True)


class Stopped(Exception):
    """Raised from a collage's callbacks when the worker stops the run (its job cancelled or timed out)."""


class Engine:
    """Loads models on demand (thread-safe) and runs batches (from the worker thread only)."""

    def __init__(
        self,
        model: str = "default",
        *,
        device: str | None = None,
        threads: int | None = None,
        max_n: int = 8,
        max_steps: int = 200,
        max_pixels: int = 1024 * 1024,
        load_options: dict[str, Any] | None = None,
    ) -> None:
        self.served = model
        #: how the served model loads (a single file's config, a forced family / prediction type)
        self.load_options = dict(load_options or {})
        self.device = device
        self.threads = threads
        self.max_n = max_n
        self.max_steps = max_steps
        self.max_pixels = max_pixels
        self._models: dict[str, tuple[Any, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        #: held by whatever runs a network (the worker's batches, a stream's frames): one at a time
        self.run_lock = threading.Lock()

    # --- models -----------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The model names requests may give: the served one first, then the shipped ones."""
        from ..shipped import SHIPPED

        return list(dict.fromkeys([self.served, *SHIPPED]))

    def model(self, name: str | None) -> tuple[Any, dict[str, Any]]:
        """(LoadedModel, sampling defaults) of ``name`` (None: the served model), loaded once."""
        name = name or self.served
        if name not in self.names():
            raise unknown_name("model", name, self.names())
        with self._lock:
            if name not in self._models:
                from ..commands.generate import load_model, quiet_libraries
                from ..models.base import default_dtype, resolve_device

                quiet_libraries()
                device = resolve_device(self.device)
                how = self.load_options if name == self.served else {}
                self._models[name] = load_model(name, self.threads, str(device), dtype=default_dtype(device),
                                                **how)
            return self._models[name]

    # --- checks -----------------------------------------------------------------------------------

    def check(self, req: Request) -> dict[str, Any]:
        """The job's normalized parameters, or one VelodiffError line saying what is wrong."""
        from ..plan import Plan
        from ..solvers import get_solver

        if not req.prompt or not req.prompt.strip():
            raise VelodiffError(
                'the prompt is empty; describe the image, e.g. "a red circle above a blue square"'
            )
        if not 1 <= req.n <= self.max_n:
            raise VelodiffError(f"n must be between 1 and {self.max_n} (this server's bound), got {req.n}")
        name = req.model or self.served
        m, defaults = self.model(name)
        h = int(req.height if req.height is not None else m.default_size[0])  # 0 is refused, not the default
        w = int(req.width if req.width is not None else m.default_size[1])
        f = m.size_factor
        for what, v in (("width", w), ("height", h)):
            if v <= 0 or v % f:
                raise VelodiffError(
                    f"{what} {v} is not a positive multiple of {f}, the latent factor of this "
                    f"{m.family} model; try {max(f, round(v / f) * f)}"
                )
        if w * h > self.max_pixels:
            raise VelodiffError(
                f"{w}x{h} is more than this server's bound of {self.max_pixels} pixels per image"
            )
        if req.plan and req.plan.strip().startswith("@"):  # Plan.parse would read a file of the server's
            raise VelodiffError("the server reads no plan file (@FILE); send the plan string itself")
        parsed = Plan.parse(req.plan) if req.plan else None
        steps = req.steps if req.steps is not None else defaults.get("steps", m.default_steps)
        fixed = parsed.settings if parsed is not None else {}
        steps = fixed.get("steps", fixed.get("nfe", steps))  # what the plan sets, the run does
        if not 1 <= int(steps) <= self.max_steps:
            raise VelodiffError(f"steps must be between 1 and {self.max_steps}, got {steps}")
        solver = req.solver or defaults.get("solver") or m.default_solver
        get_solver(solver)  # unknown: "unknown solver 'x'; valid: ..."
        if req.grid is not None:  # velodiff's grids, other tools' names and the model's calibrated one
            from ..commands.names import check_grid_name

            check_grid_name(req.grid)
        guidance = float(
            req.guidance if req.guidance is not None else defaults.get("guidance", m.default_guidance)
        )
        check_guidance(guidance, "guidance", high=100)
        plan = str(parsed) if parsed is not None else None
        for what, text in (("prompt", req.prompt), ("negative prompt", req.negative)):
            if text:
                self.check_tokens(m, what, text)
        if req.timeout_s is not None and not req.timeout_s > 0:
            raise VelodiffError(f"timeout_s must be > 0, got {req.timeout_s}")
        seed = req.seed if req.seed is not None else random.randrange(2**31)
        if not SEED_MIN <= seed or not seed + int(req.n) - 1 < SEED_END:  # the CLI's: torch's seed range
            raise VelodiffError(
                f"seed must be in [-2**63, 2**64) for each of the n images, got {seed} with n {req.n}"
            )
        if req.noise not in NOISE_MODES:
            raise unknown_name("noise mode", req.noise, NOISE_MODES)
        layout = self.check_layout(req)
        params = dict(
            kind="collage" if req.layout_mode == "collage" else "text2img",
            model=name,
            prompt=req.prompt,
            negative=req.negative or None,
            width=w,
            height=h,
            n=int(req.n),
            seed=int(seed),
            steps=int(steps),
            solver=solver,
            solver_options=dict(req.solver_options) if req.solver_options else None,
            grid=req.grid,
            guidance=guidance,
            plan=plan,
            layout=layout,
            noise=req.noise,
            preview=bool(req.preview),
        )
        self.check_can_run(m, params)
        return params

    def check_can_run(self, m: Any, p: dict[str, Any]) -> None:
        """Refuse now (400) what the worker would refuse before the first step: a grid the model's
        schedule has not (linear_quadratic on a VP model), a plan rule this model or device cannot run
        (fp8 on a CPU, tome on a DiT, cfg_zero on a VP model); a job never fails for its settings."""
        from ..pipelines.common import check_setup
        from ..pipelines.setup import Sampling, make_setup

        plan = ([p["plan"]] if p["plan"] else []) if p["kind"] == "collage" else self.plan_rules(p)
        opts = Sampling.of("serve", dict(steps=p["steps"], solver=p["solver"], grid=p["grid"],
                                         solver_options=p.get("solver_options"), guidance=p["guidance"],
                                         plan=plan))
        size = (p["height"], p["width"])
        check_setup(m, make_setup(m, opts, size=size), [p["prompt"]] * p["n"], size)

    @staticmethod
    def check_layout(req: Request) -> dict[str, Any] | None:
        """The request's boxes ({words: box or list of boxes}), checked against its prompt; a collage
        without boxes takes them from the prompt's objects (None: guidance without boxes)."""
        from ..edit.collage import collage_boxes
        from ..edit.layout import check_boxes, parse_layout

        if req.layout_mode not in ("guidance", "collage"):
            raise VelodiffError(f"layout_mode {req.layout_mode!r}: use guidance or collage")
        boxes = parse_layout(req.layout) if req.layout else None
        if boxes is not None:
            check_boxes(boxes, req.prompt)
        elif req.layout_mode == "collage":
            boxes = collage_boxes(req.prompt)
        return boxes

    @staticmethod
    def check_tokens(m: Any, what: str, text: str) -> None:
        tok = m.components.get("tokenizer") if hasattr(m, "components") else None
        limit = getattr(m, "max_tokens", None)
        if tok is None or limit is None:
            return
        n = len(tok(text, truncation=False, verbose=False).input_ids)
        if n > limit:
            raise VelodiffError(
                f"the {what} is {n} tokens long; this model reads at most {limit} (start and end included)"
            )

    # --- running ----------------------------------------------------------------------------------

    def run(
        self, jobs: list[Any], on_step: Callable[[int, int, Any], bool | None] | None = None
    ) -> list[list[Any]]:
        """One text2img call for the jobs (same batch key): images i..i+n of the batch are job k's
        (seeds seed..seed+n-1). ``on_step(i, steps, x0)`` after each step; True stops the run."""
        from ..pipelines import text2img

        p = jobs[0].params
        m, _ = self.model(p["model"])
        if p.get("kind") == "collage":
            return [self.collage(m, j.params, on_step) for j in jobs]
        prompts, seeds = [], []
        for j in jobs:
            prompts += [j.params["prompt"]] * j.params["n"]
            seeds += [j.params["seed"] + i for i in range(j.params["n"])]
        steps = p["steps"]

        def callback(info: Any) -> bool | None:
            return None if on_step is None else on_step(info.i, steps, info.x0)

        with self.run_lock:
            res = text2img(
                m,
                prompts,
                seeds=seeds,
                height=p["height"],
                width=p["width"],
                steps=steps,
                solver=p["solver"],
                solver_options=p.get("solver_options"),
                grid=p["grid"],
                guidance=p["guidance"],
                negative=p["negative"],
                plan=self.plan_rules(p),
                noise=p.get("noise", "velodiff"),
                callback=callback,
            )
        out, i = [], 0
        for j in jobs:
            out.append(self.with_infotext(m, j.params, res, res.images[i : i + j.params["n"]]))
            i += j.params["n"]
        return out

    @staticmethod
    def with_infotext(m: Any, q: dict[str, Any], res: Any, images: list[Any]) -> list[Any]:
        """A job's images, each with how it was made inside (``velodiff.infotext``): its own seed (torch or
        cuda noise: the job's seed and n), its noise mode; a job with boxes, its own plan and its layout (what
        POST /api/jobs takes back: the run's plan string would name the layout rule a second time)."""
        from ..edit.layout import layout_text
        from ..infotext import PNG_KEY, noise_fields, run_infotext

        extra = noise_fields(q.get("noise", "velodiff"))
        if q.get("layout"):
            mode = "collage" if q.get("kind") == "collage" else None
            extra |= {"Plan": q["plan"] or "none", "Layout": layout_text(q["layout"]), "Layout mode": mode}
        prompt, negative = q["prompt"], q["negative"]
        whole = q.get("noise") in BATCH_NOISE  # one generator made the job's images: name the call
        for k, image in enumerate(images):
            seed, n = (q["seed"], q["n"]) if whole else (q["seed"] + k, 1)
            image.info[PNG_KEY] = run_infotext(prompt, negative, res, seed, m.path, m.loras, n, extra)
        return list(images)

    @staticmethod
    def plan_rules(p: dict[str, Any]) -> list[Any]:
        """The job's plan, with layout guidance on its boxes when it has some."""
        from ..edit.layout import LayoutGuidance

        return [*filter(None, [p["plan"]]), *([LayoutGuidance(boxes=p["layout"])] if p.get("layout") else [])]

    def collage(self, m: Any, p: dict[str, Any], on_step: Callable[..., bool | None] | None) -> list[Any]:
        """One collage job's images; progress counts every step of its runs (each object's generation,
        then the harmonising pass)."""
        from ..edit.collage import DEFAULT_STRENGTH, collage
        from ..edit.layout import box_list

        objects = sum(len(box_list(v)) for v in p["layout"].values())
        total = objects * p["steps"] + max(1, round(DEFAULT_STRENGTH * p["steps"]))
        done = 0

        def callback(info: Any) -> None:
            nonlocal done
            done += 1
            if on_step is not None and on_step(min(done, total) - 1, total, info.x0):
                raise Stopped

        try:
            with self.run_lock:
                res = collage(
                    m,
                    p["prompt"],
                    p["layout"],
                    seeds=[p["seed"] + i for i in range(p["n"])],
                    height=p["height"],
                    width=p["width"],
                    steps=p["steps"],
                    solver=p["solver"],
                    solver_options=p.get("solver_options"),
                    grid=p["grid"],
                    guidance=p["guidance"],
                    negative=p["negative"],
                    plan=[p["plan"]] if p["plan"] else None,
                    noise=p.get("noise", "velodiff"),
                    callback=callback,
                )
        except Stopped:
            return []
        return self.with_infotext(m, p, res, res.images)

    def preview(self, model: str | None, x0: Any, index: int) -> bytes:
        """A PNG of the clean-image prediction ``x0[index]`` (decoded by the model's VAE)."""
        from ..pipelines.images import to_pil

        m, _ = self.model(model)
        return png_bytes(to_pil(m.decode(x0[index : index + 1]))[0])
