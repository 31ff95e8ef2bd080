"""ComfyUI's API: the default text-to-image graph, queued and followed the way ComfyUI's own
``script_examples/websockets_api_example.py`` does it (urllib + a websocket), gives the images velodiff's
own API gives for the mapped solver and grid; /queue, /history, /view, /interrupt answer in ComfyUI's
shapes; unsupported nodes and names are refused with ``node_errors``."""

from __future__ import annotations

import copy
import io
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest
from PIL import Image

from serve_fixtures import httpx, running_server

ws_client = pytest.importorskip("websockets.sync.client")

#: ComfyUI's default workflow in API format (as in its websockets_api_example.py), scaled to the tiny model
GRAPH = {
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "cfg": 2.5,
            "denoise": 1,
            "latent_image": ["5", 0],
            "model": ["4", 0],
            "negative": ["7", 0],
            "positive": ["6", 0],
            "sampler_name": "euler",
            "scheduler": "karras",
            "seed": 5,
            "steps": 6,
        },
    },
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "default.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"batch_size": 1, "height": 64, "width": 64}},
    "6": {
        "class_type": "CLIPTextEncode",
        "inputs": {"clip": ["4", 1], "text": "a red circle above a blue square"},
    },
    "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": ""}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("serve-comfy"), max_batch=1) as s:
        yield s


# --- the example client's functions, as ComfyUI ships them (urllib + websocket) ---------------------


def queue_prompt(server_address, prompt, client_id):
    data = json.dumps({"prompt": prompt, "client_id": client_id}).encode("utf-8")
    req = urllib.request.Request(f"http://{server_address}/prompt", data=data)
    return json.loads(urllib.request.urlopen(req).read())


def get_image(server_address, filename, subfolder, folder_type):
    url_values = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": folder_type})
    with urllib.request.urlopen(f"http://{server_address}/view?{url_values}") as response:
        return response.read()


def get_history(server_address, prompt_id):
    with urllib.request.urlopen(f"http://{server_address}/history/{prompt_id}") as response:
        return json.loads(response.read())


def get_images(ws, server_address, prompt, client_id, seen):
    prompt_id = queue_prompt(server_address, prompt, client_id)["prompt_id"]
    output_images = {}
    while True:
        out = ws.recv()
        if isinstance(out, str):
            message = json.loads(out)
            seen.append(message)
            if message["type"] == "executing":
                data = message["data"]
                if data["node"] is None and data["prompt_id"] == prompt_id:
                    break  # execution is done
    history = get_history(server_address, prompt_id)[prompt_id]
    for node_id in history["outputs"]:
        node_output = history["outputs"][node_id]
        images_output = []
        if "images" in node_output:
            for image in node_output["images"]:
                images_output.append(
                    get_image(server_address, image["filename"], image["subfolder"], image["type"])
                )
        output_images[node_id] = images_output
    return prompt_id, output_images


def test_a_socket_sees_its_own_prompts_and_those_queued_for_everyone(server):
    """As ComfyUI sends them: a prompt's messages go to the client that queued it (a socket without
    clientId is another client, with a sid made up), and to every socket when it named no client."""
    url, _ = server
    address = url.removeprefix("http://")
    with ws_client.connect(f"ws://{address}/ws") as anonymous, \
            ws_client.connect(f"ws://{address}/ws?clientId=alice") as alice:
        json.loads(anonymous.recv())  # its status: subscribed before alice's prompt
        mine, _ = get_images(alice, address, GRAPH, "alice", [])
        seen: list[dict] = []
        everyone, _ = get_images(anonymous, address, GRAPH, None, seen)  # ends at this prompt's end
    ids = {m["data"].get("prompt_id") for m in seen if isinstance(m.get("data"), dict)}
    assert everyone in ids and mine not in ids  # alice's execution_start, progress, executed: hers


def test_comfyui_example_client_runs_the_default_graph(server):
    url, _ = server
    address = url.removeprefix("http://")
    client_id = str(uuid.uuid4())
    seen: list[dict] = []
    with ws_client.connect(f"ws://{address}/ws?clientId={client_id}") as ws:
        ws.send(b"\x00binary")  # ComfyUI ignores what clients send; so does velodiff (the socket stays)
        prompt_id, images = get_images(ws, address, GRAPH, client_id, seen)
    with ws_client.connect(f"ws://{address}/ws") as ws:  # no clientId: ComfyUI makes up a sid
        assert len(json.loads(ws.recv())["data"]["sid"]) == 32
    assert list(images) == ["9"] and len(images["9"]) == 1
    im = Image.open(io.BytesIO(images["9"][0]))
    assert im.format == "PNG" and im.size == (64, 64)
    kinds = [m["type"] for m in seen]
    assert kinds[0] == "status" and "execution_start" in kinds and "executed" in kinds
    progress = [m["data"]["value"] for m in seen if m["type"] == "progress"]
    assert progress == list(range(1, 7)) and all(
        m["data"]["max"] == 6 for m in seen if m["type"] == "progress"
    )
    executed = next(m for m in seen if m["type"] == "executed")
    assert executed["data"]["node"] == "9" and executed["data"]["prompt_id"] == prompt_id
    # the graph is velodiff's euler solver on its karras grid, from ComfyUI's starting noise (one CPU
    # generator for the batch: noise torch): the jobs API gives the same pixels and parameters (the comfy
    # PNG holds its graph too)
    r = httpx.post(
        f"{url}/api/jobs",
        json={
            "prompt": "a red circle above a blue square",
            "seed": 5,
            "steps": 6,
            "solver": "euler",
            "grid": "karras",
            "guidance": 2.5,
            "noise": "torch",
        },
    )
    job = httpx.get(f"{url}/api/jobs/{r.json()['id']}/result", timeout=60).json()
    pngs = (httpx.get(f"{url}{job['images'][0]}").content, images["9"][0])
    own, comfy = (Image.open(io.BytesIO(b)) for b in pngs)
    assert own.tobytes() == comfy.tobytes() and own.info["parameters"] == comfy.info["parameters"]


def test_queue_history_and_interrupt(server):
    url, _ = server
    g = copy.deepcopy(GRAPH)
    g["3"]["inputs"].update(steps=200, sampler_name="heun")
    first = httpx.post(f"{url}/prompt", json={"prompt": g, "client_id": "c1"}).json()
    other = httpx.post(f"{url}/api/jobs", json={"prompt": "not a ComfyUI prompt", "steps": 2}).json()
    second = httpx.post(f"{url}/prompt", json={"prompt": g, "client_id": "c1"}).json()
    assert first["node_errors"] == {} and second["number"] == first["number"] + 2  # the jobs API's between
    deadline = time.monotonic() + 30
    while not (q := httpx.get(f"{url}/queue").json())["queue_running"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert (
        q["queue_running"][0][1] == first["prompt_id"]
        and q["queue_running"][0][2]["3"]["class_type"] == "KSampler"
    )
    assert [item[1] for item in q["queue_pending"]] == [second["prompt_id"]]  # ComfyUI's prompts only
    assert httpx.get(f"{url}/prompt").json()["exec_info"]["queue_remaining"] == 3
    assert httpx.get(f"{url}/history/{first['prompt_id']}").json() == {}  # not finished yet
    for bad in (None, "x", {"delete": "abc"}):  # a 500 and a traceback in the log, or silently nothing
        r = httpx.post(f"{url}/queue", json=bad)
        assert r.status_code == 400 and '{"clear": true}' in r.json()["error"]["message"], r.text
    httpx.post(f"{url}/queue", json={"delete": [second["prompt_id"]]})
    httpx.post(f"{url}/interrupt", json={})
    deadline = time.monotonic() + 30
    while not (h := httpx.get(f"{url}/history/{first['prompt_id']}").json()):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    status = h[first["prompt_id"]]["status"]
    assert status["completed"] is False and status["status_str"] == "error"
    assert status["messages"][-1][0] == "execution_interrupted"
    httpx.post(f"{url}/queue", json={"clear": True})  # the jobs API's job is not ComfyUI's to clear
    job = httpx.get(f"{url}/api/jobs/{other['id']}/result", timeout=60).json()
    assert job["state"] == "done"
    assert httpx.get(f"{url}/history/{other['id']}").json() == {}
    assert httpx.get(f"{url}/queue").json() == {"queue_running": [], "queue_pending": []}


def refused(url: str, graph: dict) -> dict:
    req = urllib.request.Request(f"{url}/prompt", data=json.dumps({"prompt": graph}).encode())
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400
    return json.loads(e.value.read())


def test_unsupported_node_is_refused_with_node_errors(server):
    url, _ = server
    g = copy.deepcopy(GRAPH)
    g["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": "x"}}
    body = refused(url, g)
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    err = body["node_errors"]["10"]
    assert err["class_type"] == "LoraLoader" and err["errors"][0]["type"] == "node_not_supported"
    assert err["dependent_outputs"] == ["9"]
    assert httpx.get(f"{url}/api/health").json()["ok"]


def test_the_api_prefix_and_object_info_as_comfyui_serves_them(server):
    """ComfyUI serves its routes under /api/ too (its current frontend uses them); /object_info lists
    every KSampler name /prompt accepts."""
    from velodiff.serve.comfy_api import comfy_names

    url, _ = server
    info = httpx.get(f"{url}/api/object_info").json()
    assert info == httpx.get(f"{url}/object_info").json()
    assert info["KSampler"]["input"]["required"]["sampler_name"][0] == comfy_names("sampler")
    assert {"dpmpp_sde", "lcm", "uni_pc"} <= set(comfy_names("sampler"))
    ck = info["CheckpointLoaderSimple"]  # the fields ComfyUI's frontend and clients read
    assert ck["output"] == ["MODEL", "CLIP", "VAE"] and ck["input_order"] == {"required": ["ckpt_name"]}
    assert httpx.get(f"{url}/object_info/KSampler").json() == {"KSampler": info["KSampler"]}
    assert httpx.get(f"{url}/object_info/LoraLoader").json() == {}
    assert httpx.get(f"{url}/api/queue").json() == httpx.get(f"{url}/queue").json()
    r = httpx.post(f"{url}/api/prompt", json={"prompt": {}})
    assert r.status_code == 400 and r.json()["error"]["type"]  # ComfyUI's error shape under /api/ too


def test_nodes_velodiff_cannot_read_are_named(server):
    """A PreviewImage output (a common output node) and inputs that are not an object are refused with
    the node named in node_errors, not as 'no outputs' or a 500."""
    url, _ = server
    g = copy.deepcopy(GRAPH)
    g["9"]["class_type"] = "PreviewImage"
    err = refused(url, g)["node_errors"]["9"]
    assert err["class_type"] == "PreviewImage" and err["errors"][0]["type"] == "node_not_supported"
    g = copy.deepcopy(GRAPH)
    g["8"]["inputs"] = [1, 2]
    err = refused(url, g)["node_errors"]["8"]["errors"][0]
    assert err["message"] == "A node's inputs must be an object"
    g = copy.deepcopy(GRAPH)
    g["3"]["inputs"]["scheduler"] = "linear_quadratic"  # ComfyUI's name, for flow models only
    err = refused(url, g)["node_errors"]["3"]["errors"][0]
    assert "rectified flows" in err["message"]


@pytest.mark.parametrize(
    ("node", "inputs", "kind", "needle"),
    [
        ("3", {"sampler_name": "res_multistep"}, "value_not_in_list", "sampler_name"),
        ("3", {"scheduler": "gits"}, "value_not_in_list", "scheduler"),
        ("3", {"denoise": 0.5}, "value_not_supported", "denoise"),
        ("4", {"ckpt_name": "sdxl.safetensors"}, "value_not_in_list", "ckpt_name"),
        ("3", {"steps": "many"}, "invalid_input_type", "steps"),
    ],
)
def test_values_velodiff_cannot_honour_are_node_errors(server, node, inputs, kind, needle):
    url, _ = server
    g = copy.deepcopy(GRAPH)
    g[node]["inputs"].update(inputs)
    err = refused(url, g)["node_errors"][node]["errors"][0]
    assert err["type"] == kind and needle in err["details"]


def test_a_size_the_model_refuses_is_a_node_error_too(server):
    url, _ = server
    g = copy.deepcopy(GRAPH)
    g["5"]["inputs"]["width"] = 66
    body = refused(url, g)
    assert "not a positive multiple of 4" in body["node_errors"]["3"]["errors"][0]["message"]


def test_a_served_file_is_found_by_the_name_object_info_lists_and_by_its_file_name():
    from velodiff.serve.comfy_api import ComfyRefusal, read_graph

    models = ["/models/my-sd15.safetensors", "default"]
    for name in ("/models/my-sd15.safetensors", "my-sd15.safetensors"):
        g = copy.deepcopy(GRAPH)
        g["4"]["inputs"]["ckpt_name"] = name
        assert read_graph(g, models)[0].model == "/models/my-sd15.safetensors", name
    assert read_graph(GRAPH, models)[0].model == "default"  # "default.safetensors", as ComfyUI writes it
    g = copy.deepcopy(GRAPH)
    g["4"]["inputs"]["ckpt_name"] = "other.safetensors"
    with pytest.raises(ComfyRefusal):
        read_graph(g, models)


def test_the_graphs_values_become_the_request():
    """The default workflow's KSampler, CLIPTextEncode and EmptyLatentImage values are what the job
    runs: prompt and negative, width x height as given (not swapped), batch, seed, steps, cfg, and the
    sampler / scheduler names resolved; a denoise other than 1 (below or above) is refused."""
    from velodiff.serve.comfy_api import ComfyRefusal, comfy_sampling, read_graph

    g = copy.deepcopy(GRAPH)
    g["7"]["inputs"]["text"] = "a green triangle"
    g["5"]["inputs"].update(width=96, height=64, batch_size=2)
    g["3"]["inputs"].update(cfg=4.5, seed=11, steps=7, sampler_name="dpmpp_2m", scheduler="exponential")
    req = read_graph(g, ["default"])[0]
    solver, options, grid = comfy_sampling("dpmpp_2m", "exponential")
    assert (req.prompt, req.negative) == ("a red circle above a blue square", "a green triangle")
    assert (req.width, req.height, req.n, req.seed, req.steps, req.guidance) == (96, 64, 2, 11, 7, 4.5)
    assert (req.solver, req.grid, req.solver_options) == (solver, grid, options or None)
    for denoise in (0.5, 1.5):
        g["3"]["inputs"]["denoise"] = denoise
        with pytest.raises(ComfyRefusal):
            read_graph(g, ["default"])


def test_a_seed_takes_comfyuis_whole_64_bit_range(server):
    """ComfyUI's KSampler seed is any unsigned 64-bit int (API scripts draw random.randint(0, 2**64 - 1));
    the last seed of the batch must stay in it."""
    url, _ = server
    g = copy.deepcopy(GRAPH)
    g["3"]["inputs"].update(seed=2**64 - 1, steps=1)
    prompt_id = queue_prompt(url.removeprefix("http://"), g, str(uuid.uuid4()))["prompt_id"]
    deadline = time.monotonic() + 60
    while prompt_id not in (history := get_history(url.removeprefix("http://"), prompt_id)):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert history[prompt_id]["status"]["status_str"] == "success"
    g["5"]["inputs"]["batch_size"] = 2  # its second image would take seed 2**64
    assert "2**64" in json.dumps(refused(url, g)["node_errors"])


def test_every_comfy_name_resolves_to_a_velodiff_solver_and_grid():
    """Every ComfyUI sampler and scheduler name the alias table knows is accepted and runs through the
    pipelines' own resolution; one it does not know is refused with ComfyUI's list."""
    from velodiff.aliases import COMFY, KD_COMFY, SAMPLER, SCHEDULER, resolve_grid, resolve_solver, table
    from velodiff.grids import GRIDS
    from velodiff.serve.comfy_api import comfy_sampling
    from velodiff.solvers import get_solver

    samplers = [a.name for a in table(SAMPLER) if a.source in (COMFY, KD_COMFY)]
    schedulers = [a.name for a in table(SCHEDULER) if a.source in (COMFY, KD_COMFY)]
    schedulers.remove("gits")  # refused below
    assert {"dpmpp_2m_sde", "uni_pc", "euler_ancestral"} <= set(samplers) and "karras" in schedulers
    for s in samplers:
        solver, options, _ = comfy_sampling(s, "karras")
        get_solver(resolve_solver(solver).solver)
    for sched in schedulers:
        _, _, grid = comfy_sampling("euler", sched)
        assert resolve_grid(grid).grid in GRIDS
    # ComfyUI's row, not velodiff's own solver of the same name: its deis is the 'tab' DEIS-3
    assert comfy_sampling("deis", "karras")[:2] == ("deis_3", {"interp": "vp_t", "lower_order_final": False})
    with pytest.raises(KeyError):
        comfy_sampling("res_multistep", "normal")
    with pytest.raises(KeyError):
        comfy_sampling("euler", "gits")  # a calibrated grid in velodiff, not a fixed ComfyUI table


def test_a_comfy_png_holds_its_graph_as_comfyuis_saveimage_writes_it(server):
    """The image of a ComfyUI job carries the graph (``prompt``) and the UI's ``extra_pnginfo`` entries as
    JSON text chunks, as ComfyUI's SaveImage writes them (dropped on ComfyUI, it loads the graph), and
    A1111's ``parameters`` beside them."""
    from velodiff.infotext import image_infotext, parse_infotext

    url, _ = server
    address = url.removeprefix("http://")
    g = copy.deepcopy(GRAPH)
    g["3"]["inputs"].update(seed=77, steps=1)
    workflow = {"last_node_id": 9, "nodes": [{"id": 3, "type": "KSampler"}]}
    body = {"prompt": g, "client_id": "c1", "extra_data": {"extra_pnginfo": {"workflow": workflow}}}
    req = urllib.request.Request(f"{url}/prompt", data=json.dumps(body).encode())
    prompt_id = json.loads(urllib.request.urlopen(req).read())["prompt_id"]
    deadline = time.monotonic() + 60
    while prompt_id not in (history := get_history(address, prompt_id)):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    image = history[prompt_id]["outputs"]["9"]["images"][0]
    png = Image.open(io.BytesIO(get_image(address, image["filename"], image["subfolder"], image["type"])))
    assert json.loads(png.info["prompt"]) == g and json.loads(png.info["workflow"]) == workflow
    said = parse_infotext(image_infotext(png))
    assert (said["Prompt"], said["Seed"]) == ("a red circle above a blue square", "77")
