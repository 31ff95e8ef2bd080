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


# --- review21: the similarity filter's state, residual CFG against a frame-by-frame reference, settings


def test_the_filter_skips_again_after_a_processed_frame_and_compares_to_it(model, frames):
    """At most max_skip skips in a row, and the count starts again after a processed frame; the
    similarity is to the last frame processed (a slow drift is processed once it is far enough from it,
    however close each frame is to the one before)."""
    s = StreamImg2Img(model, StreamConfig(prompt="a blue square", similarity=0.98, max_skip=2, steps=4,
                                          strength=0.5))
    same = [s(frames[:1])[1] for _ in range(7)]
    assert same == [False, True, True, False, True, True, False]
    threshold = 0.995
    s = StreamImg2Img(model, StreamConfig(prompt="a blue square", similarity=threshold, max_skip=100,
                                          steps=4, strength=0.5))
    a, b = frames[:1], frames[1:2]
    last, processed = None, 0
    for i in range(41):
        frame = (1 - i / 40) * a + (i / 40) * b  # a slow cross-fade from a to b
        cos = None if last is None else float(torch.nn.functional.cosine_similarity(
            frame.flatten(), last.flatten(), dim=0))
        _, skipped = s(frame)
        if cos is not None and cos <= threshold:  # skip probability 0: always processed
            assert not skipped, (i, cos)
        if not skipped:
            last, processed = frame, processed + 1
    assert processed >= 3


def reference_rcfg(model, prompt, frame, eps, s, guidance):
    """One frame through the stream's k times alone, self-negative residual CFG with the frame's own
    noise ``eps`` as the stock: eps = stock + w (eps_cond - stock), then DDIM one time down."""
    cond = model.encode_prompt([prompt], guided=False)
    z = model.encode(frame)
    x = s.alpha[0] * z + s.sigma[0] * eps
    for i in range(s.k):
        a, sg = s.alpha[i], s.sigma[i]
        x0_c = model.denoiser(x, s.ts[i : i + 1], cond)
        e = (x - a * x0_c) / sg
        e = eps + guidance * (e - eps)
        x0 = (x - sg * e) / a
        if i + 1 < s.k:
            x = s.alpha[i + 1] * x0 + s.sigma[i + 1] * e
    return model.decode(x0).clamp(0, 1)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_self_negative_rcfg_is_each_frames_own_run_with_its_own_stock_noise(model, frames, guidance):
    """cfg="self": every output frame is its input's k steps run alone with residual CFG over the noise
    that entered with it (at guidance 1 that is plain eps_cond, i.e. cfg="none")."""
    config = StreamConfig(prompt="a blue square", cfg="self", guidance=guidance, steps=10, strength=0.4,
                          seed=5)
    s = StreamImg2Img(model, config)
    assert s.k == 4
    inputs = [frames[i % 2 : i % 2 + 1] for i in range(5)]
    with torch.inference_mode():
        outs = [s(f)[0] for f in inputs]
        g = torch.Generator().manual_seed(5)
        z = model.encode(inputs[0])
        eps = [torch.randn(z.shape, generator=g) for _ in range(len(inputs) + s.k - 1)]
        for i, out in enumerate(outs):
            src = i - (s.k - 1)
            frame = inputs[0] if src <= 0 else inputs[src]
            ref = reference_rcfg(model, "a blue square", frame, eps[i], s, guidance)
            assert (ref - out).abs().max() < 1e-4, i
    if guidance == 1.0:
        plain = StreamImg2Img(model, StreamConfig(**{**config.__dict__, "cfg": "none"}))
        assert all((plain(f)[0] - o).abs().max() < 1e-5 for f, o in zip(inputs, outs, strict=True))


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"similarity": 1.0}, "similarity threshold must be in [0, 1)"),
        ({"similarity": -0.1}, "similarity threshold must be in [0, 1)"),
        ({"steps": 10, "strength": 0.05}, "runs no step of 10; raise it"),
        ({"steps": 10, "strength": 1.5}, "strength must be in (0, 1], got 1.5"),  # not 'raise it'
        ({"steps": True}, "steps must be an integer, got True"),
        ({"seed": False}, "seed must be an integer"),
        ({"max_skip": -1}, "max_skip >= 0"),
        ({"seed": 2**64}, "seed in [-2**63, 2**64)"),
        ({"seed": -(2**63) - 1}, "seed in [-2**63, 2**64)"),
        ({"guidance": 101}, "guidance must be in [0, 100]"),
    ],
)
def test_stream_settings_out_of_range_are_one_line(settings, needle):
    with pytest.raises(VelodiffError) as e:
        StreamConfig.of({"prompt": "a blue square", **settings})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_stream_takes_the_seeds_every_other_route_takes():
    """torch's seed range, either sign, as jobs, brushes, the OpenAI route and the CLI (a negative seed was
    refused here alone)."""
    for seed in (-1, -(2**63), 2**64 - 1):
        assert StreamConfig.of({"prompt": "a blue square", "seed": seed}).seed == seed
