"""The plan of a pipeline run: the keywords every pipeline shares (``Sampling``) resolved against the
model into what it samples with (``Setup``): the solver and its options, the grid (a named one,
another tool's name for one, an explicit list, or the model's calibrated one), the steps or NFE, the
guidance scale and the step plan with classifier-free guidance added."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..errors import VelodiffError, unknown_name
from ..grids import check_grid, grid_parameters, make_grid
from ..guidance import ClassifierFreeGuidance, GuidanceRescale
from ..limits import MAX_STEPS, check_guidance, is_integer, is_number
from ..plan import Plan
from ..sampling import StepInfo
from ..solvers import SolverSpec, get_solver
from ..solvers.base import LOWER_ORDER_FINAL_BELOW

#: what a pipeline returns: PIL images, a (B, 3, H, W) tensor in [0, 1], or the latents alone
OUTPUTS = ("pil", "tensor", "latent")


def check_output(output: str) -> None:
    if output not in OUTPUTS:
        raise unknown_name("output", output, OUTPUTS)


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
    * ``noise``: "velodiff" (per-image seed), "torch" (one CPU generator for the batch, as diffusers'
      CPU generator and ComfyUI), "cuda" (the same as an NVIDIA GPU draws it), "a1111-cpu" (a CPU
      generator per image for its starting and step noise, as A1111's "RNG: CPU" and diffusers with a
      generator per image) or "a1111-nv" (the same as an NVIDIA GPU draws it: A1111's default and its
      "NV" source).
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
        from .common import NOISE_MODES

        if opts.noise not in NOISE_MODES:  # also where it is not read (latents given, strength 0)
            raise unknown_name("noise mode", opts.noise, NOISE_MODES)
        return opts

    def check_types(self) -> None:
        """One line for a keyword of the wrong type (a traceback deep in the run otherwise)."""

        def texts(v: Any) -> bool:
            return isinstance(v, str) or (isinstance(v, Sequence) and all(isinstance(t, str) for t in v))

        checks = {
            "negative": (texts, "a string or a list of strings"),
            "steps": (is_integer, "an integer"),
            "nfe": (is_integer, "an integer"),
            "guidance": (is_number, "a number"),
            "guidance_rescale": (is_number, "a number"),
            "guidance_interval": (
                lambda v: isinstance(v, Sequence) and len(v) == 2 and all(is_number(x) for x in v),
                "a pair of times (t_lo, t_hi)",
            ),
            "seeds": (
                lambda v: is_integer(v) or (isinstance(v, Sequence) and all(is_integer(s) for s in v)),
                "an integer or a list of integers",
            ),
            "callback": (callable, "a function of StepInfo"),
            "latents": (lambda v: isinstance(v, Tensor) and v.is_floating_point() and not v.is_meta,
                        "a floating-point tensor (B, C, h, w)"),
            "solver_options": (lambda v: isinstance(v, dict), "a dict of option names to values"),
            "grid_options": (lambda v: isinstance(v, dict), "a dict of option names to values"),
            "grad": (lambda v: isinstance(v, bool), "True or False"),
        }
        for name, (ok, what) in checks.items():
            v = getattr(self, name)
            if v is not None and not ok(v):
                raise VelodiffError(f"{name} must be {what}, got {_shown(v)}")


def _shown(v: Any) -> str:
    """A value for an error line: its repr when short, a tensor's dtype and shape, else its type."""
    if isinstance(v, Tensor):
        return f"a {str(v.dtype).removeprefix('torch.')} tensor of shape {tuple(v.shape)}"
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
        shifted so each remaining step keeps its own, a budget-planned solver's budget cut to them, and
        ``lower_order_final`` decided on the whole grid's length as diffusers' schedulers decide it."""
        opts = dict(self.options)
        if self.solver.suffix is not None:
            whole = {**self.solver.defaults, **opts}
            opts.update({k: v for k, v in self.solver.suffix(whole, len(self.ts) - 1, start).items()
                         if whole.get(k) != v})
        lof = {**self.solver.defaults, **opts}.get("lower_order_final")
        if start > 0 and lof and not isinstance(lof, str) and len(self.ts) - 1 >= LOWER_ORDER_FINAL_BELOW:
            opts["lower_order_final"] = False  # diffusers' rule reads the whole grid's length
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
    own_config = getattr(model, "components", {}).get("scheduler_config")  # what Class.from_config reads
    spec = get_solver(opts.solver or model.default_solver, own_config)
    opts = _alias_grid(opts, own_config)
    guidance = float(model.default_guidance if opts.guidance is None else opts.guidance)
    plan = resolve_plan(given, guidance, opts.guidance_rescale, opts.guidance_interval)
    grid = opts.grid
    if isinstance(grid, str) and grid != CALIBRATED and _grid_name(grid) == CALIBRATED:  # ComfyUI's gits
        grid, opts = CALIBRATED, replace(opts, grid=CALIBRATED)
    options = dict(opts.solver_options or {})
    if grid == CALIBRATED or spec.missing(options):  # what the model's calibration fitted
        return calibrated_setup(model, opts, spec, guidance, plan, options, size)
    if grid is not None and not isinstance(grid, str):
        ts = make_grid(grid, model.schedule)
        return Setup(spec, ts, len(ts) - 1, guidance, plan, options, grid="explicit")
    final = opts.final or model.default_final
    steps, nfe = opts.steps, opts.nfe
    if steps is not None and nfe is not None:
        raise VelodiffError("give steps or nfe, not both")
    if nfe is not None:
        if not 1 <= nfe <= MAX_STEPS:
            raise VelodiffError(f"nfe must be in [1, {MAX_STEPS}], got {nfe}")
        steps, planned = spec.plan_nfe(int(nfe), ends_at_zero=final == "zero")
        if planned and not (opts.solver_options or {}).get("nfe"):  # the budget as the solver plans it
            spec = replace(spec, defaults={**spec.defaults, **planned})
        elif planned:
            steps = spec.steps_for_nfe(int(nfe), ends_at_zero=final == "zero")
    steps = int(model.default_steps if steps is None else steps)
    if not 1 <= steps <= MAX_STEPS:  # (a plan setting's bound; 999 999 steps ran for hours)
        raise VelodiffError(f"steps must be in [1, {MAX_STEPS}], got {steps}")
    name = grid or model.default_grid
    grid_opts = {}
    if grid is None:
        grid_opts = model.grid_options(*size) if size is not None else dict(model.default_grid_options)
    elif isinstance(grid, str):
        # what depends on the image's size (Flux's shift) applies to every named grid that takes it
        # ("flux", "flow-shifted"), at the default size too; the model's other defaults only when no
        # grid is named
        sized = model.sized_grid_options(*(size or model.default_size))
        takes = grid_parameters(_grid_name(grid) or grid)
        grid_opts = {k: v for k, v in sized.items() if k in takes}
    grid_opts = {**getattr(model, "grid_defaults", {}).get(_grid_name(name) or str(name), {}), **grid_opts,
                 **(opts.grid_options or {})}
    ts = make_grid(name, model.schedule, steps, final=final, **grid_opts)
    # what a distilled student was trained for, said once the grid is known to run (not before a refusal)
    trained = getattr(model, "trained_steps", None)  # a distilled student's (its sampling.json)
    if trained is not None and steps > trained:
        warnings.warn(
            f"this student was distilled for {trained} step{'s' * (trained != 1)}; {steps} steps leave "
            "what it was trained for (the result may be worse, not better)",
            stacklevel=3,
        )
    w_range, w = getattr(model, "trained_guidance", None), getattr(model, "embedded_guidance", None)
    folded = trained is not None or w_range is not None  # a student that runs unguided, guidance inside
    if folded and float(model.default_guidance) == 1.0 and guidance != 1.0 and plan.claims("uncond"):
        how = "; its own scale is --embedded-guidance" if w_range is not None else ""
        warnings.warn(
            f"this student has guidance distilled in (it runs at guidance 1); guidance {guidance:g} adds "
            f"classifier-free guidance on top, at twice the network evaluations{how}",
            stacklevel=3,
        )
    if w_range is not None and w is not None and not w_range[0] <= w <= w_range[1]:
        warnings.warn(
            f"this student was distilled for embedded guidance in [{w_range[0]:g}, {w_range[1]:g}]; "
            f"{w:g} is outside what it was trained for",
            stacklevel=3,
        )
    return Setup(spec, ts, steps, guidance, plan, options, grid=_grid_name(name) or str(name))


#: the grid name that asks for the model's calibrated grid (``velodiff calibrate solver``)
CALIBRATED = "calibrated"


def calibrated_setup(
    model: Any,
    opts: Sampling,
    spec: SolverSpec,
    guidance: float,
    plan: Plan,
    options: dict[str, Any],
    size: tuple[int, int] | None = None,
) -> Setup:
    """A run on what ``velodiff calibrate solver`` fitted for this model and guidance scale: with
    ``grid="calibrated"``, the solver's calibrated grid and fitted options at the run's NFE; for a
    solver that requires fitted options (``SolverSpec.requires``: DPM-Solver-v3's model statistics
    ``ems``), those (on any grid)."""
    from ..calibrated.artefact import find_entry_in, load_solver_calibrations
    from ..calibrated.calibrate import configuration, entry_options
    from ..eval.reference import model_command_name, model_identity

    name = model_command_name(model)
    # keyed by the scale the run guides with: a plan's cfg:scale=4 is not the --guidance default's
    arts = load_solver_calibrations(model_identity(model), guided_scale(plan, guidance), name,
                                    model_path=model.path)
    if opts.grid != CALIBRATED:
        if spec.missing(options):
            art = next((a for a in arts if a.get("ems")), arts[0])
            options = {**options, **_fitted(spec, options, art)}
        return make_setup(model, replace(opts, solver=spec, solver_options=options), size=size)
    if opts.steps is not None and opts.nfe is not None:
        raise VelodiffError("give steps or nfe, not both")
    nfe = opts.nfe if opts.nfe is not None else spec.nfe(int(opts.steps or model.default_steps))
    asked = opts.solver if isinstance(opts.solver, str) else spec.name
    entry, art = find_entry_in(arts, spec.name, int(nfe), name, configuration(spec, options), asked)
    _check_entry_options(spec, entry, art)
    options = {**options, **_fitted(spec, options, art)}  # the statistics its grid was fitted on
    ts = torch.tensor(entry["ts"], dtype=torch.float64)
    if len(ts) - 1 != spec.steps_for_nfe(int(nfe)):  # a damaged entry would silently run other steps
        raise VelodiffError(
            f"solver calibration {art.get('_path')}: its {spec.name} grid at {nfe} NFE has {len(ts) - 1} "
            f"steps, not {spec.steps_for_nfe(int(nfe))}; calibrate again"
        )
    check_grid(model.schedule, ts)
    fitted_at = art.get("size")
    if size is not None and isinstance(fitted_at, list) and [int(v) for v in size] != fitted_at:
        warnings.warn(
            f"the calibrated grid was fitted on {fitted_at[0]}x{fitted_at[1]} images; this run makes "
            f"{size[0]}x{size[1]} (a size-dependent schedule, as SD3's and Flux's, shifts the best grid)",
            stacklevel=3,
        )
    return Setup(spec, ts, len(ts) - 1, guidance, plan, {**entry_options(entry), **options}, grid=CALIBRATED)


def _check_entry_options(spec: SolverSpec, entry: dict[str, Any], art: dict[str, Any]) -> None:
    """Refuse, in one line, a calibrated entry whose options the solver would not take: a name it does
    not have, or a value of another kind than its default's (a hand-edited or damaged artefact)."""

    def number(v: Any) -> bool:
        return is_number(v) and math.isfinite(v)

    for k, v in entry.get("options", {}).items():
        default = spec.defaults.get(k, ...)
        if isinstance(default, tuple):
            fits = isinstance(v, list) and all(number(x) for x in v)
        elif isinstance(default, bool):
            fits = isinstance(v, (bool, str))  # lower_order_final also takes "always"
        elif isinstance(default, (int, float)):
            fits = number(v) and (isinstance(v, int) or not isinstance(default, int))
        elif isinstance(default, str):
            fits = isinstance(v, str)
        else:
            fits = False
        if not fits:
            raise VelodiffError(
                f"solver calibration {art.get('_path')} is damaged ({spec.name} option {k}={v!r}); "
                "calibrate again"
            )


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


def _alias_grid(opts: Sampling, model_config: dict[str, Any] | None = None) -> Sampling:
    """A solver named by another tool's label that fixes a grid too ("DPM++ 2M Karras", A1111's "DDIM",
    a diffusers class on the model's scheduler config) gives the run that grid (and its final point)
    unless the call names its own ("Automatic", A1111's, names none); a grid the call names keeps the
    label's sampler-level options."""
    if isinstance(opts.grid, str) and opts.grid.strip().lower() == AUTOMATIC:
        opts = replace(opts, grid=None)
    if not isinstance(opts.solver, str):
        return opts
    from ..aliases import resolve_solver
    from ..solvers import SOLVERS

    r = resolve_solver(opts.solver, tuple(SOLVERS), model_config)
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
    rule claims the unconditional branch, and guidance rescale where it guides with that branch, unless
    the plan has its own."""
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
    elif interval is not None:  # said, as the negative prompt is at scale 1 (pipelines.common)
        why = "guidance is 1" if guidance == 1.0 else "the plan's own rule guides (give it t_lo / t_hi)"
        warnings.warn(f"the guidance interval configures the classifier-free guidance velodiff adds, and "
                      f"{why}: no effect", stacklevel=4)
    guided = p.with_rules(extra) if extra else p
    # rescale acts on classifier-free guidance: without an unconditional branch (guidance 1, a student,
    # PAG alone) it is off, as in diffusers' pipelines (StableDiffusionPAGPipeline at guidance_scale 1);
    # an explicit `rescale` rule in the plan still rescales any guided prediction (diffusers' guiders)
    own = p.find("rescale")
    if rescale > 0 and own is None and guided.needs("uncond"):
        extra.append(GuidanceRescale(phi=rescale))
    elif rescale > 0 and own is not None and own.phi != rescale:
        warnings.warn(f"the plan's rescale:phi={own.phi:g} is used, not guidance rescale {rescale:g}",
                      stacklevel=4)
    return p.with_rules(extra) if extra else p
