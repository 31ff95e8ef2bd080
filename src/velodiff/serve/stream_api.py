"""``/api/stream``: streaming image-to-image over a websocket (:mod:`velodiff.serve.stream`).

The client sends one JSON text message with the stream's settings (``prompt``, and optionally ``model``,
``steps``, ``strength``, ``guidance``, ``cfg`` self/full/none, ``similarity``, ``seed``), and gets
``{"type": "ready", "delay": k - 1, ...}`` (output frame i is input frame i - delay). Then for every
binary message (an image file: PNG, JPEG, WebP, of the stream's size) it gets a text message
``{"type": "frame", "index", "skipped", "ms"}`` and the output frame as a binary PNG. A bad setting or
frame gets ``{"type": "error", "error": one line}``; the socket stays open after a bad frame.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.concurrency import run_in_threadpool

from ..errors import VelodiffError
from ..images import png_bytes

router = APIRouter(tags=["stream"])


def read_frame(data: bytes, size: tuple[int, int] | None, max_pixels: int) -> Any:
    from ..images import open_image
    from ..pipelines.images import image_tensor

    im = open_image(data, "a frame").convert("RGB")
    if size is not None and im.size != size:
        raise VelodiffError(
            f"frame is {im.size[0]}x{im.size[1]}; this stream's frames are {size[0]}x{size[1]}"
        )
    if im.size[0] * im.size[1] > max_pixels:  # one frame holds the model: bounded like a job's image
        raise VelodiffError(
            f"frame is {im.size[0]}x{im.size[1]}, more than this server's bound of {max_pixels} pixels"
        )
    return image_tensor(im)


async def receive(socket: WebSocket) -> dict[str, Any] | None:
    """The next message (its ``text`` or ``bytes``), None once the client is gone."""
    message = await socket.receive()
    return None if message["type"] == "websocket.disconnect" else message


@router.websocket("/api/stream")
async def stream(socket: WebSocket) -> None:
    from ..pipelines.images import to_pil
    from .stream import StreamConfig, StreamImg2Img

    srv = socket.app.state.velodiff
    await socket.accept()

    async def error(message: str) -> None:
        await socket.send_json({"type": "error", "error": message.splitlines()[0]})

    try:
        first = await receive(socket)
        if first is None:
            return
        try:
            try:
                settings = json.loads(first.get("text") or "")
            except ValueError:
                raise VelodiffError('the first message is JSON text: {"prompt": "...", ...}') from None
            model = settings.pop("model", None) if isinstance(settings, dict) else None
            if model is not None and not isinstance(model, str):
                raise VelodiffError(f"model must be a name, got {model!r}")
            m, _ = srv.engine.model(model)
            config = StreamConfig.of(settings)
            srv.engine.check_tokens(m, "prompt", config.prompt)
            st = await run_in_threadpool(StreamImg2Img, m, config)
        except VelodiffError as e:
            await error(str(e))
            await socket.close(code=1008)
            return
        await socket.send_json({"type": "ready", "delay": st.k - 1, "batch": st.k, "cfg": config.cfg})
        size: tuple[int, int] | None = None
        index = 0
        while (message := await receive(socket)) is not None:
            t = time.perf_counter()
            try:
                if message.get("bytes") is None:
                    raise VelodiffError("a frame is a binary message (an image file); text is not a frame")
                frame = read_frame(message["bytes"], size, srv.engine.max_pixels)
            except VelodiffError as e:
                await error(str(e))
                continue
            size = size or (int(frame.shape[-1]), int(frame.shape[-2]))

            def step(frame: Any = frame) -> tuple[bytes, bool]:
                with srv.engine.run_lock:
                    out, skipped = st(frame)
                return png_bytes(to_pil(out)[0]), skipped

            png, skipped = await run_in_threadpool(step)
            ms = (time.perf_counter() - t) * 1000
            await socket.send_json({"type": "frame", "index": index, "skipped": skipped, "ms": round(ms, 2)})
            await socket.send_bytes(png)
            index += 1
    except WebSocketDisconnect:
        return
