"""The official ``openai`` client, unchanged, against ``velodiff serve``'s /v1/images/generations."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from serve_fixtures import httpx, running_server

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("serve-openai")) as s:
        yield s


def client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)


def test_openai_client_gets_two_decodable_64x64_pngs(server):
    url, _ = server
    r = client(url).images.generate(
        model="default",
        prompt="a red circle above a blue square",
        n=2,
        response_format="b64_json",
        extra_body={"seed": 3, "steps": 6},
    )
    assert len(r.data) == 2
    images = []
    for d in r.data:
        raw = base64.b64decode(d.b64_json)
        assert raw.startswith(b"\x89PNG\r\n\x1a\n")
        im = Image.open(io.BytesIO(raw))
        im.load()
        assert im.format == "PNG" and im.size == (64, 64)
        images.append(im.tobytes())
    assert images[0] != images[1]  # two seeds, two images


def test_velodiffs_extras_reach_the_sampler(server):
    """seed, steps, solver, guidance, negative_prompt and plan in extra_body make the image text2img
    makes with them (to the PNG's rounding); another step count makes another image."""
    import numpy as np
    import torch

    import velodiff
    from velodiff.pipelines import text2img

    url, _ = server
    extras = {"seed": 3, "steps": 6, "solver": "ddim", "guidance": 4.0, "negative_prompt": "a blue square",
              "plan": "ag:threshold=0.99"}

    def served(**override):
        r = client(url).images.generate(model="default", prompt="a red circle", response_format="b64_json",
                                        extra_body={**extras, **override})
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).convert("RGB"))

    got = served()
    torch.set_num_threads(1)
    want = text2img(velodiff.load("default"), "a red circle", seeds=[3], steps=6, solver="ddim", guidance=4.0,
                    negative="a blue square", plan="ag:threshold=0.99", output="tensor").images[0]
    want = (want.permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(got.astype(float) - want).max() <= 1
    assert np.abs(served(steps=3).astype(float) - want).max() > 10


def test_url_response_and_size(server):
    url, _ = server
    r = client(url).images.generate(
        model="default", prompt="a green triangle", size="64x64", extra_body={"steps": 3}
    )
    assert len(r.data) == 1 and r.data[0].url.startswith(url)
    assert isinstance(r.created, int) and r.created > 0  # the response's Unix time, as OpenAI's
    got = httpx.get(r.data[0].url)
    assert got.status_code == 200 and Image.open(io.BytesIO(got.content)).size == (64, 64)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"model": "dall-e-9"}, "unknown model 'dall-e-9'"),
        ({"size": "63x64"}, "not a positive multiple of 4"),
        ({"n": 50}, "n must be between 1 and 8"),
        ({"size": "big"}, "WIDTHxHEIGHT"),
        ({"size": "0x0"}, "not a positive multiple"),
        ({"extra_body": {"plan": "fp8"}}, "needs a cuda device"),  # was a 500, retried twice by the client
    ],
)
def test_openai_errors_reach_the_client_as_bad_requests(server, kw, needle):
    url, _ = server
    with pytest.raises(openai.BadRequestError) as e:
        client(url).images.generate(prompt="x", **{"model": "default", **kw})
    assert needle in e.value.body["message"]
    assert e.value.body["type"] == "invalid_request_error"


def test_a_full_queue_is_a_rate_limit_error():
    """OpenAI clients back off on a 429 whose error type is rate_limit_error."""
    from velodiff.serve.openai_api import error_body

    assert error_body("the queue is full", 429)["error"]["type"] == "rate_limit_error"
    assert error_body("no such job", 404)["error"]["type"] == "not_found_error"
    assert error_body("boom", 500)["error"]["type"] == "server_error"


def test_size_is_width_by_height(server):
    """OpenAI's size is WIDTHxHEIGHT: 32x64 is an image 32 wide and 64 tall."""
    url, _ = server
    r = client(url).images.generate(model="default", prompt="a red circle", size="32x64",
                                    response_format="b64_json", extra_body={"steps": 2, "seed": 1})
    assert Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).size == (32, 64)


def test_a_job_that_fails_is_a_server_error_not_run_again(tmp_path):
    """A job that fails (here: past the server's timeout) answers 500 with OpenAI's server_error, not a
    4xx the client would read as its own mistake, and tells the client (which retries a 500 twice by
    default) not to submit it again: one job ran."""
    with running_server(tmp_path, timeout_s=0.3) as (url, _):
        default_client = openai.OpenAI(base_url=f"{url}/v1", api_key="x")  # max_retries=2
        with pytest.raises(openai.InternalServerError) as e:
            default_client.images.generate(model="default", prompt="slow",
                                           extra_body={"steps": 200, "solver": "heun"})
        assert "timed out after 0.3 s" in e.value.body["message"] and e.value.body["type"] == "server_error"
        assert len(httpx.get(f"{url}/api/jobs").json()) == 1


def test_each_served_png_says_how_it_was_made(server):
    """A served image carries its own parameters (A1111's infotext): the prompt, and its own seed of the
    job's seed, seed + 1, ..."""
    from velodiff.infotext import image_infotext, parse_infotext

    url, _ = server
    r = client(url).images.generate(model="default", prompt="a red circle, small", n=2,
                                    response_format="b64_json", extra_body={"steps": 2, "seed": 11})
    pngs = [io.BytesIO(base64.b64decode(d.b64_json)) for d in r.data]
    got = [parse_infotext(image_infotext(Image.open(png))) for png in pngs]
    assert [g["Seed"] for g in got] == ["11", "12"]
    assert {(g["Prompt"], g["Steps"], g["Model"]) for g in got} == {("a red circle, small", "2", "default")}
