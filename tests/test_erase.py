"""Concept erasure in closed form (UCE): the closed form meets both of its constraints exactly where they
are compatible, preserves the kept concepts' keys and values on the shipped model, maps the erased
concept's to the target's, writes a loadable model folder, and refuses bad input in one line."""

from __future__ import annotations

import pytest
import torch

import velodiff
from velodiff.edit.erase import (
    closed_form,
    cross_attention_projections,
    edit_vectors,
    erase_concept,
    save_erased,
)
from velodiff.errors import VelodiffError

PRESERVE = ["circle", "square", "cross"]


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    from velodiff.default_model import default_model_path

    return velodiff.load(default_model_path())


def test_closed_form_is_exact_when_the_constraints_fit():
    g = torch.Generator().manual_seed(0)
    d = 16
    w = torch.randn(24, d, generator=g, dtype=torch.float64)
    c, c_star = (
        torch.randn(3, d, generator=g, dtype=torch.float64),
        torch.randn(3, d, generator=g, dtype=torch.float64),
    )
    keep = torch.randn(9, d, generator=g, dtype=torch.float64)
    q = closed_form(c, c_star, keep, lamb=1e-8)
    w_new = w @ q
    assert torch.allclose(keep @ w_new.T, keep @ w.T, atol=1e-6)  # preserved: W c_j = W_old c_j
    assert torch.allclose(c @ w_new.T, c_star @ w.T, atol=1e-6)  # erased: W c_i = W_old c*_i
    # a direction orthogonal to every constraint keeps its output (the ridge term): nothing else moves
    basis = torch.linalg.qr(torch.cat([c, keep]).T, mode="complete").Q[:, 12:]
    assert torch.allclose(w_new @ basis, w @ basis, atol=1e-5)
    # a large ridge weight leaves W as it was
    assert torch.allclose(w @ closed_form(c, c_star, keep, lamb=1e9), w, atol=1e-6)



def test_closed_form_minimises_the_weighted_objective():
    """UCE (Gandikota et al. 2024, Eq. 5): W_new minimises e sum |W c_i - W_old c*_i|^2 +
    p sum |W c_j - W_old c_j|^2 + lamb |W - W_old|^2; its gradient vanishes there at any weights."""
    g = torch.Generator().manual_seed(1)
    d = 12
    w_old = torch.randn(20, d, generator=g, dtype=torch.float64)
    c, c_star, keep = (torch.randn(n, d, generator=g, dtype=torch.float64) for n in (4, 4, 6))
    e, p, lamb = 3.0, 0.5, 0.1
    w = w_old @ closed_form(c, c_star, keep, erase_scale=e, preserve_scale=p, lamb=lamb)
    grad = (e * (w @ c.T - w_old @ c_star.T) @ c + p * (w @ keep.T - w_old @ keep.T) @ keep
            + lamb * (w - w_old))
    assert grad.abs().max() < 1e-9


def test_erasure_on_the_shipped_model_preserves_and_maps(model):
    before = {k: v.clone() for k, v in model.network.state_dict().items()}
    e = erase_concept(model, "triangle", PRESERVE, target="circle")
    assert all(torch.equal(v, model.network.state_dict()[k]) for k, v in before.items())  # a copy
    assert e.preserve_residual < 0.05 and e.erase_residual < 0.1
    c, c_star, keep = edit_vectors(model, ["triangle"], ["circle"], PRESERVE, ("a {color} {concept}",))
    new = cross_attention_projections(e.unet)
    for name, old in cross_attention_projections(model.network).items():
        w0, w1 = old.weight.double(), new[name].weight.double()
        kept = (keep @ w1.T - keep @ w0.T).norm() / (keep @ w0.T).norm()
        assert kept < 0.05, name
        moved_before = (c @ w0.T - c_star @ w0.T).norm()
        moved_after = (c @ w1.T - c_star @ w0.T).norm()
        assert moved_after < 0.2 * moved_before, name  # triangle's keys / values -> circle's
    names = {n for n, _ in e.unet.named_modules()}
    changed = {k for k, v in e.unet.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.rsplit(".", 1)[0] in e.layers for k in changed)
    assert all(k.split(".")[-2] in ("to_k", "to_v") and ".attn2." in k for k in changed) and names


def mapped_share(model, unet, concept, target):
    """Worst layer's remaining distance of ``concept``'s keys / values from ``target``'s (1 = unmoved)."""
    c, c_star, _ = edit_vectors(model, [concept], [target], [], ("two {color} {concept}",))
    new = cross_attention_projections(unet)
    return max(
        float((c @ new[n].weight.double().T - c_star @ old.weight.double().T).norm()
              / (c @ old.weight.double().T - c_star @ old.weight.double().T).norm())
        for n, old in cross_attention_projections(model.network).items()
    )


def test_several_words_at_once_reach_the_plural(model):
    from velodiff.edit.erase import SHAPES_TEMPLATES, expand_templates

    plural = expand_templates(SHAPES_TEMPLATES, "triangles")
    assert "two red triangles" in plural and "three small red triangles" in plural
    assert not any(p.startswith("a ") for p in plural)
    assert expand_templates(SHAPES_TEMPLATES, "triangle")[:2] == ["a red triangle", "a yellow triangle"]
    singular = erase_concept(model, "triangle", PRESERVE, target="circle")
    both = erase_concept(
        model, "triangle, triangles", [*PRESERVE, "circles", "squares", "crosses"], target="circle,circles"
    )
    assert both.concept == "triangle,triangles" and both.target == "circle,circles"
    # the plural's keys and values move further toward the target's when the plural is erased too
    single_share = mapped_share(model, singular.unet, "triangles", "circles")
    assert mapped_share(model, both.unet, "triangles", "circles") < 0.85 * single_share
    assert both.preserve_residual < 0.05


def test_saved_folder_loads_with_the_edited_network(model, tmp_path):
    e = erase_concept(model, "triangle", PRESERVE, target="", projections=("to_v",))
    out = save_erased(model, e, tmp_path / "erased")
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.is_file() and "triangle" in (out / "MODEL_CARD.md").read_text()
    import os
    import stat

    mask = os.umask(0o022)
    os.umask(mask)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert modes == {0o666 & ~mask}  # diffusers left the weights owner-only (0o600)
    loaded = velodiff.load(str(out))
    for k, v in e.unet.state_dict().items():
        assert torch.allclose(loaded.network.state_dict()[k].float(), v.float()), k
    for comp in ("text_encoder", "vae", "tokenizer"):
        assert sorted(p.name for p in (out / comp).iterdir()) == sorted(
            p.name for p in (model_path(model) / comp).iterdir()
        )


def model_path(model):
    from pathlib import Path

    return Path(model.path)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"concept": "dog"}, "unknown concept word"),
        ({"concept": ""}, "empty"),
        ({"concept": "tri4ngle"}, "not a word"),
        ({"concept": "triangle", "preserve": ["triangle"]}, "both erased and preserved"),
        ({"concept": "triangle", "target": "triangle"}, "target"),
        ({"concept": "triangle", "preserve": ["kangaroo"]}, "unknown preserved concept word"),
        ({"concept": "triangle", "projections": ("to_q",)}, "projections"),
        ({"concept": "triangle", "lamb": 0.0}, "lamb"),
        ({"concept": "triangle", "erase_scale": -1.0}, "erase_scale and preserve_scale must be finite"),
        ({"concept": "triangle", "preserve_scale": -0.5}, "erase_scale and preserve_scale must be finite"),
        ({"concept": "triangle", "erase_scale": float("inf")}, "erase_scale and preserve_scale must be"),
        ({"concept": "triangle,triangles", "target": "circle,circles,crosses"}, "one target or one per word"),
        ({"concept": None}, "a concept, target or preserved word is a string"),
        ({"concept": "triangle", "preserve": None}, "a concept, target or preserved word is a string"),
        ({"concept": "triangle", "lamb": "0.1"}, "lamb must be a number"),
        ({"concept": "triangle", "templates": []}, "non-empty list of prompt templates"),
        ({"concept": "triangle", "templates": "a {concept}"}, "non-empty list of prompt templates"),
        ({"concept": "triangle", "templates": ["a picture"]}, "every templates entry needs {concept}"),
        ({"concept": "triangle", "templates": ["a {bogus} {concept}"]}, "only {concept}, {color}, {size}"),
    ],
)
def test_bad_input_is_one_line(model, kw, match):
    with pytest.raises(VelodiffError, match=match) as err:
        erase_concept(model, **kw)
    assert "\n" not in str(err.value)


def test_cli_writes_a_folder_and_refuses_in_one_line(tmp_path, capsys):
    import json

    from velodiff.cli import main

    def cli(*args: str) -> int:
        try:
            return main(list(args))
        except SystemExit as e:
            return int(e.code or 0)

    out = tmp_path / "erased"
    args = ["erase", "--concept", "triangle", "--preserve", "circle,square", "--threads", "1"]
    assert cli(*args, "--target", "cross", "--out", str(out), "--json", str(tmp_path / "e.json")) == 0
    info = json.loads((tmp_path / "e.json").read_text())
    assert info["target"] == "cross" and info["preserve"] == ["circle", "square"] and (out / "unet").is_dir()
    capsys.readouterr()
    assert cli("erase", "--concept", "giraffe", "--out", str(tmp_path / "x")) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown concept word" in err and "\n" not in err
    # the erased model written over the model it is made from: refused, the source untouched
    before = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert cli(*args, "--model", str(out), "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert "is the folder of the model being edited" in err and "\n" not in err
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before


def test_a_model_with_nan_weights_is_refused_and_nothing_written(model):
    import copy

    network = copy.deepcopy(model.network)
    with torch.no_grad():
        for p in network.parameters():
            p.fill_(float("nan"))

    class Broken:  # the shipped model with its UNet's weights gone NaN
        def __getattr__(self, name):
            return network if name == "network" else getattr(model, name)

    with pytest.raises(VelodiffError, match="erased weights are not finite"):
        erase_concept(Broken(), "triangle", ["circle"], "circle")


def test_the_concept_token_is_the_whole_word_where_it_is():
    """With a custom template the concept need not end the prompt, may sit inside another word, and may be
    named twice: its vectors start at its last occurrence (the docstring's rule)."""
    from velodiff.edit.erase import _concept_ends

    tok = velodiff.load("default").components["tokenizer"]
    assert _concept_ends(tok, "a ring on a string", "ring", "circle") == (2, 2)  # not 'string'
    assert _concept_ends(tok, "a ring on a table", "ring", "") == (2, 1)  # the token before it
    assert _concept_ends(tok, "a photo of a red triangle", "triangle", "") == (6, 5)
    # BOS a ring on a ring: the last 'ring' is token 5; with it replaced, the target's ('circle') too, and
    # with it dropped, the token before it (the second 'a', 3)
    assert _concept_ends(tok, "a ring on a ring", "ring", "circle") == (5, 5)
    assert _concept_ends(tok, "a ring on a ring", "ring", "") == (5, 3)


def test_only_the_chosen_projections_are_edited(model):
    """projections=("to_v",) edits the cross-attention value projections only: every key projection keeps
    the model's weights, and every value projection is changed."""
    e = erase_concept(model, "triangle", PRESERVE, target="circle", projections=("to_v",))
    new = cross_attention_projections(e.unet)
    for name, old in cross_attention_projections(model.network).items():
        same = torch.equal(new[name].weight, old.weight)
        assert same == name.endswith("to_k"), name
    assert e.layers and all(name.endswith("attn2.to_v") for name in e.layers)


def test_apply_erasure_puts_every_edited_projection_in_the_model(model):
    """apply_erasure changes the given model in place to carry the erasure's network: afterwards every
    weight (every edited key and value projection, and the untouched rest) is the erased copy's."""
    import copy
    from types import SimpleNamespace

    from velodiff.edit.erase import apply_erasure

    e = erase_concept(model, "triangle", PRESERVE, target="circle")
    target = SimpleNamespace(network=copy.deepcopy(model.network))  # the shared model stays as it is
    assert apply_erasure(target, e) is target
    erased = e.unet.state_dict()
    differ = [k for k, v in target.network.state_dict().items() if not torch.equal(v, erased[k])]
    assert not differ, differ[:3]


def test_the_empty_prompt_stays_preserved_next_to_the_named_concepts(model):
    """The empty prompt (classifier-free guidance's unconditional branch) is preserved also when words
    to preserve are given: in every edited projection its keys and values move as little as the
    preserved concepts' do (under the same 5% bar as they)."""
    e = erase_concept(model, "triangle", PRESERVE, target="circle")
    empty = model.encode_prompt([""], guided=False)["encoder_hidden_states"][0].detach().double()
    new = cross_attention_projections(e.unet)
    for name, old in cross_attention_projections(model.network).items():
        w0, w1 = old.weight.double(), new[name].weight.double()
        moved = (empty @ w1.T - empty @ w0.T).norm() / (empty @ w0.T).norm()
        assert moved < 0.05, (name, float(moved))


def test_an_erasure_for_another_network_is_refused_and_writes_nothing():
    """apply_erasure checks every layer it would write first: a network without one of them (a pruned
    student) or with another shape is one line and keeps all its weights (4 were overwritten before)."""
    from types import SimpleNamespace

    from velodiff.edit.erase import Erasure, apply_erasure

    def net(width):
        torch.manual_seed(width)
        return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, width))

    edited = net(4)
    erasure = Erasure(unet=edited, concept="x", target="", preserve=(), layers=["0", "1"], erase_residual=0.0,
                      preserve_residual=0.0)
    for other in (torch.nn.Sequential(net(4)[0]), net(3)):  # no layer "1"; layers of another shape
        model = SimpleNamespace(network=other)
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(VelodiffError, match="^this erasure was made for another network: the model has"):
            apply_erasure(model, erasure)
        assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    same = net(5)
    same[0], same[1] = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    apply_erasure(SimpleNamespace(network=same), erasure)
    assert all(torch.equal(same[k].weight, edited[k].weight) for k in (0, 1))  # (the weights: UCE's edit)
    with pytest.raises(VelodiffError, match="apply_erasure takes erase_concept's Erasure, got str"):
        apply_erasure(SimpleNamespace(network=same), "x")


def test_cli_scales_and_projections_are_the_apis(model, tmp_path, monkeypatch, capsys):
    """erase's --erase-scale, --preserve-scale and --projections reach the solve: the recorded settings and
    the residuals are the API's erasure with the same values. The written model erased again into its own
    folder, named one way by --model and another by --out, is refused (it would replace its source)."""
    import json

    from velodiff.cli import main

    js = tmp_path / "e.json"
    try:
        main(["erase", "--concept", "triangle", "--preserve", "circle,square", "--erase-scale", "2",
              "--preserve-scale", "3", "--projections", "to_v", "--threads", "1",
              "--out", str(tmp_path / "m"), "--json", str(js)])
    except SystemExit as e:
        assert not e.code
    info = json.loads(js.read_text())
    s = info["settings"]
    assert (s["erase_scale"], s["preserve_scale"], s["projections"]) == (2.0, 3.0, ["to_v"])
    want = erase_concept(model, "triangle", ["circle", "square"], erase_scale=2.0, preserve_scale=3.0,
                         projections=["to_v"])
    assert info["erase_residual"] == pytest.approx(want.erase_residual, rel=1e-5)
    assert info["preserve_residual"] == pytest.approx(want.preserve_residual, rel=1e-5)
    monkeypatch.chdir(tmp_path)
    before = (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    capsys.readouterr()
    try:
        code = main(["erase", "--concept", "circle", "--model", "m", "--out", str(tmp_path / "m")])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and "is the folder of the model being edited" in err and "\n" not in err
    assert (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
