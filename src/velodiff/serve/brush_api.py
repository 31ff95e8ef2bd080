"""Region brushes on a finished job's image (``velodiff.edit.brushes``, after Layered Diffusion Brushes):
``POST /api/brush`` with the job, the image's index and the layers (mask as a PNG data URL at the image's
size, white = repaint; prompt; seed; strength) answers with the composite and the network calls its
layers made (``nfe``; ``base_nfe``: the base trajectory's, on the first request of an image only). The
page's brush editor calls it with no layers when it opens an image (caching the base) and after every
stroke.

The server keeps one :class:`~velodiff.edit.brushes.Canvas` per (job, image) (the newest
``CANVASES``): a request whose first k layers equal the canvas's keeps their cached trajectories and
re-renders only the layers above, so a new stroke costs the last ``strength`` share of the steps, not a
generation. Renders hold the engine's run lock (one network user at a time, as the worker's batches)."""

from __future__ import annotations

import base64
import threading
import time
from collections import OrderedDict
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..errors import VelodiffError
from ..images import png_bytes
from ..limits import SEED_END, SEED_MIN
from .state import Server

router = APIRouter(prefix="/api", tags=["brush"])

#: canvases kept (one per job image); the oldest is dropped beyond this
CANVASES = 8


class LayerBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # JSON types as declared: "2" is not 2

    mask: str = Field(..., description="PNG data URL (or base64) at the image's size, white = repaint")
    prompt: str = Field(..., description="what the brush paints")
    seed: int = Field(0, ge=SEED_MIN, lt=SEED_END,
                      description="seed of the layer's noise, in [-2**63, 2**64) as the CLI's --seed")
    strength: float = Field(0.6, description="share of the steps the layer re-runs, in (0, 1]")


#: layers one request may hold (each re-renders part of the steps under the model's lock)
MAX_LAYERS = 32


class BrushBody(BaseModel):
    """Layers over image ``index`` of finished job ``job``, bottom first."""

    model_config = ConfigDict(extra="forbid", strict=True)  # JSON types as declared: "2" is not 2

    job: str = Field(..., description="a finished job's id")
    index: int = Field(0, description="which of the job's images")
    layers: list[LayerBody] = Field(
        ..., max_length=MAX_LAYERS, description="the brush layers, bottom first (may be empty)"
    )


def decode_mask(data: str) -> Any:
    """A PNG from a data URL or plain base64, as a grayscale PIL image; one line when it is not one."""
    from ..images import data_url_bytes, open_image

    return open_image(data_url_bytes(data, "layer's mask"), "a layer's mask").convert("L")


class Brushes:
    """The server's canvases, newest last."""

    def __init__(self, srv: Server) -> None:
        self.srv = srv
        self.canvases: OrderedDict[tuple[str, int], tuple[Any, list[tuple]]] = OrderedDict()
        self.lock = threading.Lock()

    def canvas(self, job_id: str, index: int) -> tuple[Any, list[tuple]]:
        from ..edit.brushes import Canvas

        key = (job_id, index)
        if key in self.canvases:
            self.canvases.move_to_end(key)
            return self.canvases[key]
        job = self.srv.store.get(job_id)
        if job is None:
            raise LookupError(f"no job {job_id!r}")
        if job.state != "done":
            raise VelodiffError(f"job {job_id} is {job.state}; brushes paint over a finished job's image")
        p = job.params
        if not 0 <= index < p["n"]:
            raise VelodiffError(f"job {job_id} has images 0..{p['n'] - 1}, not {index}")
        if p.get("layout"):
            raise VelodiffError(
                f"job {job_id} was drawn with a layout ({p['kind']}); brushes repaint a plain generation's "
                "cached steps"
            )
        model, _ = self.srv.engine.model(p["model"])
        if (p["height"], p["width"]) != tuple(model.default_size):
            h, w = model.default_size
            raise VelodiffError(
                f"brushes paint at the model's own size ({w}x{h}); this job is {p['width']}x{p['height']}"
            )
        keys = ("steps", "solver", "solver_options", "grid", "guidance", "negative")  # as Engine.run
        options = {k: p[k] for k in keys if p.get(k) is not None}
        if p.get("plan"):
            options["plan"] = p["plan"]
        entry = (Canvas(model, p["prompt"], seed=p["seed"] + index, **options), [])
        self.canvases[key] = entry
        while len(self.canvases) > CANVASES:
            self.canvases.popitem(last=False)
        return entry

    def paint(self, body: BrushBody) -> dict[str, Any]:
        with self.lock:
            canvas, signatures = self.canvas(body.job, body.index)
            wanted = [(layer.mask, layer.prompt, layer.seed, layer.strength) for layer in body.layers]
            masks = [decode_mask(layer.mask) for layer in body.layers]
            keep = 0
            while keep < min(len(wanted), len(signatures)) and wanted[keep] == signatures[keep]:
                keep += 1
            for i in reversed(range(keep, len(canvas.layers))):
                canvas.remove(i)
            del signatures[keep:]
            try:
                for layer, mask, sig in zip(body.layers[keep:], masks[keep:], wanted[keep:], strict=True):
                    canvas.add(mask, layer.prompt, seed=layer.seed, strength=layer.strength)
                    signatures.append(sig)
                t0 = time.perf_counter()
                with self.srv.engine.run_lock:
                    image = canvas.render("pil")
            except VelodiffError:  # a refused layer leaves the canvas as it was below it
                for i in reversed(range(keep, len(canvas.layers))):
                    canvas.remove(i)
                del signatures[keep:]
                raise
            seconds = time.perf_counter() - t0
            steps = int(canvas.options["steps"])
        return {
            "image": "data:image/png;base64," + base64.b64encode(png_bytes(image.images[0])).decode(),
            "layers": len(canvas.layers),
            "rendered": len(body.layers) - keep,
            "nfe": canvas.last_nfe - canvas.last_base_nfe,
            "base_nfe": canvas.last_base_nfe,
            "steps": steps,
            "seconds": seconds,
        }


def brushes(request: Request) -> Brushes:
    state = request.app.state
    if getattr(state, "brushes", None) is None:
        state.brushes = Brushes(state.velodiff)
    return state.brushes


@router.post("/brush", summary="Paint brush layers over a finished job's image (cached trajectories)")
async def paint(body: BrushBody, request: Request) -> dict[str, Any]:
    try:
        return await run_in_threadpool(brushes(request).paint, body)
    except LookupError as e:
        raise HTTPException(404, str(e.args[0]) if e.args else "not found") from None
