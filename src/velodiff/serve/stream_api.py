"""``/api/stream``: streaming image-to-image over a websocket (:mod:`velodiff.serve.stream`).

The client sends one JSON text message with the stream's settings (``prompt``, and optionally ``model``,
``steps``, ``strength``, ``guidance``, ``cfg`` self/full/none, ``similarity``, ``seed``), and gets
``{"type": "ready", "delay": k - 1, ...}`` (output frame i is input frame i - delay). Then for every
binary message (an image file: PNG, JPEG, WebP, of the stream's size) it gets a text message
``{"type": "frame", "index", "skipped", "ms"}`` and the output frame as a binary PNG. A bad setting or
frame gets ``{"type": "error", "error": one line}``; the socket stays open after a bad frame.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.concurrency import run_in_threadpool

from ..errors import VelodiffError
from .engine import png_bytes

router = APIRouter(tags=["stream"])


def read_frame(data: bytes, size: tuple[int, int] | None) -> Any:
    from ..images import open_image
    from ..pipelines.common import image_tensor

    im = open_image(data, "a frame").convert("RGB")
    if size is not None and im.size != size:
        raise VelodiffError(
            f"frame is {im.size[0]}x{im.size[1]}; this stream's frames are {size[0]}x{size[1]}"
        )
    return image_tensor(im)


@router.websocket("/api/stream")
async def stream(socket: WebSocket) -> None:
    from ..pipelines.common import to_pil
    from .stream import StreamConfig, StreamImg2Img

    srv = socket.app.state.velodiff
    await socket.accept()
    try:
        settings = await socket.receive_json()
        try:
            model = settings.pop("model", None)
            m, _ = srv.engine.model(model)
            config = StreamConfig(**settings)
            srv.engine.check_tokens(m, "prompt", config.prompt)
            st = await run_in_threadpool(StreamImg2Img, m, config)
        except (VelodiffError, TypeError) as e:
            await socket.send_json({"type": "error", "error": str(e).splitlines()[0]})
            await socket.close(code=1008)
            return
        await socket.send_json({"type": "ready", "delay": st.k - 1, "batch": st.k, "cfg": config.cfg})
        size: tuple[int, int] | None = None
        index = 0
        while True:
            data = await socket.receive_bytes()
            t = time.perf_counter()
            try:
                frame = read_frame(data, size)
            except VelodiffError as e:
                await socket.send_json({"type": "error", "error": str(e)})
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
