"""Sampler and scheduler names from other tools, mapped to velodiff's solver, grid and options.

One table (:data:`ALIASES`) holds the names users know: k-diffusion's and ComfyUI's samplers
(``dpmpp_2m_sde``, ``dpm_2_ancestral``, ...), ComfyUI's schedulers (``karras``, ``sgm_uniform``,
``align_your_steps``, ...), AUTOMATIC1111's labels ("DPM++ 2M Karras", "Euler a", ...) and
diffusers' scheduler classes; :func:`from_diffusers` reads a diffusers scheduler (class name and
config flags: ``use_karras_sigmas``, ``algorithm_type``, ``solver_order``, ``timestep_spacing``, ...).
Every place that takes a solver or a grid name resolves through here: ``get_solver`` and
``make_grid``, the pipelines (a sampler alias that fixes a grid, "DPM++ 2M Karras", gives the run
that grid unless one is given), the CLI's ``--solver`` / ``--grid`` and plan settings ``solver=`` /
``grid=``. velodiff's own names always win; an alias is matched after normalization (case,
spaces, hyphens and ``++`` -> ``pp``: "DPM++ 2M Karras" = ``dpmpp_2m_karras``, which a plan string,
where ``+`` joins items, can spell). A sampler alias is looked up where a solver is expected and a
scheduler alias where a grid is, so ComfyUI's sampler "ddim" and A1111's schedule type "DDIM"
(``ddim_uniform``) do not collide.

Each row says what it reproduces and how that is checked (``tests/test_aliases.py``: diffusers'
scheduler where one exists, else k-diffusion's sampler, from the same noise and times). This
module imports no torch: the CLI checks names before any model work.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import VelodiffError

SAMPLER, SCHEDULER = "sampler", "scheduler"


@dataclass(frozen=True)
class Alias:
    """One foreign name: ``kind`` "sampler" (fixes a solver, maybe a grid) or "scheduler" (a grid)."""

    name: str
    source: str
    kind: str
    solver: str | None = None
    grid: str | None = None
    solver_options: Mapping[str, Any] = field(default_factory=dict)
    grid_options: Mapping[str, Any] = field(default_factory=dict)
    final: str | None = None
    note: str = ""

    def target(self) -> str:
        """``solver + grid (options)`` as the table prints it."""
        parts = [p for p in (self.solver, self.grid and f"grid {self.grid}") if p]
        opts = {**self.solver_options, **self.grid_options}
        if self.final:
            opts["final"] = self.final
        text = " + ".join(parts)
        if opts:
            text += " (" + ", ".join(f"{k}={v}" for k, v in opts.items()) + ")"
        return text


def normalize(name: str) -> str:
    """The key an alias is matched by: lower case, ``++`` -> ``pp`` (a single ``+`` -> ``p``), runs of
    other characters -> ``_``."""
    key = name.strip().lower().replace("++", "pp").replace("+", "p")
    return re.sub(r"[^a-z0-9]+", "_", key).strip("_")


COMFY, A1111, DIFFUSERS = "ComfyUI", "A1111", "diffusers"
KD_COMFY = "k-diffusion / ComfyUI"
NO_LOF = {"lower_order_final": False}  # k-diffusion's multistep samplers keep their order to the end
SDE_HEUN = {**NO_LOF, "solver_type": "heun"}  # k-diffusion's dpmpp_2m_sde(solver_type="heun")
KD_3M = {"variant": "k-diffusion"}  # k-diffusion's 3M SDE halves the x0'' term (sde_dpm_solver_pp.py)
#: UniPC's code (Zhao et al.'s uni_pc.py, its A1111 / ComfyUI ports, diffusers' UniPCMultistepScheduler)
#: lowers the last steps' order at every step count, not below 15 steps only (solvers/unipc.py)
UNIPC_LOF = {"lower_order_final": "always"}


def _s(name: str, source: str, solver: str, grid: str | None = None, note: str = "", **kw: Any) -> Alias:
    return Alias(name, source, SAMPLER, solver, grid, note=note, **kw)


def _g(name: str, source: str, grid: str, note: str = "", **kw: Any) -> Alias:
    return Alias(name, source, SCHEDULER, grid=grid, note=note, **kw)


#: k-diffusion's sample_* names, which ComfyUI's KSampler lists (with more of its own)
_KD_SAMPLERS = [
    _s("euler", KD_COMFY, "euler", note="sample_euler; s_churn / s_tmin / s_tmax / s_noise as options"),
    _s("euler_ancestral", KD_COMFY, "euler_ancestral"),
    _s("heun", KD_COMFY, "heun"),
    _s("dpm_2", KD_COMFY, "dpm_2"),
    _s("dpm_2_ancestral", KD_COMFY, "dpm_2_ancestral"),
    _s("lms", KD_COMFY, "lms"),
    _s("dpm_fast", KD_COMFY, "dpm_fast", "logsnr", final="t_min",
       note="k-diffusion spends an NFE budget N on floor(N/3)+1 steps: give --nfe N, or option nfe"),
    _s("dpm_adaptive", KD_COMFY, "dpm_adaptive", "logsnr", final="t_min",
       note="each grid interval is integrated adaptively; steps=1 is k-diffusion's single interval"),
    _s("dpmpp_2s_ancestral", KD_COMFY, "dpmpp_2s_ancestral"),
    _s("dpmpp_sde", KD_COMFY, "dpmpp_sde"),
    _s("dpmpp_sde_gpu", COMFY, "dpmpp_sde", note="ComfyUI draws its noise on the GPU, velodiff on the CPU"),
    _s("dpmpp_2m", KD_COMFY, "dpmpp_2m", solver_options=NO_LOF,
       note="the name gives velodiff's own dpmpp_2m, which lowers the last order on grids < 15 steps as "
       "diffusers does; lower_order_final=False is k-diffusion's"),
    _s("dpmpp_2m_sde", KD_COMFY, "sde_dpmpp_2m", solver_options=NO_LOF),
    _s("dpmpp_2m_sde_gpu", COMFY, "sde_dpmpp_2m", solver_options=NO_LOF),
    _s("dpmpp_2m_sde_heun", COMFY, "sde_dpmpp_2m", solver_options={**NO_LOF, "solver_type": "heun"}),
    _s("dpmpp_2m_sde_heun_gpu", COMFY, "sde_dpmpp_2m", solver_options={**NO_LOF, "solver_type": "heun"}),
    _s("dpmpp_3m_sde", KD_COMFY, "sde_dpmpp_3m", solver_options=KD_3M),
    _s("dpmpp_3m_sde_gpu", COMFY, "sde_dpmpp_3m", solver_options=KD_3M),
    _s("ddpm", COMFY, "ddpm"),
    _s("ddim", COMFY, "ddim", note="ComfyUI's ddim sampler is its Euler, the same step"),
    _s("lcm", COMFY, "lcm", solver_options={"boundary": False},
       note="x0, then fresh noise to the next level (Luo et al. 2023, Alg. 1); the model applies LCM's "
       "boundary condition (ComfyUI's ModelSamplingDiscrete lcm)"),
    _s("uni_pc", COMFY, "unipc", solver_options={**UNIPC_LOF, "solver_type": "bh1", "order": 3},
       note="ComfyUI ends its last step at sigma 0.001 rather than jumping to 0"),
    _s("uni_pc_bh2", COMFY, "unipc", solver_options={**UNIPC_LOF, "order": 3}),
    _s("ipndm", COMFY, "ipndm"),
    _s("ipndm_v", COMFY, "ipndm", solver_options={"variant": "v"},
       note="diff-solvers' iPNDM_v weights (solvers/ipndm.py), as ComfyUI runs them"),
    _s("deis", COMFY, "deis_3", solver_options={"interp": "vp_t", "lower_order_final": False},
       note="diff-solvers' 'tab' DEIS (t-AB in a VP time fitted to sigma 0.002-80); ComfyUI sums its "
       "coefficients' integrals on 10 000 points: ~1e-4 relative apart in them"),
]  # fmt: skip

#: ComfyUI's SCHEDULER_NAMES (and its AlignYourSteps / GITS nodes)
_COMFY_SCHEDULERS = [
    _g("normal", COMFY, "normal"),
    _g("karras", COMFY, "karras"),
    _g("exponential", COMFY, "exponential"),
    _g("sgm_uniform", COMFY, "sgm_uniform"),
    _g("simple", COMFY, "simple"),
    _g("ddim_uniform", COMFY, "ddim_uniform"),
    _g("beta", COMFY, "beta", note="alpha = beta = 0.6 (Lee et al. 2024)"),
    _g("kl_optimal", COMFY, "kl_optimal"),
    _g("align_your_steps", COMFY, "ays", note="SD 1.5 levels by default; grid option model=sdxl|svd"),
    _g("linear_quadratic", COMFY, "linear_quadratic", note="rectified flows (Movie Gen / Mochi)"),
    _g("gits", COMFY, "calibrated", note="the model's own GITS grid, refined: velodiff calibrate solver"),
]

#: A1111's discard_next_to_last_sigma (its DPM2 and DPM++ 3M SDE samplers): steps + 1 levels, the one
#: before 0 dropped; a sampler's option, so it holds on any schedule type the call names
DISCARD = {"discard_penultimate": True}
_DISCARD_NOTE = "A1111 drops the last level before 0 (discard_next_to_last_sigma), on any schedule type"
#: AUTOMATIC1111's sampler labels as 1.9+ (and Forge) define them (modules/sd_samplers_kdiffusion.py):
#: a bare label runs its sampler's default schedule type ("Automatic": karras for DPM++ 2M, exponential
#: for the 2M / 3M SDE, the model's own discretization, "normal", where it has none); the labels before
#: 1.9 carried the schedule ("DPM++ 2M Karras") and stay its aliases
_A1111 = [
    _s("Euler", A1111, "euler", "normal"),
    _s("Euler a", A1111, "euler_ancestral", "normal"),
    _s("Heun", A1111, "heun", "normal"),
    _s("LMS", A1111, "lms", "normal"),
    _s("LMS Karras", A1111, "lms", "karras"),
    _s("DPM2", A1111, "dpm_2", "karras", grid_options=DISCARD, note=_DISCARD_NOTE),
    _s("DPM2 Karras", A1111, "dpm_2", "karras", grid_options=DISCARD, note=_DISCARD_NOTE),
    _s("DPM2 a", A1111, "dpm_2_ancestral", "karras", grid_options=DISCARD, note=_DISCARD_NOTE),
    _s("DPM2 a Karras", A1111, "dpm_2_ancestral", "karras", grid_options=DISCARD, note=_DISCARD_NOTE),
    _s("DPM++ 2S a", A1111, "dpmpp_2s_ancestral", "karras"),
    _s("DPM++ 2S a Karras", A1111, "dpmpp_2s_ancestral", "karras"),
    _s("DPM++ 2M", A1111, "dpmpp_2m", "karras", solver_options=NO_LOF),
    _s("DPM++ 2M Karras", A1111, "dpmpp_2m", "karras", solver_options=NO_LOF),
    _s("DPM++ SDE", A1111, "dpmpp_sde", "karras"),
    _s("DPM++ SDE Karras", A1111, "dpmpp_sde", "karras"),
    _s("DPM++ 2M SDE", A1111, "sde_dpmpp_2m", "exponential", solver_options=NO_LOF),
    _s("DPM++ 2M SDE Karras", A1111, "sde_dpmpp_2m", "karras", solver_options=NO_LOF),
    _s("DPM++ 2M SDE Exponential", A1111, "sde_dpmpp_2m", "exponential", solver_options=NO_LOF),
    _s("DPM++ 2M SDE Heun", A1111, "sde_dpmpp_2m", "exponential", solver_options=SDE_HEUN),
    _s("DPM++ 2M SDE Heun Karras", A1111, "sde_dpmpp_2m", "karras", solver_options=SDE_HEUN),
    _s("DPM++ 2M SDE Heun Exponential", A1111, "sde_dpmpp_2m", "exponential", solver_options=SDE_HEUN),
    _s("DPM++ 3M SDE", A1111, "sde_dpmpp_3m", "exponential", solver_options=KD_3M, grid_options=DISCARD,
       note=_DISCARD_NOTE),
    _s("DPM++ 3M SDE Karras", A1111, "sde_dpmpp_3m", "karras", solver_options=KD_3M, grid_options=DISCARD,
       note=_DISCARD_NOTE),
    _s("DPM++ 3M SDE Exponential", A1111, "sde_dpmpp_3m", "exponential", solver_options=KD_3M,
       grid_options=DISCARD, note=_DISCARD_NOTE),
    _s("DPM fast", A1111, "dpm_fast", "logsnr", final="t_min"),
    _s("DPM adaptive", A1111, "dpm_adaptive", "logsnr", final="t_min"),
    _s("DDIM", A1111, "ddim", "ddim_uniform", final="t_min",
       note="timesteps 1, 1 + c, ... (c = 1000 // steps); the last step lands on alphas_cumprod[0]"),
    _s("UniPC", A1111, "unipc", "uniform", final="t_min",
       solver_options={**UNIPC_LOF, "solver_type": "bh1", "order": 3},
       note="A1111's defaults: variant bh1, order 3, time-uniform steps from t = 1 to 1/N, no step to 0 "
       "(uni_pc.sample with denoise_to_zero=False)"),
    _s("LCM", A1111, "lcm", solver_options={"boundary": False}),
    _g("Automatic", A1111, "normal",
       note="with a sampler label: that sampler's default (its own grid); else the model's default grid"),
    _g("Uniform", A1111, "normal"),
    _g("Karras", A1111, "karras"),
    _g("Exponential", A1111, "exponential"),
    _g("Polyexponential", A1111, "polyexponential"),
    _g("SGM Uniform", A1111, "sgm_uniform"),
    _g("KL Optimal", A1111, "kl_optimal"),
    _g("Align Your Steps", A1111, "ays"),
    _g("Simple", A1111, "simple"),
    _g("Normal", A1111, "normal"),
    _g("DDIM", A1111, "ddim_uniform"),
    _g("Beta", A1111, "beta"),
]  # fmt: skip

MULTI = {"drop_last": True}  # DPMSolverMultistep / UniPC / DEIS space steps + 1 points, drop the last
FRAC = {"fractional": True}  # the Euler family's 'linspace' keeps fractional timesteps

#: diffusers' scheduler classes with their default config (flags: :func:`from_diffusers`); named for a
#: model, on the model's scheduler config as ``Class.from_config`` (:func:`resolve_solver`)
_DIFFUSERS_DEFAULT_NOTE = ("default config, or the model's (from_config); flags: "
                           "DPMSolverMultistepScheduler:use_karras_sigmas=true,...")
_DIFFUSERS = [
    _s("DPMSolverMultistepScheduler", DIFFUSERS, "dpmpp_2m", "linspace", grid_options=MULTI,
       note=_DIFFUSERS_DEFAULT_NOTE),
    _s("EulerDiscreteScheduler", DIFFUSERS, "euler", "linspace", grid_options=FRAC),
    _s("EulerAncestralDiscreteScheduler", DIFFUSERS, "euler_ancestral", "linspace", grid_options=FRAC),
    _s("HeunDiscreteScheduler", DIFFUSERS, "heun", "linspace", grid_options=FRAC),
    _s("KDPM2DiscreteScheduler", DIFFUSERS, "dpm_2", "linspace", grid_options=FRAC),
    _s("KDPM2AncestralDiscreteScheduler", DIFFUSERS, "dpm_2_ancestral", "linspace", grid_options=FRAC),
    _s("LMSDiscreteScheduler", DIFFUSERS, "lms", "linspace", grid_options=FRAC),
    _s("DDIMScheduler", DIFFUSERS, "ddim", "leading", grid_options={"steps_offset": 1}, final="t_min",
       note="the SD pipelines' config: steps_offset 1, set_alpha_to_one False (ends at alphas_cumprod[0])"),
    _s("DDPMScheduler", DIFFUSERS, "ddpm", "leading", grid_options={"steps_offset": 1}),
    _s("UniPCMultistepScheduler", DIFFUSERS, "unipc", "linspace", grid_options=MULTI,
       solver_options=UNIPC_LOF),
    _s("DEISMultistepScheduler", DIFFUSERS, "deis", "linspace", grid_options=MULTI, final="t_min"),
    _s("DPMSolverSDEScheduler", DIFFUSERS, "dpmpp_sde", "linspace", grid_options=FRAC,
       note="same steps; diffusers' Brownian tree runs over sigma, velodiff's over t"),
    _s("LCMScheduler", DIFFUSERS, "lcm", "lcm", grid_options={"original_steps": 50},
       note="the lcm solver applies LCM's boundary condition c_skip x + c_out F on discrete schedules"),
    _s("FlowMatchEulerDiscreteScheduler", DIFFUSERS, "euler", "flow-shifted",
       note="named for a flow model whose scheduler it is: that model's pipeline grid (SD3's: "
       "flow-shifted; FluxPipeline passes its sigmas: flux); else its own (flow-shifted)"),
    _s("EDMEulerScheduler", DIFFUSERS, "euler", "karras"),
]  # fmt: skip

ALIASES: tuple[Alias, ...] = (*_KD_SAMPLERS, *_COMFY_SCHEDULERS, *_A1111, *_DIFFUSERS)

_BY_NAME = {(a.kind, a.name): a for a in ALIASES}
_BY_KEY: dict[tuple[str, str], Alias] = {}
for _a in ALIASES:  # of names equal when normalized, the first row wins unless spelled exactly
    _BY_KEY.setdefault((_a.kind, normalize(_a.name)), _a)


@dataclass(frozen=True)
class Resolved:
    """What a name means to velodiff: a solver and/or a grid with options (``alias`` None: its own)."""

    solver: str | None = None
    grid: str | None = None
    solver_options: Mapping[str, Any] = field(default_factory=dict)
    grid_options: Mapping[str, Any] = field(default_factory=dict)
    final: str | None = None
    alias: Alias | None = None


def _own_solvers() -> tuple[str, ...]:
    import sys

    from .commands.names import SOLVER_NAMES  # torch-free copy of the registry's names

    if "velodiff.solvers" in sys.modules:
        return tuple(sys.modules["velodiff.solvers"].SOLVERS)
    return SOLVER_NAMES


def _own_grids() -> tuple[str, ...]:
    import sys

    from .commands.names import GRID_NAMES  # torch-free copy of the registry's names

    if "velodiff.grids" in sys.modules:
        return tuple(sys.modules["velodiff.grids"].GRIDS)
    return GRID_NAMES


def _own(name: str, own: tuple[str, ...], kind: str) -> str | None:
    """velodiff's own name ``name`` stands for: spelled exactly, else (when no other tool spells it so
    exactly: A1111's "DPM++ 2M" stays A1111's) matched after normalization ("DPMPP_2M" = dpmpp_2m)."""
    if name in own:
        return name
    if (kind, name) in _BY_NAME:
        return None
    return {normalize(n): n for n in own}.get(normalize(name))


def _unknown(kind: str, name: str, own: tuple[str, ...]) -> VelodiffError:
    """`unknown solver 'x'; did you mean a, b? valid: ...` with near matches among velodiff's names and
    the aliases."""
    alias_kind = SAMPLER if kind == "solver" else SCHEDULER
    candidates = {normalize(n): n for n in own}
    candidates.update(
        {k: a.name for (ak, k), a in _BY_KEY.items() if ak == alias_kind and k not in candidates}
    )
    near = difflib.get_close_matches(normalize(name), list(candidates), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(candidates[k]) for k in near)}?" if near else ""
    return VelodiffError(
        f"unknown {kind} {name!r}; valid: {', '.join(sorted(own))} and other tools' names "
        f"(velodiff solvers --aliases){hint}"
    )


def _split(text: str) -> tuple[str, dict[str, str]]:
    """``Name:key=value,key=value`` (a diffusers class with config flags) -> (name, flags)."""
    name, _, rest = text.partition(":")
    flags: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in re.split(r",(?![^\[]*\])", rest))):  # [0,1] is one value
        key, eq, value = item.partition("=")
        if not eq:
            raise VelodiffError(f"{name}: write its flags as key=value, got {item!r}")
        flags[key.strip()] = value.strip()
    return name.strip(), flags


def _typed(flags: Mapping[str, str]) -> dict[str, Any]:
    """Option values written in a name (``karras:sigma_min=0.1,rho=7``) as Python values: true / false,
    integers, numbers, a JSON list ``[0,1]``, else the text."""
    out: dict[str, Any] = {}
    for key, text in flags.items():
        low = text.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
            continue
        for parse in (int, float, json.loads):
            try:
                out[key] = parse(text)
                break
            except ValueError:
                continue
        else:
            out[key] = text
    return out


def _with_options(name: str, own: tuple[str, ...], kind: str) -> Resolved | None:
    """``NAME:key=value,...`` where NAME is velodiff's own or another tool's name (not a diffusers
    class): the name's meaning with those options over its own (a solver's, or a grid's)."""
    if ":" not in name:
        return None
    base, flags = _split(name)
    if not flags:
        return None
    mine = _own(base, own, kind)
    alias = find(base, kind) if mine is None else None
    if mine is None and alias is None:
        return None
    given = _typed(flags)
    if kind == SAMPLER:
        if mine is not None:
            return Resolved(solver=mine, solver_options=given)
        assert alias is not None
        return Resolved(alias.solver, alias.grid, {**alias.solver_options, **given}, dict(alias.grid_options),
                        alias.final, alias)
    if mine is not None:
        return Resolved(grid=mine, grid_options=given)
    assert alias is not None
    return Resolved(grid=alias.grid, grid_options={**alias.grid_options, **given}, alias=alias)


def find(name: str, kind: str) -> Alias | None:
    """The row of ``name`` ("sampler" or "scheduler"): spelled exactly ("DDIM" is A1111's), else
    normalized ("ddim" is ComfyUI's)."""
    return _BY_NAME.get((kind, name)) or _BY_KEY.get((kind, normalize(name)))


def resolve_solver(
    name: str, own: tuple[str, ...] | None = None, model_config: Mapping[str, Any] | None = None
) -> Resolved:
    """A solver name as velodiff reads it: its own, or a sampler alias, or a diffusers class with flags
    (``DPMSolverMultistepScheduler:use_karras_sigmas=true,algorithm_type=sde-dpmsolver++``). With a
    model's own scheduler config (``model_config``), a class is that config made into the class, as
    diffusers' ``Class.from_config(pipe.scheduler.config)`` does, under the flags the name gives."""
    own = _own_solvers() if own is None else own
    mine = _own(name, own, SAMPLER)
    if mine is not None:
        return Resolved(solver=mine)
    base, flags = _split(name)
    cls = {c.lower(): c for c in _DIFFUSERS_CLASSES}.get(base.lower())
    if cls is not None:
        r = from_diffusers(cls, {**_carried(cls, model_config or {}), **flags})
        if cls == FLOW_MATCH and (model_config or {}).get("_class_name") == cls and r.grid == "flow-shifted":
            # a flow model's own scheduler: its pipeline's grid, the model's default (SD3's pipeline lets
            # the scheduler space its steps: flow-shifted; FluxPipeline passes its own sigmas: flux)
            return replace(r, grid=None, grid_options={})
        return r
    named = _with_options(name, own, SAMPLER)  # unipc:order=2, dpmpp_2m_sde:eta=0.5
    if named is not None:
        return named
    if flags:
        near = difflib.get_close_matches(base, _DIFFUSERS_CLASSES, n=2, cutoff=0.6)
        if not near:
            raise _unknown("solver", base, own)
        names = ", ".join(map(repr, near))
        raise VelodiffError(f"{base!r} is no diffusers scheduler class; did you mean {names}?")
    alias = find(name, SAMPLER)
    if alias is None:
        raise _unknown("solver", name, own)
    return Resolved(
        alias.solver, alias.grid, dict(alias.solver_options), dict(alias.grid_options), alias.final, alias
    )


def resolve_grid(name: str, own: tuple[str, ...] | None = None) -> Resolved:
    """A grid name as velodiff reads it: its own, or a scheduler alias (ComfyUI's, A1111's)."""
    own = _own_grids() if own is None else own
    mine = _own(name, own, SCHEDULER)
    if mine is not None:
        return Resolved(grid=mine)
    named = _with_options(name, own, SCHEDULER)  # karras:sigma_min=0.1,sigma_max=10
    if named is not None:
        return named
    alias = find(name, SCHEDULER)
    if alias is None:
        raise _unknown("grid", name, own)
    return Resolved(grid=alias.grid, grid_options=dict(alias.grid_options), alias=alias)


# --- diffusers' scheduler classes and their flags ----------------------------------------------------

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "none")


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise VelodiffError(f"expected true or false, got {value!r}")


#: diffusers' flags that define the grid in sigma, and velodiff's grid for each
_SIGMA_GRIDS = (("use_karras_sigmas", "karras"), ("use_exponential_sigmas", "exponential"),
                ("use_lu_lambdas", "logsnr"))  # fmt: skip
#: the schedulers whose Karras / exponential sigmas span their spaced timesteps' range, not the whole
#: table (they interpolate the spaced sigmas first; the multistep ones convert the whole table)
_SPACED_SIGMAS = (
    "EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler",
)  # fmt: skip


def _grid_of(cls: str, cfg: Mapping[str, Any], default_spacing: str) -> tuple[str, dict[str, Any]]:
    """The grid a diffusers scheduler's sigma flags choose. ``sigma_min`` / ``sigma_max`` (EulerDiscrete,
    UniPC) bound its Karras / exponential sigmas (diffusers reads them for those only)."""
    spacing = str(cfg.get("timestep_spacing", default_spacing))
    if spacing not in ("linspace", "leading", "trailing"):
        raise VelodiffError(
            f"{cls}: unknown timestep_spacing {spacing!r}; valid: leading, linspace, trailing"
        )
    for flag, grid in _SIGMA_GRIDS:
        if _flag(cfg.get(flag, False)):
            bounds: dict[str, Any] = {
                k: _float(cls, cfg, k) for k in ("sigma_min", "sigma_max") if cfg.get(k) is not None
            }
            if bounds and grid == "logsnr":
                raise VelodiffError(f"{cls}: sigma_min / sigma_max with use_lu_lambdas has no velodiff grid")
            if cls in _SPACED_SIGMAS and spacing != "linspace":  # the range of the spaced timesteps
                bounds["timestep_spacing"] = spacing
                if spacing == "leading" and _int(cls, cfg, "steps_offset", 0):
                    bounds["steps_offset"] = _int(cls, cfg, "steps_offset", 0)
            return grid, bounds
    if _flag(cfg.get("use_beta_sigmas", False)):
        raise VelodiffError(
            f"{cls}: use_beta_sigmas (beta quantiles in sigma) has no velodiff grid yet; ComfyUI's 'beta' "
            "(quantiles in timestep) is grid 'beta'"
        )
    opts: dict[str, Any] = {}
    if spacing == "leading" and "steps_offset" in cfg:
        opts["steps_offset"] = _int(cls, cfg, "steps_offset", 0)
    row = find(cls, SAMPLER)
    if row is not None and spacing != "trailing":
        if row.grid_options.get("drop_last"):
            opts["drop_last"] = True
        if row.grid_options.get("fractional") and spacing == "linspace":
            opts["fractional"] = True
    return spacing, opts


def _int(cls: str, cfg: Mapping[str, Any], flag: str, default: int) -> int:
    """The integer flag ``flag`` of ``cfg`` (a typed "2" or 2; "two", "2.5" or True refused in one line)."""
    value = cfg.get(flag, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip()
    if not isinstance(value, bool) and re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    raise VelodiffError(f"{cls}: {flag} must be an integer, got {value!r}")


def _float(cls: str, cfg: Mapping[str, Any], flag: str, default: float | None = None) -> float:
    """The number flag ``flag`` of ``cfg`` (a typed "0.1" or 0.1; "abc", "none" or a bool refused in one
    line)."""
    value = cfg.get(flag, default)
    try:
        if isinstance(value, bool):
            raise ValueError
        out = float(value)
        if not math.isfinite(out):
            raise ValueError
        return out
    except (TypeError, ValueError):
        raise VelodiffError(f"{cls}: {flag} must be a finite number, got {value!r}") from None


def _dpmsolver_multistep(cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    cls = "DPMSolverMultistepScheduler"
    algo_name = str(cfg.get("algorithm_type", "dpmsolver++"))
    algo = normalize(algo_name)
    order = _int(cls, cfg, "solver_order", 2)
    solver_type = normalize(str(cfg.get("solver_type", "midpoint")))
    opts: dict[str, Any] = {}
    if "lower_order_final" in cfg:
        opts["lower_order_final"] = _flag(cfg["lower_order_final"])
    if _flag(cfg.get("euler_at_final", False)):
        raise VelodiffError("DPMSolverMultistepScheduler: euler_at_final has no velodiff option yet")
    if order == 1 and algo in ("dpmsolverpp", "dpmsolver"):
        return "ddim", {}
    if solver_type not in ("midpoint", "heun"):
        raise VelodiffError(
            f"DPMSolverMultistepScheduler: unknown solver_type {solver_type!r}; valid: heun, midpoint"
        )
    if algo == "dpmsolverpp" and order == 2:
        return "dpmpp_2m", {**opts, "solver_type": solver_type}
    if algo == "dpmsolverpp" and order == 3:
        return "dpmpp_3m", {**opts, "variant": "diffusers"}
    if algo == "sde_dpmsolverpp" and order == 1:  # = DDIM with eta = 1 (ddim.py)
        return "ddpm", {}
    if algo == "sde_dpmsolverpp" and order == 2:
        return "sde_dpmpp_2m", {**opts, "solver_type": solver_type}
    if algo == "sde_dpmsolverpp" and order == 3:
        # its x0'' term: alpha_t ((1 - e^{-2h} - 2h) / (2h)^2 - 1/2) D2, where the integral of the SDE's
        # exponential against the Taylor term gives + 1/2 (as its ODE branch has): the term does not vanish
        # as h -> 0, so the update is not third order; not reproduced
        raise VelodiffError(
            f"{cls}: algorithm_type='sde-dpmsolver++' at solver_order=3 is not reproduced: diffusers' "
            "third-order SDE update has the sign of its x0'' term's 1/2 flipped; use sde_dpmpp_3m"
        )
    raise VelodiffError(
        f"{cls}: algorithm_type={algo_name!r}, solver_order={order}, "
        f"solver_type={cfg.get('solver_type', 'midpoint')!r} has no velodiff solver yet; provided: "
        "dpmsolver++ orders 1-3 and sde-dpmsolver++ orders 1-2"
    )


def _steps_list(cls: str, flag: str, value: Any) -> tuple[int, ...]:
    """A list of step indices: a list of ints, or typed as ``[0,1,2]`` or ``0|1|2``."""
    items = value if isinstance(value, (list, tuple)) else re.split(r"[|,\s]+", str(value).strip("[]() "))
    try:
        return tuple(int(v) for v in items if str(v).strip() != "")
    except (TypeError, ValueError):
        raise VelodiffError(f"{cls}: {flag} is a list of step indices, got {value!r}") from None


def _unipc(cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    cls = "UniPCMultistepScheduler"
    opts: dict[str, Any] = {"order": _int(cls, cfg, "solver_order", 2)}
    if opts["order"] < 1:
        raise VelodiffError(f"{cls}: solver_order must be 1 or more, got {opts['order']}")
    opts["solver_type"] = str(cfg.get("solver_type", "bh2"))
    # diffusers' UniPC step lowers the final orders at every step count (min(solver_order,
    # len(timesteps) - step_index)), unlike its DPM-Solver++ / DEIS (below 15 steps only)
    opts["lower_order_final"] = "always" if _flag(cfg.get("lower_order_final", True)) else False
    if cfg.get("disable_corrector"):
        opts["disable_corrector"] = _steps_list(cls, "disable_corrector", cfg["disable_corrector"])
    if not _flag(cfg.get("predict_x0", True)):
        raise VelodiffError(f"{cls}: predict_x0=False (noise prediction) has no velodiff solver")
    return "unipc", opts


def _deis(cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    order = _int("DEISMultistepScheduler", cfg, "solver_order", 2)
    if not 1 <= order <= 3:  # diffusers' DEIS has closed forms for orders 1-3 (it runs 3 for more)
        raise VelodiffError(f"DEISMultistepScheduler: solver_order={order}; diffusers' DEIS has orders 1-3")
    opts = {"lower_order_final": _flag(cfg["lower_order_final"])} if "lower_order_final" in cfg else {}
    return ("deis" if order <= 2 else "deis_3"), {**opts, "order": order}


def _edm_euler(cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """EDMEulerScheduler's grid: its ``sigma_schedule`` (Karras with ``rho``, or exponential) between
    ``sigma_min`` and ``sigma_max``; at the class defaults (0.002, 80: EDM's range) the schedule's own
    range, which for velodiff's EDM schedule is the same."""
    cls, grid = "EDMEulerScheduler", str(cfg.get("sigma_schedule", "karras"))
    if grid not in ("karras", "exponential"):
        raise VelodiffError(f"{cls}: unknown sigma_schedule {grid!r}; valid: exponential, karras")
    opts: dict[str, Any] = {}
    for key, default in (("sigma_min", 0.002), ("sigma_max", 80.0)):
        if _float(cls, cfg, key, default) != default:
            opts[key] = _float(cls, cfg, key)
    if grid == "karras" and _float(cls, cfg, "rho", 7.0) != 7.0:  # (the exponential sigmas have no rho)
        opts["rho"] = _float(cls, cfg, "rho")
    return grid, opts


def _repeat_final(cls: str, grid: str, solver: str, opts: dict[str, Any], cfg: Mapping[str, Any]) -> None:
    """diffusers' Karras / exponential / Lu sigmas with final_sigmas_type="sigma_min" (DEIS always):
    ``steps`` levels ending at sigma_min, then sigma_min again, a zero-length last step (grid option
    ``repeat_final``, grids.py). That step does not move the sample for Euler, DDIM and DPM-Solver++ /
    DEIS (orders 1-2); the multistep solvers then keep their order on the real steps (diffusers lowers it
    on the zero-length one). Not reproduced: order 3 (diffusers lowers the step before, or divides by the
    zero length) and UniPC (its zero-length step corrects the last real one)."""
    why = f"{cls}: final_sigmas_type=sigma_min with {grid} sigmas (a zero-length last step)"
    if cls == "EulerDiscreteScheduler" and "sigma_min" in cfg and cfg["sigma_min"] is not None:
        raise VelodiffError(f"{why} and sigma_min: its last step runs on to the schedule's smallest sigma, "
                            "which velodiff's grids do not make; use final_sigmas_type=zero")  # fmt: skip
    if solver == "unipc":
        raise VelodiffError(f"{why}: UniPC's correction there is not reproduced; use final_sigmas_type=zero")
    if solver in ("dpmpp_3m", "deis_3"):  # diffusers lowers the step before it (< 15 steps) or divides by
        # the zero length (DPM-Solver++ 3M: NaN)
        raise VelodiffError(f"{why} at solver_order=3 is not reproduced; use final_sigmas_type=zero")
    if solver in ("dpmpp_2m", "sde_dpmpp_2m", "deis"):
        opts["lower_order_final"] = False


_SIMPLE_SOLVERS = {a.name: a.solver for a in _DIFFUSERS}
FLOW_MATCH = "FlowMatchEulerDiscreteScheduler"
#: what a bare class name stands for: the config the Stable Diffusion pipelines give it
_SD_CONFIG = {
    "DDIMScheduler": {"steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False},
    "DDPMScheduler": {"steps_offset": 1, "clip_sample": False},
    "LCMScheduler": {"steps_offset": 1},
}
_DIFFUSERS_CLASSES = tuple(_SIMPLE_SOLVERS)
#: the flags each class's mapping reads (others are refused rather than silently ignored)
_SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                "timestep_spacing", "steps_offset", "final_sigmas_type")  # fmt: skip
#: config entries that describe the model or are shared defaults, not the sampler (read elsewhere or moot:
#: the shift / flow flags matter only with use_flow_sigmas, which is refused)
_MODEL_FLAGS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "prediction_type", "clip_sample", "clip_sample_range", "thresholding",
                "dynamic_thresholding_ratio",
                "sample_max_value", "rescale_betas_zero_snr", "timestep_type",
                "shift", "use_dynamic_shifting", "base_shift", "max_shift", "time_shift_type",
                "shift_terminal", "base_image_seq_len", "max_image_seq_len", "set_alpha_to_one",
                "skip_prk_steps", "_class_name", "_diffusers_version",
                "lambda_min_clipped", "use_flow_sigmas", "flow_shift", "original_inference_steps",
                "timestep_scaling", "noise_sampler_seed", "sigma_data")  # fmt: skip
_CLASS_FLAGS = {
    "DPMSolverMultistepScheduler": ("algorithm_type", "solver_order", "solver_type", "lower_order_final",
                                    "euler_at_final", "variance_type"),
    "UniPCMultistepScheduler": ("solver_order", "solver_type", "lower_order_final", "predict_x0",
                                "disable_corrector", "solver_p", "sigma_min", "sigma_max"),
    "DEISMultistepScheduler": ("solver_order", "solver_type", "algorithm_type", "lower_order_final"),
    "EulerDiscreteScheduler": ("interpolation_type", "sigma_min", "sigma_max"),
    "DDPMScheduler": ("variance_type",),
    "EDMEulerScheduler": ("sigma_schedule", "rho", "sigma_min", "sigma_max"),
}  # fmt: skip
#: what each class's ``__init__`` rewrites another class's value to (``UniPCMultistepScheduler.from_config``
#: of a DPM-Solver config has solver_type "midpoint": UniPC runs it as "bh2")
_COERCED = {
    "UniPCMultistepScheduler": {"solver_type": (("midpoint", "heun", "logrho"), "bh2")},
    "DEISMultistepScheduler": {"algorithm_type": (("dpmsolver", "dpmsolver++"), "deis"),
                               "solver_type": (("midpoint", "heun", "bh1", "bh2"), "logrho")},
    "DPMSolverMultistepScheduler": {"algorithm_type": (("deis",), "dpmsolver++"),
                                    "solver_type": (("logrho", "bh1", "bh2"), "midpoint")},
}  # fmt: skip
#: flags read whose other values change the result in ways velodiff does not reproduce: the value it does
_ONLY = {
    "EulerDiscreteScheduler": {"interpolation_type": "linear"},
    "DDPMScheduler": {"variance_type": "fixed_small"},
    "DPMSolverMultistepScheduler": {"variance_type": None},
    "UniPCMultistepScheduler": {"solver_p": None},
    "DEISMultistepScheduler": {"algorithm_type": "deis", "solver_type": "logrho"},
}


def _same(a: Any, b: Any) -> bool:
    """``a == b`` for config values (None and a typed "none" alike); arrays and the like compare unequal."""
    if b is None or a is None:
        return str(a).strip().lower() in ("none", "") if b is None else False
    try:
        return bool(a == b) or str(a) == str(b)
    except (TypeError, ValueError, RuntimeError):
        return False


def _carried(cls: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """What ``cls.from_config(config)`` takes from another scheduler's ``config`` that the mapping
    reads: the entries the class's ``__init__`` accepts (diffusers drops the others), set (not None),
    among its sigma and class flags and DDIM's end point (SDXL's ``timestep_spacing="leading"`` and
    ``steps_offset=1``, a model's ``use_karras_sigmas``)."""
    import inspect

    import diffusers

    if not config:
        return {}
    takes = inspect.signature(getattr(diffusers, cls).__init__).parameters
    read = (*_SIGMA_FLAGS, *_CLASS_FLAGS.get(cls, ()), "set_alpha_to_one", "original_inference_steps")
    return {k: config[k] for k in read if k in takes and config.get(k) is not None}


def _non_default(scheduler: Any) -> dict[str, Any]:
    """A live scheduler's config entries that its class's ``__init__`` takes and that differ from its
    defaults: what was set on it. (Other entries, such as another class's keys carried by
    ``from_config``, are not read by the class.)"""
    import inspect

    cfg = dict(getattr(scheduler, "config", {}))
    try:
        params = inspect.signature(type(scheduler).__init__).parameters
    except (TypeError, ValueError):
        return {k: v for k, v in cfg.items() if not k.startswith("_")}
    return {
        k: cfg[k]
        for k, p in params.items()
        if k in cfg and (p.default is inspect.Parameter.empty or not _same(cfg[k], p.default))
    }


def _clipped_timesteps(cfg: Mapping[str, Any]) -> int:
    """How many of the noisiest trained timesteps DPM-Solver's ``lambda_min_clipped`` takes out of the
    grid (diffusers' ``set_timesteps`` then spaces the steps below them; 0: the flag changes nothing,
    as for SD's scaled-linear betas, whose lowest log-SNR / 2 is -2.7)."""
    bound = float(cfg.get("lambda_min_clipped", -math.inf))
    if bound == -math.inf:
        return 0
    from .schedules import DiscreteVP

    abar = DiscreteVP.from_diffusers_config(dict(cfg)).alphas_cumprod.float()  # diffusers' lambda_t, float32
    lam = 0.5 * (abar.log() - (1 - abar).log())
    return int((lam < bound).sum())


def from_diffusers(scheduler: Any, config: Mapping[str, Any] | None = None) -> Resolved:
    """The velodiff solver, grid and options of a diffusers scheduler: a scheduler object, or its class
    name with ``config`` (flags as values or strings: ``{"use_karras_sigmas": "true"}``).

    Reproduced: the class's step and its sigma flags (``use_karras_sigmas``, ``use_exponential_sigmas``,
    ``use_lu_lambdas``, ``timestep_spacing`` with ``steps_offset``, ``final_sigmas_type``, and the
    ``sigma_min`` / ``sigma_max`` bounds of Karras / exponential sigmas); for DPMSolverMultistep
    ``algorithm_type`` (dpmsolver++, sde-dpmsolver++), ``solver_order``, ``solver_type``,
    ``lower_order_final``; UniPC's ``solver_order``, ``solver_type``, ``disable_corrector``; DEIS's
    ``solver_order`` (1-3); EDMEuler's ``sigma_schedule`` and ``rho``. A flag velodiff cannot reproduce
    is refused in one line naming it: for a scheduler object, every config entry its class takes that
    differs from the class's default is checked as the typed form's flags are."""
    strict = isinstance(scheduler, str)
    if strict:
        cls, cfg = scheduler, dict(config or {})
        given = dict(cfg)
    else:
        cls, cfg = type(scheduler).__name__, {**dict(getattr(scheduler, "config", {})), **dict(config or {})}
        given = {**_non_default(scheduler), **dict(config or {})}
    if cls not in _SIMPLE_SOLVERS:
        raise VelodiffError(
            f"diffusers scheduler {cls!r} has no velodiff mapping yet; mapped: "
            f"{', '.join(_DIFFUSERS_CLASSES)}"
        )
    alias = find(cls, SAMPLER)
    assert alias is not None and alias.solver is not None
    read = set(_SIGMA_FLAGS) | set(_CLASS_FLAGS.get(cls, ()))
    unknown = sorted(k for k in given if k not in read | set(_MODEL_FLAGS))
    if unknown:
        near = difflib.get_close_matches(unknown[0], sorted(read | set(_MODEL_FLAGS)), n=2, cutoff=0.75)
        if near:
            hint = ", ".join(map(repr, near))
            raise VelodiffError(f"{cls}: unknown flag {unknown[0]!r}; did you mean {hint}?")
        raise VelodiffError(
            f"{cls}: flag {unknown[0]!r} has no velodiff equivalent yet; flags read: "
            f"{', '.join(sorted(read))}"
        )
    if strict:  # a bare class name means the Stable Diffusion pipelines' config of it
        cfg = {**_SD_CONFIG.get(cls, {}), **cfg}
    clipped = _clipped_timesteps(cfg)
    if clipped:
        raise VelodiffError(
            f"{cls}: lambda_min_clipped={cfg['lambda_min_clipped']} drops this schedule's {clipped} noisiest "
            "trained timesteps from the grid; not reproduced yet (on SD's scaled-linear betas it drops none "
            "and is accepted)"
        )
    for flag, (values, to) in _COERCED.get(cls, {}).items():  # as the class's __init__ rewrites them
        if flag in cfg and str(cfg[flag]) in values:
            cfg[flag] = to
    for flag in ("thresholding", "use_flow_sigmas", "clip_sample"):
        if _flag(cfg.get(flag, False)):
            raise VelodiffError(f"{cls}: {flag}=True has no velodiff equivalent yet")
    for flag, value in _ONLY.get(cls, {}).items():
        if flag in cfg and not _same(cfg[flag], value):
            raise VelodiffError(f"{cls}: {flag}={cfg[flag]!r} has no velodiff equivalent (only {value!r})")
    solver, solver_opts = alias.solver, dict(alias.solver_options)
    if cls == "DPMSolverMultistepScheduler":
        solver, solver_opts = _dpmsolver_multistep(cfg)
    elif cls == "UniPCMultistepScheduler":
        solver, solver_opts = _unipc(cfg)
    elif cls == "DEISMultistepScheduler":
        solver, solver_opts = _deis(cfg)
    if cls in ("FlowMatchEulerDiscreteScheduler", "EDMEulerScheduler"):
        for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                     "stochastic_sampling", "use_dynamic_shifting"):  # fmt: skip
            if _flag(cfg.get(flag, False)):
                raise VelodiffError(f"{cls}: {flag}=True has no velodiff mapping yet")
        grid, grid_opts = (_edm_euler(cfg) if cls == "EDMEulerScheduler" else (alias.grid, {}))
    elif cls == "LCMScheduler":  # its own timesteps: the skipping-step grid it was distilled on
        grid, grid_opts = "lcm", {"original_steps": _int(cls, cfg, "original_inference_steps", 50)}
    else:
        spacing = {"DDIMScheduler": "leading", "DDPMScheduler": "leading"}.get(
            cls, "linspace"
        )
        grid, grid_opts = _grid_of(cls, cfg, spacing)
    final = alias.final or "zero"
    if "final_sigmas_type" in cfg:
        final = {"zero": "zero", "sigma_min": "t_min"}.get(str(cfg["final_sigmas_type"]))
        if final is None:
            raise VelodiffError(f"{cls}: final_sigmas_type must be zero or sigma_min")
    if cls == "DDIMScheduler":
        final = "zero" if _flag(cfg.get("set_alpha_to_one", True)) else "t_min"
    if final == "t_min" and grid in ("karras", "exponential", "logsnr"):
        _repeat_final(cls, grid, solver, solver_opts, cfg)
        grid_opts["repeat_final"] = True
    return Resolved(solver, grid, solver_opts, grid_opts, final, alias)


def table(kind: str | None = None) -> list[Alias]:
    """The rows of :data:`ALIASES` (of one kind)."""
    return [a for a in ALIASES if kind is None or a.kind == kind]


__all__ = [
    "ALIASES",
    "Alias",
    "Resolved",
    "find",
    "from_diffusers",
    "normalize",
    "resolve_grid",
    "resolve_solver",
]
