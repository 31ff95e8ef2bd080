"""What every pipeline shares: prompts and seeds, initial noise, the plan (solver, grid, guidance), the
run itself, and images in and out.

Noise contract. Each image's initial latents come from ``velodiff.noise.randn`` on the CPU, seeded
by that image's own seed (``noise="velodiff"``): the same seed gives the same image on every device
and in every batch composition. ``noise="torch"`` instead draws the whole batch with one
``torch.Generator("cpu").manual_seed(seeds[0])`` call, which is what diffusers does with a CPU
generator and what ComfyUI does (it always draws on the CPU), so a seed reproduces their starting
noise. diffusers with a CUDA generator draws on the GPU and gives different noise from the same
seed (and from CPU noise); velodiff never draws on the device.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..denoisers import Cond
from ..errors import VelodiffError, check_text, unknown_name
from ..grids import check_grid, make_grid
from ..guidance import ClassifierFreeGuidance, GuidanceRescale, GuidedCond
from ..limits import check_guidance
from ..noise import BrownianNoise, GaussianNoise, check_seed, randn
from ..plan import Plan
from ..sampling import StepInfo, sample
from ..solvers import SolverSpec, get_solver

NOISE_MODES = ("velodiff", "torch")
OUTPUTS = ("pil", "tensor", "latent")


@dataclass
class GenerationResult:
    """``images``: PIL images, a float tensor (B, 3, H, W) in [0, 1], or None for output="latent";
    ``latents``: the final latents (float32); ``nfe`` / ``evals``: batched network calls and
    network-sample evaluations per image; ``ts``: the grid that was run; ``plan``: the plan that ran."""

    images: Any
    latents: Tensor
    nfe: int
    evals: int
    steps: int
    seeds: list[int]
    ts: Tensor
    solver: str
    guidance: float
    #: velodiff's name of the grid the run sampled on
    grid: str = ""
    stopped: bool = False
    #: the canonical string of the plan that ran (implicit CFG included)
    plan: str = "none"
    info: dict[str, Any] = field(default_factory=dict)


def check_model(model: Any) -> None:
    """A pipeline's model must be loaded (``velodiff.load``): a name or a path is one line, not an
    AttributeError from deep inside."""
    from ..models.base import LoadedModel

    if not isinstance(model, LoadedModel):
        named = isinstance(model, (str, Path))
        hint = f"velodiff.load({str(model)!r})" if named else "velodiff.load(...)"
        raise VelodiffError(f"the model must be a loaded model, got {type(model).__name__}: pass {hint}")


def normalize_prompts(prompts: str | Sequence[str]) -> list[str]:
    if not isinstance(prompts, (str, list, tuple)):
        raise VelodiffError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    ps = [prompts] if isinstance(prompts, str) else list(prompts)
    if not ps:
        raise VelodiffError("no prompt given; pass at least one prompt")
    for i, p in enumerate(ps):
        if not isinstance(p, str):
            raise VelodiffError(f"prompt {i} is a {type(p).__name__}, not text")
        if not p.strip():
            raise VelodiffError(f"prompt {i} is empty; describe the image in a few words")
    return ps


def batch_prompts_and_seeds(
    prompts: list[str], seeds: int | Sequence[int] | None
) -> tuple[list[str], list[int]]:
    """One image per (prompt, seed): a single prompt repeats over a seed list; an int seed s gives
    s, s+1, ... per prompt; None means 0, 1, ... ."""
    if seeds is None:
        seeds = 0
    if isinstance(seeds, int):
        return prompts, [seeds + i for i in range(len(prompts))]
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise VelodiffError("seeds is an empty list")
    if len(prompts) == 1:
        return prompts * len(seeds), seeds
    if len(seeds) != len(prompts):
        raise VelodiffError(
            f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt, or one prompt"
        )
    return prompts, seeds


def initial_noise(shape: tuple[int, ...], seeds: list[int], mode: str = "velodiff") -> Tensor:
    """Standard normal starting noise (B, C, h, w) on the CPU, float32 (see the module's contract); a seed
    outside torch's range [-2**63, 2**64) is refused in one line."""
    for s in seeds:
        check_seed(s)
    if mode == "velodiff":
        return torch.cat([randn((1, *shape[1:]), s) for s in seeds])
    if mode == "torch":
        return torch.randn(shape, generator=torch.Generator().manual_seed(int(seeds[0])), dtype=torch.float32)
    raise unknown_name("noise mode", mode, NOISE_MODES)


class PerImageNoise:
    """A stochastic solver's step noise, drawn per image from that image's seed, so an image does
    not depend on what else is in its batch."""

    def __init__(self, like: Tensor, seeds: list[int], kind: str, ts: Tensor) -> None:
        one = like[:1]
        self.parts = [
            BrownianNoise(one, s, ts) if kind == "brownian" else GaussianNoise(one, s) for s in seeds
        ]

    def __call__(self, i: int) -> Tensor:
        return torch.cat([p(i) for p in self.parts])

    def between(self, t_from: float, t_to: float) -> Tensor:
        """Brownian increments over part of a step (``dpmpp_sde``), per image."""
        return torch.cat([p.between(t_from, t_to) for p in self.parts])  # type: ignore[union-attr]


@dataclass
class Sampling:
    """The keywords text2img, img2img and inpaint share, declared once (each pipeline takes them as
    ``**options``; an unknown one is refused in one line).

    * ``steps`` or ``nfe`` (the most steps whose network calls fit), ``solver``, ``grid`` (a name or an
      explicit list of times) and ``guidance`` (the classifier-free guidance scale) default to the model's;
      ``solver_options``, ``grid_options`` and ``final`` ("zero" / "t_min") refine them.
    * ``plan``: the step plan (``velodiff.plan``): a string such as ``"ag:threshold=0.99+pag"``, a rule
      object, or a list of them. CFG at ``guidance`` is added unless a rule of the plan claims the
      unconditional branch; ``guidance_rescale`` and ``guidance_interval`` (t_lo, t_hi) configure it.
    * ``seeds``: an int s (images get s, s+1, ...), a list (one prompt repeats over it), or None (0, 1, ...).
    * ``latents``: the starting noise (B, C, h, w), standard normal, instead of drawing it from the seeds.
    * ``output``: "pil" (PIL images), "tensor" ((B, 3, H, W) in [0, 1]) or "latent" (no decode).
    * ``noise``: "velodiff" (per-image seed) or "torch" (one CPU generator for the batch, as diffusers'
      CPU generator and ComfyUI).
    * ``callback(StepInfo)``: after every step; may return an edited x, or True to stop.
    * ``grad``: sample with gradients enabled (off: inference mode; a rule that needs them turns it on).
    """

    negative: str | Sequence[str] | None = None
    steps: int | None = None
    nfe: int | None = None
    solver: str | None = None
    grid: str | Sequence[float] | None = None
    guidance: float | None = None
    guidance_rescale: float = 0.0
    guidance_interval: tuple[float, float] | None = None
    plan: Any = None
    seeds: int | Sequence[int] | None = None
    callback: Callable[[StepInfo], Any] | None = None
    latents: Tensor | None = None
    output: str = "pil"
    noise: str = "velodiff"
    solver_options: dict[str, Any] | None = None
    grid_options: dict[str, Any] | None = None
    final: str | None = None
    grad: bool = False

    @classmethod
    def of(cls, what: str, options: dict[str, Any]) -> Sampling:
        unknown = sorted(set(options) - set(cls.__dataclass_fields__))
        if unknown:
            raise VelodiffError(
                f"{what}() got an unknown keyword {unknown[0]!r}; "
                f"valid: {', '.join(cls.__dataclass_fields__)}"
            )
        opts = cls(**options)
        check_output(opts.output)
        opts.check_types()
        return opts

    def check_types(self) -> None:
        """One line for a keyword of the wrong type (a traceback deep in the run otherwise)."""

        def number(v: Any) -> bool:
            return isinstance(v, numbers.Real) and not isinstance(v, bool)

        def integer(v: Any) -> bool:
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        def texts(v: Any) -> bool:
            return isinstance(v, str) or (isinstance(v, Sequence) and all(isinstance(t, str) for t in v))

        checks = {
            "negative": (texts, "a string or a list of strings"),
            "steps": (integer, "an integer"),
            "nfe": (integer, "an integer"),
            "guidance": (number, "a number"),
            "guidance_rescale": (number, "a number"),
            "guidance_interval": (
                lambda v: isinstance(v, Sequence) and len(v) == 2 and all(number(x) for x in v),
                "a pair of times (t_lo, t_hi)",
            ),
            "seeds": (
                lambda v: integer(v) or (isinstance(v, Sequence) and all(integer(s) for s in v)),
                "an integer or a list of integers",
            ),
            "callback": (callable, "a function of StepInfo"),
            "latents": (lambda v: isinstance(v, Tensor), "a tensor (B, C, h, w)"),
            "solver_options": (lambda v: isinstance(v, dict), "a dict of option names to values"),
            "grid_options": (lambda v: isinstance(v, dict), "a dict of option names to values"),
            "grad": (lambda v: isinstance(v, bool), "True or False"),
        }
        for name, (ok, what) in checks.items():
            v = getattr(self, name)
            if v is not None and not ok(v):
                raise VelodiffError(f"{name} must be {what}, got {_shown(v)}")


def _shown(v: Any) -> str:
    """A value for an error line: its repr when short, else its type."""
    r = repr(v)
    return r if len(r) <= 40 else type(v).__name__


#: solver options that hold one value per step (index = step of the grid)
PER_STEP_OPTIONS = ("dc_ratios", "orders", "disable_corrector")


@dataclass
class Setup:
    """What a run samples with: the solver, the grid, the guidance scale and the resolved plan."""

    solver: SolverSpec
    ts: Tensor
    steps: int
    guidance: float
    plan: Plan
    #: the solver options of the run (the call's, over what a calibration fitted)
    options: dict[str, Any] = field(default_factory=dict)
    #: velodiff's name of the grid ("explicit" for a list of times), for the run's report
    grid: str = ""

    def from_step(self, start: int) -> Setup:
        """The run from step ``start`` of the grid on (img2img, inpainting): the grid's suffix, with the
        per-step solver options (a calibration's ``dc_ratios``, ``orders``, ``disable_corrector``)
        shifted so each remaining step keeps its own, and a budget-planned solver's budget cut to them."""
        opts = dict(self.options)
        if self.solver.suffix is not None:
            whole = {**self.solver.defaults, **opts}
            opts.update({k: v for k, v in self.solver.suffix(whole, len(self.ts) - 1, start).items()
                         if whole.get(k) != v})
        for key in set(PER_STEP_OPTIONS) & set(opts):
            values = tuple(opts[key])
            # disable_corrector lists step indices; the others hold one value per step
            opts[key] = (
                tuple(i - start for i in values if i >= start)
                if key == "disable_corrector"
                else values[start:]
            )
        return replace(self, ts=self.ts[start:], options=opts)


def make_setup(model: Any, opts: Sampling, size: tuple[int, int] | None = None) -> Setup:
    """The solver, grid, guidance and plan of a run; the default grid's options depend on the image
    ``size`` (h, w) for models with resolution-dependent shifts (Flux, SD3.5)."""
    given = Plan.parse(opts.plan)
    if given.settings:  # the plan's own solver / grid / steps / nfe / guidance win over the call's
        fixed = dict(given.settings)
        if "steps" in fixed or "nfe" in fixed:
            fixed = {"steps": None, "nfe": None, **fixed}
        opts = replace(opts, **fixed)
    spec = get_solver(opts.solver or model.default_solver)
    opts = _alias_grid(opts)
    guidance = float(model.default_guidance if opts.guidance is None else opts.guidance)
    plan = resolve_plan(given, guidance, opts.guidance_rescale, opts.guidance_interval)
    grid = opts.grid
    if isinstance(grid, str) and grid != CALIBRATED and _grid_name(grid) == CALIBRATED:  # ComfyUI's gits
        grid, opts = CALIBRATED, replace(opts, grid=CALIBRATED)
    options = dict(opts.solver_options or {})
    if grid == CALIBRATED or spec.missing(options):  # what the model's calibration fitted
        return calibrated_setup(model, opts, spec, guidance, plan, options)
    if grid is not None and not isinstance(grid, str):
        ts = make_grid(grid, model.schedule)
        return Setup(spec, ts, len(ts) - 1, guidance, plan, options, grid="explicit")
    final = opts.final or model.default_final
    steps, nfe = opts.steps, opts.nfe
    if steps is not None and nfe is not None:
        raise VelodiffError("give steps or nfe, not both")
    if nfe is not None:
        if nfe < 1:
            raise VelodiffError(f"nfe must be >= 1, got {nfe}")
        steps, planned = spec.plan_nfe(int(nfe), ends_at_zero=final == "zero")
        if planned and not (opts.solver_options or {}).get("nfe"):  # the budget as the solver plans it
            spec = replace(spec, defaults={**spec.defaults, **planned})
        elif planned:
            steps = spec.steps_for_nfe(int(nfe), ends_at_zero=final == "zero")
    steps = int(model.default_steps if steps is None else steps)
    if steps < 1:
        raise VelodiffError(f"steps must be >= 1, got {steps}")
    trained = getattr(model, "trained_steps", None)  # a distilled student's (its sampling.json)
    if trained is not None and steps > trained:
        warnings.warn(
            f"this student was distilled for {trained} steps; {steps} steps leave what it was trained "
            "for (the result may be worse, not better)",
            stacklevel=3,
        )
    w_range, w = getattr(model, "trained_guidance", None), getattr(model, "embedded_guidance", None)
    if w_range is not None and w is not None and not w_range[0] <= w <= w_range[1]:
        warnings.warn(
            f"this student was distilled for embedded guidance in [{w_range[0]:g}, {w_range[1]:g}]; "
            f"{w:g} is outside what it was trained for",
            stacklevel=3,
        )
    name = grid or model.default_grid
    grid_opts = {}
    if grid is None:
        grid_opts = model.grid_options(*size) if size is not None else dict(model.default_grid_options)
    grid_opts = {**getattr(model, "grid_defaults", {}).get(_grid_name(name) or str(name), {}), **grid_opts,
                 **(opts.grid_options or {})}
    ts = make_grid(name, model.schedule, steps, final=final, **grid_opts)
    return Setup(spec, ts, steps, guidance, plan, options, grid=_grid_name(name) or str(name))


#: the grid name that asks for the model's calibrated grid (``velodiff calibrate solver``)
CALIBRATED = "calibrated"


def calibrated_setup(
    model: Any, opts: Sampling, spec: SolverSpec, guidance: float, plan: Plan, options: dict[str, Any]
) -> Setup:
    """A run on what ``velodiff calibrate solver`` fitted for this model and guidance scale: with
    ``grid="calibrated"``, the solver's calibrated grid and fitted options at the run's NFE; for a
    solver that requires fitted options (``SolverSpec.requires``: DPM-Solver-v3's model statistics
    ``ems``), those (on any grid)."""
    from ..calibrated.artefact import find_entry_in, load_solver_calibrations
    from ..calibrated.calibrate import entry_options
    from ..eval.reference import model_command_name, model_identity

    name = model_command_name(model)
    # keyed by the scale the run guides with: a plan's cfg:scale=4 is not the --guidance default's
    arts = load_solver_calibrations(model_identity(model), guided_scale(plan, guidance), name,
                                    model_path=model.path)
    if opts.grid != CALIBRATED:
        if spec.missing(options):
            art = next((a for a in arts if a.get("ems")), arts[0])
            options = {**options, **_fitted(spec, options, art)}
        return make_setup(model, replace(opts, solver=spec, solver_options=options))
    if opts.steps is not None and opts.nfe is not None:
        raise VelodiffError("give steps or nfe, not both")
    nfe = opts.nfe if opts.nfe is not None else spec.nfe(int(opts.steps or model.default_steps))
    entry, art = find_entry_in(arts, spec.name, int(nfe), name)
    options = {**options, **_fitted(spec, options, art)}  # the statistics its grid was fitted on
    ts = torch.tensor(entry["ts"], dtype=torch.float64)
    if len(ts) - 1 != spec.steps_for_nfe(int(nfe)):  # a damaged entry would silently run other steps
        raise VelodiffError(
            f"solver calibration {art.get('_path')}: its {spec.name} grid at {nfe} NFE has {len(ts) - 1} "
            f"steps, not {spec.steps_for_nfe(int(nfe))}; calibrate again"
        )
    check_grid(model.schedule, ts)
    return Setup(spec, ts, len(ts) - 1, guidance, plan, {**entry_options(entry), **options}, grid=CALIBRATED)


def _fitted(spec: SolverSpec, options: dict[str, Any], art: dict[str, Any]) -> dict[str, Any]:
    """What a solver requires and ``options`` lack, from a solver calibration: the model statistics
    (DPM-Solver-v3's ``ems``, the one fitted option a calibration holds)."""
    from ..calibrated.artefact import load_statistics

    return {"ems": load_statistics(art)} if "ems" in spec.missing(options) else {}


def _grid_name(name: str) -> str | None:
    """velodiff's name of a grid given by any tool's name (``velodiff.aliases``)."""
    from ..aliases import resolve_grid
    from ..grids import GRIDS

    return resolve_grid(name, (*GRIDS, CALIBRATED)).grid


#: A1111's schedule type that leaves the grid to the sampler (its default, else the model's)
AUTOMATIC = "automatic"
#: grid options that belong to a sampler label, kept on any grid the call names (A1111's
#: discard_next_to_last_sigma is its DPM2 / DPM++ 3M SDE samplers' option, whatever the schedule type)
SAMPLER_GRID_OPTIONS = ("discard_penultimate",)


def _alias_grid(opts: Sampling) -> Sampling:
    """A solver named by another tool's label that fixes a grid too ("DPM++ 2M Karras", A1111's "DDIM")
    gives the run that grid (and its final point) unless the call names its own ("Automatic", A1111's,
    names none); a grid the call names keeps the label's sampler-level options."""
    if isinstance(opts.grid, str) and opts.grid.strip().lower() == AUTOMATIC:
        opts = replace(opts, grid=None)
    if not isinstance(opts.solver, str):
        return opts
    from ..aliases import resolve_solver
    from ..solvers import SOLVERS

    r = resolve_solver(opts.solver, tuple(SOLVERS))
    if opts.grid is not None:
        sticky = {k: v for k, v in r.grid_options.items() if k in SAMPLER_GRID_OPTIONS}
        if not sticky or not isinstance(opts.grid, str) or _grid_name(opts.grid) == CALIBRATED:
            return opts
        return replace(opts, grid_options={**sticky, **(opts.grid_options or {})})
    if r.grid is None:
        return opts
    return replace(
        opts,
        grid=r.grid,
        grid_options={**r.grid_options, **(opts.grid_options or {})},
        final=opts.final or r.final,
    )


def guided_scale(plan: Plan, guidance: float) -> float:
    """The scale a run guides with, as it reports it: that of the rule owning the unconditional branch
    where the plan sets one (``cfg:scale=4``), else the run's ``guidance``."""
    scale = plan.fixed_guidance()
    return guidance if scale is None else scale


def resolve_plan(
    plan: Any, guidance: float, rescale: float = 0.0, interval: tuple[float, float] | None = None
) -> Plan:
    """The user's plan, with classifier-free guidance at ``guidance`` (and its interval) added unless a
    rule claims the unconditional branch, and guidance rescale unless the plan has its own."""
    p = Plan.parse(plan)
    if not 0.0 <= rescale <= 1.0:
        raise VelodiffError(f"guidance rescale must be in [0, 1], got {rescale}")
    check_guidance(guidance)
    extra: list[Any] = []
    if guidance != 1.0 and not p.claims("uncond"):
        lo_hi = {} if interval is None else {"t_lo": float(interval[0]), "t_hi": float(interval[1])}
        if interval is not None and not lo_hi["t_lo"] <= lo_hi["t_hi"]:
            raise VelodiffError(f"guidance interval must have t_lo <= t_hi, got {tuple(interval)}")
        extra.append(ClassifierFreeGuidance(**lo_hi))
    if rescale > 0 and p.find("rescale") is None:
        extra.append(GuidanceRescale(phi=rescale))
    return p.with_rules(extra) if extra else p


def run(
    model: Any,
    setup: Setup,
    opts: Sampling,
    x: Tensor,
    cond: Cond,
    seeds: list[int],
    prompts: list[str],
    size: tuple[int, int],
    *,
    ts: Tensor | None = None,
    callback: Callable[[StepInfo], Any] | None = None,
    encode: Callable[[list[str]], Cond] | None = None,
) -> Any:
    """Sample from x at ts[0] (the setup's grid unless ``ts``) under the setup's plan."""
    if not setup.plan.needs("uncond"):  # diffusers drops them silently at scale <= 1
        given = [what for what, on in (("the negative prompt", opts.negative),
                                        ("guidance rescale", opts.guidance_rescale)) if on]
        if given:
            warnings.warn(
                f"{' and '.join(given)} {'acts' if len(given) == 1 else 'act'} on classifier-free guidance, "
                "which is off at scale 1 here (a student with guidance folded in runs at 1): no effect",
                stacklevel=3,
            )
    if setup.plan.find("compose") is None and any(" AND " in p for p in prompts):
        warnings.warn(
            "the prompt joins parts with AND, which the text encoder reads as 'and'; "
            "add the plan rule compose (--plan compose) to combine them as composable prompts",
            stacklevel=3,
        )
    ts = setup.ts if ts is None else ts
    noise = None
    if setup.solver.noise != "none":
        noise = PerImageNoise(x, seeds, setup.solver.noise, ts)
    context = run_context(model, setup, prompts, size, encode)
    return sample(
        model.denoiser,
        x,
        ts,
        setup.solver,
        cond=cond,
        seed=seeds[0],
        noise=noise,
        callback=opts.callback if callback is None else callback,
        plan=setup.plan.without_settings(),
        context=context,
        grad=opts.grad,
        **setup.options,
    )


def run_context(
    model: Any,
    setup: Setup,
    prompts: list[str],
    size: tuple[int, int],
    encode: Callable[[list[str]], Cond] | None = None,
) -> dict[str, Any]:
    """What the plan's rules may know of a pipeline run (``RunInfo``'s model, network, encode,
    prompts, guidance)."""
    h, w = size

    def encode_plain(texts: list[str]) -> Cond:
        return prepare_cond(model, texts, None, False, h, w)

    return {
        "model": model,
        "network": model.network,
        "encode": encode or encode_plain,
        "prompts": tuple(prompts),
        "guidance": setup.guidance,
    }


def check_setup(model: Any, setup: Setup, prompts: list[str], size: tuple[int, int]) -> None:
    """Refuse now what text2img with this setup would refuse before its first step (the grid on the
    model's schedule, the solver's steps and options, each plan rule's check on this model and batch),
    without encoding or sampling: a server checks a job with it when the job is submitted."""
    from ..sampling import check_run

    branches: dict[str, Any] = dict.fromkeys(("cond", "uncond") if setup.plan.needs("uncond") else ("cond",))
    check_run(
        model.denoiser,
        setup.ts,
        setup.solver,
        setup.plan.without_settings(),
        len(prompts),
        branches,
        run_context(model, setup, prompts, size),
        setup.options,
    )


def check_output(output: str) -> None:
    if output not in OUTPUTS:
        raise unknown_name("output", output, OUTPUTS)


def finish(model: Any, res: Any, setup: Setup, seeds: list[int], output: str, ts: Tensor, **info: Any) -> Any:
    images: Any = None
    if output != "latent":
        images = model.decode(res.x)
        if output == "pil":
            images = to_pil(images)
    return GenerationResult(
        images=images,
        latents=res.x,
        nfe=res.nfe,
        evals=res.evals,
        steps=res.steps,
        seeds=seeds,
        ts=ts,
        solver=setup.solver.name,
        guidance=guided_scale(setup.plan, setup.guidance),
        grid=setup.grid,
        stopped=res.stopped,
        plan=str(setup.plan),
        info=info,
    )


def prepare_cond(
    model: Any, prompts: list[str], negative: Any, guided: bool, height: int, width: int
) -> Cond:
    check_text(prompts, "prompt")
    check_text(negative, "negative prompt")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        return model.encode_prompt(prompts, negative, guided=guided, height=height, width=width)


def repeat_cond(cond: Cond, n: int) -> Cond:
    """Cond for n images from a cond for one (used when one prompt serves a batch)."""
    if isinstance(cond, GuidedCond):
        return GuidedCond(repeat_cond(cond.cond, n), repeat_cond(cond.uncond, n))
    if isinstance(cond, dict):
        return {k: repeat_cond(v, n) for k, v in cond.items()}
    if isinstance(cond, Tensor):
        return cond.expand(n, *cond.shape[1:]) if cond.shape[0] == 1 else cond
    return cond


def encode_batch_prompts(
    model: Any, prompts: list[str], negative: Any, guided: bool, height: int, width: int
) -> Cond:
    """Encode each distinct prompt once (a seed sweep of one prompt encodes it once); with the
    unconditional (or negative) conditioning too when ``guided``."""
    if len(set(prompts)) == 1 and len(prompts) > 1 and (negative is None or isinstance(negative, str)):
        return repeat_cond(prepare_cond(model, prompts[:1], negative, guided, height, width), len(prompts))
    return prepare_cond(model, prompts, negative, guided, height, width)


# --- images in and out -------------------------------------------------------------------------


def to_pil(images: Tensor) -> list[Any]:
    from PIL import Image

    arr = (
        (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )
    return [Image.fromarray(a) for a in arr]


def _in_unit_range(x: Tensor) -> bool:
    """Every value finite and in [0, 1] (to float round-off); NaN fails, as no comparison would say."""
    return bool(x.isfinite().all()) and -1e-6 <= float(x.min()) and float(x.max()) <= 1 + 1e-6


def image_tensor(image: Any, what: str = "init image") -> Tensor:
    """A PIL image (RGB, RGBA without transparency, L), a list of them, a float tensor in [0, 1] of shape
    (3, H, W) / (B, 3, H, W), or a numpy array as diffusers takes one ((H, W, 3) / (B, H, W, 3), floats
    in [0, 1] or uint8) -> float32 (B, 3, H, W)."""
    import numpy as np

    if isinstance(image, np.ndarray):
        if image.ndim not in (3, 4) or image.shape[-1] != 3:
            raise VelodiffError(f"the {what} array must be (H, W, 3) or (B, H, W, 3), got {image.shape}")
        x = torch.from_numpy(np.ascontiguousarray(image)).float()
        x = x / 255.0 if image.dtype == np.uint8 else x
        return image_tensor(x.movedim(-1, -3), what)
    if isinstance(image, (list, tuple)):
        parts = [image_tensor(im, what) for im in image]
        if len({p.shape[-2:] for p in parts}) > 1:
            raise VelodiffError(f"the {what}s have different sizes")
        return torch.cat(parts)
    if isinstance(image, Tensor):
        x = image.detach().float()
        x = x[None] if x.ndim == 3 else x
        if x.ndim != 4 or x.shape[1] != 3:
            raise VelodiffError(
                f"the {what} tensor must be (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}"
            )
        if x.numel() and not _in_unit_range(x):
            raise VelodiffError(f"the {what} tensor must hold values in [0, 1]")
        return x.cpu()
    mode = getattr(image, "mode", None)
    if mode is None:
        raise VelodiffError(
            f"the {what} must be a PIL image, a tensor or a numpy array, got {type(image).__name__}"
        )
    if mode == "RGBA":
        alpha = np.asarray(image.getchannel("A"))
        if alpha.min() < 255:
            raise VelodiffError(
                f"the {what} has transparent pixels (mode RGBA); flatten it onto a background first"
            )
        image = image.convert("RGB")
    elif mode == "L":
        image = image.convert("RGB")
    elif mode != "RGB":
        raise VelodiffError(f"the {what} has mode {mode!r}; give an RGB (or grayscale L) image")
    arr = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None]


def given_latents(
    model: Any, z: Any, name: str, batch: int, height: int | None, width: int | None
) -> tuple[Tensor, int, int]:
    """Latents a caller passes instead of encoding an image (``image_latents``,
    ``masked_image_latents``): one, or one per image, of the model's latent shape for ``height`` x
    ``width`` (default: the size they hold); float32 on the model's device, expanded to ``batch``,
    with the image size."""
    if not isinstance(z, Tensor) or z.ndim != 4:
        got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise VelodiffError(f"{name} must be a tensor (B, C, h, w), got {got}")
    f = model.vae_scale_factor
    h, w = height or int(z.shape[-2]) * f, width or int(z.shape[-1]) * f
    want = model.latent_shape(1, h, w)[1:]  # the size check, with its error message
    if tuple(z.shape[1:]) != tuple(want) or z.shape[0] not in (1, batch):
        raise VelodiffError(
            f"{name} have shape {tuple(z.shape)}; expected (1 or {batch}, {', '.join(map(str, want))}) "
            f"for {w}x{h} images"
        )
    if not bool(torch.isfinite(z).all()):
        raise VelodiffError(f"{name} contain NaN or inf")
    z = z.to(model.device, torch.float32)
    return (z.expand(batch, *z.shape[1:]) if z.shape[0] == 1 else z), h, w


def mask_tensor(mask: Any) -> Tensor:
    """A mask (white / 1 = repaint): PIL L or 1 (or RGB, read as luminance), a tensor in [0, 1] of shape
    (H, W), (1, H, W) or (B, 1, H, W), or a numpy array of those shapes (floats in [0, 1], bool or
    uint8) -> float32 (B, 1, H, W)."""
    import numpy as np

    if isinstance(mask, np.ndarray):
        m = torch.from_numpy(np.ascontiguousarray(mask)).float()
        return mask_tensor(m / 255.0 if mask.dtype == np.uint8 else m)

    if isinstance(mask, (list, tuple)):
        return torch.cat([mask_tensor(m) for m in mask])
    if isinstance(mask, Tensor):
        m = mask.detach().float()
        m = m[None, None] if m.ndim == 2 else (m[None] if m.ndim == 3 else m)
        if m.ndim != 4 or m.shape[1] != 1:
            raise VelodiffError(
                f"the mask tensor must be (H, W), (1, H, W) or (B, 1, H, W), got {tuple(mask.shape)}"
            )
        if m.numel() and not _in_unit_range(m):
            raise VelodiffError("the mask tensor must hold values in [0, 1] (1 = repaint)")
        return m.cpu()
    mode = getattr(mask, "mode", None)
    if mode is None:
        raise VelodiffError(
            f"the mask must be a PIL image, a tensor or a numpy array, got {type(mask).__name__}"
        )
    if mode not in ("L", "1", "RGB"):
        raise VelodiffError(f"the mask has mode {mode!r}; give a grayscale (L) image, white = repaint")
    arr = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy())[None, None]
