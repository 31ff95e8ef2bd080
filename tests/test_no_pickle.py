"""Pickle never loads, anywhere: live pickle payloads (unpickling them creates a marker file) placed
wherever a loader could find one are refused in one line by the CLI and the API, and the marker never
appears; every weight-reading call in ``src/`` goes through ``velodiff.models.weights``."""

from __future__ import annotations

import ast
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save_file

import velodiff
from velodiff.errors import VelodiffError

SRC = Path(__file__).resolve().parents[1] / "src" / "velodiff"
CHOKE_POINT = SRC / "models" / "weights.py"


@pytest.fixture(autouse=True)
def unpickling_is_watched(monkeypatch, request):
    """Every test here fails if anything calls torch.load / pickle.load(s), even one that would refuse the
    payload (torch's weights_only=True default does since 2.6; velodiff must not rely on it)."""
    calls: list[str] = []
    if request.node.name == "test_the_payloads_are_live":  # it unpickles on purpose
        yield
        return

    def watch(name):
        def called(*args, **kwargs):
            calls.append(f"{name}{args[:1]}")
            raise pickle.UnpicklingError(f"test: {name} was called")
        return called

    for mod, name in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(mod, name, watch(f"{mod.__name__}.{name}"))
    yield
    assert calls == [], calls


class Payload:
    """Unpickling this object opens (creates) ``marker`` for writing: proof that a pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def poisoned(state: dict[str, torch.Tensor], marker: Path) -> dict:
    return {**state, "__payload__": Payload(marker)}


def write_torch_pickle(path: Path, marker: Path, state: dict | None = None) -> Path:
    torch.save(poisoned(state or {"w": torch.zeros(2)}, marker), path)
    return path


def write_plain_pickle(path: Path, marker: Path, protocol: int) -> Path:
    path.write_bytes(pickle.dumps(poisoned({"w": torch.zeros(2)}, marker), protocol=protocol))
    return path


WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from velodiff.models.tiny import save_tiny

    return save_tiny("sd15", tmp_path_factory.mktemp("tiny") / "sd15")


def pickled_folder(tiny: Path, dst: Path, marker: Path, components=tuple(WEIGHTS),
                   keep_safetensors=False) -> Path:
    """A copy of the tiny SD1 folder whose ``components`` hold their state dict (plus the payload) as a
    torch.save pickle ``.bin``; the ``.safetensors`` are removed unless ``keep_safetensors``."""
    shutil.copytree(tiny, dst)
    for comp in components:
        st = dst / comp / f"{WEIGHTS[comp]}.safetensors"
        write_torch_pickle(st.with_suffix(".bin"), marker, read_state(st))
        if not keep_safetensors:
            st.unlink()
    return dst


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, in memory (not mapped: the tests overwrite such files)."""
    return load(path.read_bytes())


def generate(model: Path, out: Path) -> int:
    return cli("generate", "a red cube", "--model", str(model), "--steps", "1", "--out", str(out))


def cli(*args: str) -> int:
    from velodiff.cli import main

    try:
        return main(list(args))
    except SystemExit as e:
        return int(e.code or 0)


def assert_refused_everywhere(model: Path, marker: Path, capsys, tmp_path: Path,
                              words: str = "pickle") -> None:
    """``velodiff generate --model`` exits 2 with one line naming the problem; ``velodiff.load`` raises a
    one-line VelodiffError; nothing was unpickled."""
    capsys.readouterr()
    rc = generate(model, tmp_path / "x.png")
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and words in err, err
    with pytest.raises(VelodiffError) as e:
        velodiff.load(model)
    assert len(str(e.value).splitlines()) == 1 and words in str(e.value), str(e.value)
    assert not marker.exists()
    assert not (tmp_path / "x.png").exists()


def test_the_payloads_are_live(tmp_path):
    """The fixtures are real: unpickling them (as torch.load(weights_only=False) / pickle.load would)
    creates the marker, so a marker that never appears below means nothing was unpickled."""
    marker = tmp_path / "marker"
    torch.load(write_torch_pickle(tmp_path / "a.bin", marker), weights_only=False)
    assert marker.exists()
    marker.unlink()
    for protocol in range(6):
        pickle.loads(write_plain_pickle(tmp_path / "b.pkl", marker, protocol).read_bytes())
        assert marker.exists()
        marker.unlink()


@pytest.mark.parametrize("components", [tuple(WEIGHTS), ("unet",), ("text_encoder",), ("vae",)])
def test_a_folder_of_bin_weights_is_refused(tiny, tmp_path, capsys, components):
    marker = tmp_path / "marker"
    model = pickled_folder(tiny, tmp_path / "m", marker, components)
    assert_refused_everywhere(model, marker, capsys, tmp_path, words="only as pickles")


def test_a_folder_with_bin_and_safetensors_loads_the_safetensors(tiny, tmp_path, capsys):
    """As diffusers with use_safetensors=True: the .bin beside each .safetensors is ignored, never read."""
    marker = tmp_path / "marker"
    model = pickled_folder(tiny, tmp_path / "m", marker, keep_safetensors=True)
    m = velodiff.load(model)
    ref = read_state(model / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, ref[k]) for k, v in m.components["unet"].state_dict().items())
    rc = generate(model, tmp_path / "x.png")
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "x.png").is_file() and not marker.exists()


def test_a_pickle_beside_only_a_variants_safetensors_is_refused(tiny, tmp_path, capsys):
    """A folder passes the choke point's folder check when any .safetensors is there, here only the fp16
    variant's; the plain weights exist only as a pickle .bin. What keeps diffusers from falling back
    to that pickle is ``use_safetensors=True`` at the one from_pretrained call (with None it would)."""
    marker = tmp_path / "marker"
    model = tmp_path / "m"
    shutil.copytree(tiny, model)
    st = model / "unet" / "diffusion_pytorch_model.safetensors"
    write_torch_pickle(st.with_suffix(".bin"), marker, read_state(st))
    st.rename(st.with_name("diffusion_pytorch_model.fp16.safetensors"))
    assert_refused_everywhere(model, marker, capsys, tmp_path, words="diffusion_pytorch_model.safetensors")


def test_a_pickle_renamed_safetensors_inside_a_folder_is_refused(tiny, tmp_path, capsys):
    marker = tmp_path / "marker"
    model = tmp_path / "m"
    shutil.copytree(tiny, model)
    st = model / "unet" / "diffusion_pytorch_model.safetensors"
    write_torch_pickle(st, marker, read_state(st))
    assert_refused_everywhere(model, marker, capsys, tmp_path, words="holds pickle bytes")


def test_a_pickle_in_the_config_folder_of_a_single_file_is_refused(tiny, tmp_path, capsys):
    """A single file without a text encoder takes it from --config's folder (diffusers' from_single_file
    reads it there with its own from_pretrained): a pickle there is refused like any other."""
    from ldm_layout import save_sd1_single_file

    marker = tmp_path / "marker"
    full = read_state(save_sd1_single_file(tiny, tmp_path / "full.safetensors"))
    model = tmp_path / "model.safetensors"
    save_file({k: v for k, v in full.items() if not k.startswith("cond_stage_model.")}, str(model))
    cfg = pickled_folder(tiny, tmp_path / "cfg", marker, components=("text_encoder",))
    capsys.readouterr()
    rc = cli("generate", "a red cube", "--model", str(model), "--config", str(cfg), "--family", "sd1",
             "--steps", "1", "--out", str(tmp_path / "x.png"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "only as pickles" in err, err
    with pytest.raises(VelodiffError, match="only as pickles"):
        velodiff.load(model, config=cfg, family="sd1")
    assert not marker.exists() and not (tmp_path / "x.png").exists()


def test_a_transformer_model_of_pickles_is_refused(tmp_path, capsys):
    """The DiT families read their transformer and text encoders through the same door."""
    from velodiff.models.tiny import save_tiny

    marker = tmp_path / "marker"
    folder = save_tiny("pixart-sigma", tmp_path / "pixart")
    for comp in ("transformer", "text_encoder"):
        for st in sorted((folder / comp).glob("*.safetensors")):
            write_torch_pickle(st.with_suffix(".bin"), marker, read_state(st))
            st.unlink()
        capsys.readouterr()
        with pytest.raises(VelodiffError, match="only as pickles"):
            velodiff.load(folder)
        shutil.rmtree(folder)
        folder = save_tiny("pixart-sigma", tmp_path / "pixart")
    assert not marker.exists()


@pytest.mark.parametrize("shape", ["diffusers .bin", "kohya .pt", "peft folder .bin", "renamed pickle"])
def test_a_lora_that_is_a_pickle_is_refused(tiny, tmp_path, capsys, shape):
    """A LoRA is weights too: diffusers' pytorch_lora_weights.bin, a kohya .pt, a peft folder whose
    adapter_model is a .bin, and pickle bytes named adapter_model.safetensors are each refused in one line
    by the CLI and the API, and nothing is unpickled."""
    marker = tmp_path / "marker"
    state = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 8)}
    if shape == "diffusers .bin":
        lora = write_torch_pickle(tmp_path / "pytorch_lora_weights.bin", marker, state)
    elif shape == "kohya .pt":
        lora = write_torch_pickle(tmp_path / "lora.pt", marker, state)
    else:
        lora = tmp_path / "adapter"
        lora.mkdir()
        (lora / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 4, "target_modules": ["proj_in"]}')
        name = "adapter_model.bin" if shape == "peft folder .bin" else "adapter_model.safetensors"
        write_torch_pickle(lora / name, marker, state)
    capsys.readouterr()
    rc = cli("generate", "a red cube", "--model", str(tiny), "--lora", str(lora), "--steps", "1",
             "--out", str(tmp_path / "x.png"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    with pytest.raises(VelodiffError) as e:
        velodiff.load(tiny, lora=[lora])
    assert len(str(e.value).splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".pkl"])
def test_single_file_pickles_are_refused(tmp_path, capsys, suffix):
    marker = tmp_path / "marker"
    f = write_torch_pickle(tmp_path / f"model{suffix}", marker)
    assert_refused_everywhere(f, marker, capsys, tmp_path)


@pytest.mark.parametrize("kind", ["torch.save", "protocol-2", "protocol-4", "protocol-5"])
def test_a_pickle_named_safetensors_is_refused(tmp_path, capsys, kind):
    marker = tmp_path / "marker"
    f = tmp_path / "model.safetensors"
    if kind == "torch.save":
        write_torch_pickle(f, marker)
    else:
        write_plain_pickle(f, marker, int(kind.split("-")[1]))
    assert_refused_everywhere(f, marker, capsys, tmp_path, words="holds pickle bytes")


@pytest.mark.parametrize("protocol", [0, 1])
def test_an_old_protocol_pickle_named_safetensors_is_refused(tmp_path, capsys, protocol):
    """Protocols 0 and 1 have no magic bytes; such a file has no safetensors header, so it is refused too."""
    marker = tmp_path / "marker"
    f = write_plain_pickle(tmp_path / "model.safetensors", marker, protocol)
    assert_refused_everywhere(f, marker, capsys, tmp_path, words="not a safetensors file")


# --- the trainer: --vae, --init and resume ------------------------------------------------------------


def fake_run(run: Path, tensors: dict[str, torch.Tensor] | None, marker: Path, **meta) -> Path:
    """A run folder with one checkpoint: ``tensors`` as safetensors, or (None) a poisoned pickle."""
    ck = run / "step-0000001"
    ck.mkdir(parents=True)
    if tensors is None:
        write_torch_pickle(ck / "state.safetensors", marker)
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(ck / "state.safetensors"))
    (ck / "state.json").write_text(json.dumps(meta))
    (run / "latest").write_text(ck.name)
    return run


@pytest.fixture
def vae_run(tmp_path) -> Path:
    """A finished micro autoencoder run, written directly (its random weights, no training)."""
    from diffusers import AutoencoderKL

    from velodiff.default_model import vae_config

    vae = AutoencoderKL(**vae_config("micro"))
    tensors = {f"ema.vae.{k}": v for k, v in vae.state_dict().items()}
    run = fake_run(tmp_path / "vae", tensors, tmp_path / "unused", config={"extra": {"stage": "autoencoder"}})
    (run / "summary.json").write_text(json.dumps({"scaling_factor": 1.0}))
    return run


def train_ldm(tmp_path: Path, vae: Path, *extra: str) -> int:
    return cli("train", "ldm", "--vae", str(vae), "--run", str(tmp_path / "run"), "--steps", "2",
               "--batch", "2", "--size", "micro", "--cache-size", "2", "--threads", "1", "--device", "cpu",
               "--quiet", *extra)


def test_train_init_from_a_pickled_folder_is_refused(tiny, tmp_path, capsys, vae_run):
    marker = tmp_path / "marker"
    model = pickled_folder(tiny, tmp_path / "m", marker)
    capsys.readouterr()
    assert train_ldm(tmp_path, vae_run, "--init", str(model)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--init" in err and "only as pickles" in err, err
    assert not marker.exists()


def test_train_resume_from_a_pickled_checkpoint_is_refused(tmp_path, capsys, vae_run):
    marker = tmp_path / "marker"
    fake_run(tmp_path / "run", None, marker)
    capsys.readouterr()
    assert train_ldm(tmp_path, vae_run) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot read checkpoint" in err and "pickle" in err, err
    assert not marker.exists()


@pytest.mark.parametrize("command", ["ldm --vae", "autoencoder --init"])
def test_train_from_a_pickled_autoencoder_run_is_refused(tmp_path, capsys, command):
    marker = tmp_path / "marker"
    vae = fake_run(tmp_path / "vae", None, marker)
    (vae / "summary.json").write_text(json.dumps({"scaling_factor": 1.0}))
    capsys.readouterr()
    if command == "ldm --vae":
        assert train_ldm(tmp_path, vae) == 2
    else:
        assert cli("train", "autoencoder", "--init", str(vae), "--run", str(tmp_path / "run"), "--steps", "1",
                   "--batch", "1", "--size", "micro", "--threads", "1", "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pickle" in err, err
    assert not marker.exists()


# --- metrics: FD-shapes encoder, CLIP score, Inception ---------------------------------------------------


def test_metric_weights_that_are_pickles_are_refused(tmp_path):
    from velodiff.eval.features import encoder_info, load_encoder
    from velodiff.eval.metrics import ClipScore, InceptionTorchScript

    marker = tmp_path / "marker"
    enc = write_torch_pickle(tmp_path / "encoder.safetensors", marker)
    for fn in (load_encoder, encoder_info):
        with pytest.raises(VelodiffError, match="holds pickle bytes"):
            fn(enc)
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text("{}")
    write_torch_pickle(clip / "pytorch_model.bin", marker)
    with pytest.raises(VelodiffError, match="only as pickles"):
        ClipScore(clip)
    for f in (write_torch_pickle(tmp_path / "inception.pt", marker),
              write_plain_pickle(tmp_path / "inception2.pt", marker, 4)):
        with pytest.raises(VelodiffError, match="never loads"):
            InceptionTorchScript(f)
    assert not marker.exists()


# --- no weight-reading call outside the choke point ---------------------------------------------------

#: attribute calls that read weights (``X.from_pretrained(...)``, ``torch.load(...)``, ...)
READERS = {"from_pretrained", "from_single_file", "load_file", "safe_open", "load_torchscript",
           # diffusers' / peft's / torch.hub's loaders that take a file or a hub name (and unpickle a .bin)
           "load_lora_weights", "load_attn_procs", "load_textual_inversion", "load_ip_adapter",
           "load_adapter", "load_peft_weights", "load_state_dict_from_url", "load_url"}
#: loaders that read a file when given a path or name, a state dict already read when given one
PATH_OR_DICT = {"lora_state_dict"}
LOADS = {"load", "loads"}
#: modules whose load / loads unpickle (or may: numpy's allow_pickle, torch.serialization's)
UNPICKLING_MODULES = {"torch", "jit", "serialization", "pickle", "dill", "joblib", "cloudpickle", "marshal",
                      "safetensors", "np", "numpy", "shelve", "hub"}
#: library functions that read a checkpoint file (diffusers' / transformers' load_state_dict takes a path
#: and unpickles a .bin; a module's own ``.load_state_dict(dict)`` method is not this)
FILE_READERS = {"load_state_dict", "load_checkpoint", "load_sharded_checkpoint", "load_model_dict_into_meta"}


def weight_reads(source: str, filename: str = "<src>") -> list[str]:
    """Where ``source`` reads weights other than through velodiff.models.weights: ``X.from_pretrained(``
    and friends, ``torch.load(`` / ``pickle.load(`` / ``torch.jit.load(``, a bare ``load_file(`` /
    ``safe_open(`` / ``from_pretrained(`` not imported from the choke point, ``import pickle``."""
    tree = ast.parse(source, filename)
    from_choke: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            for a in node.names:
                if mod.endswith("weights") and mod.split(".")[-2:-1] in (["models"], []):
                    from_choke.add(a.asname or a.name)
                elif (mod.startswith(("safetensors", "torch", "pickle", "numpy"))
                      and a.name in READERS | LOADS):
                    found.append(f"{filename}:{node.lineno}: from {mod} import {a.name}")
                elif mod.startswith(("diffusers", "transformers", "accelerate")) and a.name in FILE_READERS:
                    found.append(f"{filename}:{node.lineno}: from {mod} import {a.name}")
        elif isinstance(node, ast.Import):
            found += [f"{filename}:{node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle")]
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute):
            base = f.value.attr if isinstance(f.value, ast.Attribute) else getattr(f.value, "id", "")
            if f.attr in READERS or (f.attr in LOADS and base in UNPICKLING_MODULES):
                found.append(f"{filename}:{node.lineno}: {base}.{f.attr}(")
            elif f.attr in FILE_READERS and base in ("diffusers", "transformers", "modeling_utils"):
                found.append(f"{filename}:{node.lineno}: {base}.{f.attr}(")
            elif f.attr in PATH_OR_DICT and node.args and not isinstance(node.args[0], (ast.Name, ast.Dict)):
                found.append(f"{filename}:{node.lineno}: {base}.{f.attr}({ast.unparse(node.args[0])}")
        elif isinstance(f, ast.Name) and f.id in READERS and f.id not in from_choke:
            found.append(f"{filename}:{node.lineno}: {f.id}(")
        # weights=False skips the folder check: for tokenizers (JSON / vocab files) only
        if isinstance(f, ast.Name) and f.id == "from_pretrained" and node.args:
            cls = ast.unparse(node.args[0])
            skips = any(k.arg == "weights" and not (isinstance(k.value, ast.Constant) and k.value.value)
                        for k in node.keywords)
            if skips and "Tokenizer" not in cls:
                found.append(f"{filename}:{node.lineno}: from_pretrained({cls}, ..., weights=False)")
    return found


def test_the_scan_sees_each_way_of_reading_weights():
    bad = [
        "from diffusers import UNet2DConditionModel\nUNet2DConditionModel.from_pretrained('x')",
        "import torch\ntorch.load('x.ckpt')",
        "import torch\ntorch.jit.load('x.pt')",
        "import pickle",
        "from safetensors.torch import load_file\nload_file('x')",
        "from safetensors import safe_open\nwith safe_open('x', 'pt') as f: pass",
        "from torch import load",
        "def f(cls):\n    return cls.from_single_file('x')",
        "import torch\ntorch.serialization.load('x.bin')",
        "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
        "from diffusers.models.model_loading_utils import load_state_dict\nload_state_dict('x.bin')",
        "from ..models.weights import from_pretrained\nfrom_pretrained(CLIPTextModel, 'x', weights=False)",
        "def f(pipe):\n    pipe.load_lora_weights('lora.bin')",
        "def f(unet):\n    unet.load_attn_procs('x')",
        "from peft.utils import load_peft_weights\nload_peft_weights('x')",
        "def f(m):\n    m.load_adapter('x', adapter_name='a')",
        "import torch\ntorch.hub.load_state_dict_from_url('https://x/y.pth')",
        "import torch\ntorch.hub.load('repo', 'model')",
        "def f(loader):\n    loader.lora_state_dict(Path('x.safetensors'))",
        "def f(loader):\n    loader.lora_state_dict('name/on/the/hub')",
    ]
    for src in bad:
        assert weight_reads(src), src
    good = "from ..models.weights import from_pretrained, load_file\nload_file('x')\nfrom_pretrained(A, 'x')"
    assert weight_reads(good) == []
    ok = ["unet.load_state_dict(state)", "from_pretrained(CLIPTokenizer, 'x', weights=False)",
          "loader.lora_state_dict(state)"]
    assert [weight_reads(f"from ..models.weights import from_pretrained\n{c}") for c in ok] == [[], [], []]


def test_weights_are_read_only_through_the_choke_point():
    """A new ``from_pretrained(`` / ``torch.load(`` / ``load_file(`` / ``safe_open(`` call site anywhere in
    src/ fails here: route it through velodiff.models.weights, which refuses pickles."""
    files = sorted(p for p in SRC.rglob("*.py") if p != CHOKE_POINT)
    assert len(files) > 50
    found = [hit for p in files for hit in weight_reads(p.read_text(), str(p.relative_to(SRC)))]
    assert found == [], "\n".join(found)
    # the choke point itself never unpickles (torch.jit.load, for the TorchScript Inception only, is its one
    # reader that is not safetensors; it uses torch's restricted unpickler, see load_torchscript)
    calls = weight_reads(CHOKE_POINT.read_text())
    assert not [c for c in calls if "torch.load" in c or "pickle" in c or "dill" in c], calls
