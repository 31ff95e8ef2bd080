"""Streaming img2img (StreamDiffusion's stream batch, residual CFG, stochastic similarity filter): each
output frame is exactly the plain img2img pipeline's DDIM run on that frame with its noise, at one
batched network call per frame; RCFG needs no unconditional pass; the filter skips near-identical
frames only; and the websocket at /api/stream takes frames in and gives frames out."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from serve_fixtures import engine, running_server
from velodiff.errors import VelodiffError
from velodiff.pipelines import img2img, text2img
from velodiff.serve.stream import StreamConfig, StreamImg2Img

ws_client = pytest.importorskip("websockets.sync.client")


@pytest.fixture(scope="module")
def model():
    return engine().model(None)[0]


@pytest.fixture(scope="module")
def frames(model):
    """Two different 64x64 frames in [0, 1]."""
    return text2img(
        model,
        ["a red circle above a blue square", "a green triangle"],
        seeds=[1, 2],
        steps=6,
        output="tensor",
    ).images


class Calls:
    """Counts the network's calls and the samples it evaluated (a forward pre-hook)."""

    def __init__(self, net) -> None:
        self.calls, self.samples = 0, 0
        self.handle = net.register_forward_pre_hook(self.hook)

    def hook(self, module, args) -> None:
        self.calls += 1
        self.samples += args[0].shape[0]


@pytest.mark.parametrize(("cfg", "guidance"), [("none", 1.0), ("full", 2.5)])
def test_each_output_frame_is_the_plain_img2img_of_its_input(model, frames, cfg, guidance):
    s = StreamImg2Img(
        model,
        StreamConfig(prompt="a blue square", cfg=cfg, guidance=guidance, steps=10, strength=0.5, seed=3),
    )
    assert s.k == 5
    inputs = [frames[i % 2 : i % 2 + 1] for i in range(6)]
    outs = [s(f)[0] for f in inputs]
    g = torch.Generator().manual_seed(3)  # the stream's noise: one draw per entering frame
    z = model.encode(inputs[0])
    eps = [torch.randn(z.shape, generator=g) for _ in range(len(inputs) + s.k - 1)]
    # the first frame primed the stream (entered k times); output i is input i - (k - 1), i.e. the
    # priming draws give outputs 0..., then frame j enters with draw j + k - 1
    for i, out in enumerate(outs):
        src = i - (s.k - 1)
        frame = inputs[0] if src <= 0 else inputs[src]
        ref = img2img(
            model,
            "a blue square",
            frame,
            strength=0.5,
            steps=10,
            solver="ddim",
            guidance=guidance,
            latents=eps[i],
            output="tensor",
        ).images
        assert (ref - out).abs().max() < 1e-4, i


def test_stream_batch_is_one_call_per_frame_and_rcfg_has_no_uncond_pass(model, frames):
    counts = {}
    for cfg in ("self", "full"):
        s = StreamImg2Img(
            model, StreamConfig(prompt="a blue square", cfg=cfg, guidance=2.0, steps=10, strength=0.5)
        )
        s(frames[:1])  # priming
        c = Calls(model.network)
        try:
            for _ in range(4):
                s(frames[:1])
        finally:
            c.handle.remove()
        counts[cfg] = (c.calls, c.samples)
    assert counts["self"] == (4, 4 * 5)  # one call of the k = 5 frames in flight, per frame
    assert counts["full"] == (4, 4 * 10)  # plain CFG: the unconditional branch doubles it


def test_similarity_filter_skips_only_near_identical_frames(model, frames):
    s = StreamImg2Img(
        model, StreamConfig(prompt="a blue square", similarity=0.98, max_skip=3, steps=4, strength=0.5)
    )
    first, skipped = s(frames[:1])
    assert not skipped
    same = [s(frames[:1]) for _ in range(4)]
    assert [k for _, k in same] == [True, True, True, False]  # cos = 1: skip, at most max_skip in a row
    assert torch.equal(same[0][0], first)  # a skip repeats the last output
    other = [s(frames[i % 2 : i % 2 + 1])[1] for i in range(1, 7)]  # alternating, dissimilar frames
    assert not any(other)
    from velodiff.pipelines.images import to_pil

    out, _ = s(to_pil(frames[:1])[0])  # a PIL frame, as a camera library gives it
    assert out.shape == frames[:1].shape
    with pytest.raises(VelodiffError, match="one frame at a time"):
        s(frames)


def png(t: torch.Tensor) -> bytes:
    from velodiff.pipelines.images import to_pil

    buf = io.BytesIO()
    to_pil(t)[0].save(buf, format="PNG")
    return buf.getvalue()


def test_websocket_frames_in_frames_out(tmp_path, frames):
    with running_server(tmp_path) as (url, _):
        address = url.removeprefix("http://")
        with ws_client.connect(f"ws://{address}/api/stream") as ws:
            ws.send(json.dumps({"prompt": "a blue square", "steps": 10, "strength": 0.4, "cfg": "self"}))
            ready = json.loads(ws.recv())
            assert ready["type"] == "ready" and ready["delay"] == 3
            for i in range(5):
                ws.send(png(frames[i % 2 : i % 2 + 1]))
                meta = json.loads(ws.recv())
                out = Image.open(io.BytesIO(ws.recv()))
                assert meta["type"] == "frame" and meta["index"] == i and out.size == (64, 64)
            ws.send(b"not an image")
            assert "not an image" in json.loads(ws.recv())["error"]
            ws.send(png(torch.zeros(1, 3, 32, 32)))
            assert "32x32" in json.loads(ws.recv())["error"]
            ws.send("a text frame")  # one line; the socket stays open
            assert "a frame is a binary message" in json.loads(ws.recv())["error"]
            ws.send(png(frames[0:1]))
            assert json.loads(ws.recv())["index"] == 5
            ws.recv()
        for settings, needle in (
            ({"prompt": "x", "cfg": "double"}, "unknown cfg 'double'"),
            ("hello", "the first message is JSON text"),
            ([1, 2], "the first message is a JSON object"),
            ({"prompt": "x", "colour": "red"}, "unknown setting 'colour'"),
            ({"prompt": "x", "steps": "ten"}, "steps must be an integer, got 'ten'"),
            ({"steps": 4}, "the settings need a prompt"),
            ({"prompt": 5}, "the settings need a prompt"),
            ({"prompt": "x", "guidance": "x"}, "guidance must be a number"),
        ):
            with ws_client.connect(f"ws://{address}/api/stream") as ws:
                ws.send(settings if isinstance(settings, str) else json.dumps(settings))
                error = json.loads(ws.recv())["error"]
                assert needle in error and "\n" not in error, error
        with ws_client.connect(f"ws://{address}/api/stream") as ws:  # a frame is bounded as a job's image
            ws.send(json.dumps({"prompt": "a blue square", "steps": 10, "strength": 0.4}))
            assert json.loads(ws.recv())["type"] == "ready"
            ws.send(png(torch.zeros(1, 3, 1024, 1032)))
            assert "more than this server's bound of 1048576 pixels" in json.loads(ws.recv())["error"]


def test_the_stream_runs_the_steps_the_families_img2img_runs(model, monkeypatch):
    """A stream over a model whose diffusers img2img keeps the fraction of the steps (SD3, Flux: 4 steps
    at strength 0.6 run 3) runs as many as its img2img, not the SD rule's 2."""
    config = StreamConfig(prompt="a blue square", cfg="none", guidance=1.0, steps=4, strength=0.6, seed=3)
    assert StreamImg2Img(model, config).k == 2  # the SD rule: int(4 x 0.6)
    monkeypatch.setattr(type(model), "strength_keeps_fraction", True)
    assert StreamImg2Img(model, config).k == 3
