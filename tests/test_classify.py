"""The diffusion zero-shot classifier (Li et al. 2023): on an exact toy denoiser the true label wins and
survives every pruning round at the counted cost; on the shipped model a rendered scene is classified
right; bad input is refused in one line."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

import velodiff
from velodiff.edit.classify import classify
from velodiff.errors import VelodiffError
from velodiff.schedules import DiscreteVP


@dataclass
class PointMassModel:
    """Data = one of K point masses mu_k, one per label: the exact conditional denoiser is x0 = mu_k
    whatever x_t is, so the eps error of label k is (alpha/sigma)^2 ||x0 - mu_k||^2 exactly."""

    protos: torch.Tensor
    schedule: DiscreteVP = field(default_factory=lambda: DiscreteVP(torch.linspace(1e-4, 0.02, 1000)))
    vae_scale_factor: int = 1
    default_size: tuple[int, int] = (8, 8)
    device: torch.device = torch.device("cpu")
    calls: int = 0
    times: list = field(default_factory=list)  # the t of every evaluation, in order

    def encode(self, images):
        return images * 2 - 1

    def encode_prompt(self, labels, guided=False):
        idx = torch.tensor([int(s.split()[-1]) for s in labels])
        return {"encoder_hidden_states": torch.nn.functional.one_hot(idx, len(self.protos)).float()[:, None]}

    def denoiser(self, x, t, cond):
        self.calls += x.shape[0]
        self.times += t.tolist()
        k = cond["encoder_hidden_states"][:, 0].argmax(-1)
        return self.protos[k]


@dataclass
class GaussianModel(PointMassModel):
    """Data of label k = N(mu_k, s^2 I): the exact conditional denoiser E[x0 | x_t] = mu_k + c_t (x_t -
    alpha_t mu_k), c_t = alpha_t s^2 / (alpha_t^2 s^2 + sigma_t^2), depends on x_t, so the scores depend
    on the drawn noise."""

    spread: float = 0.3

    def denoiser(self, x, t, cond):
        mu = super().denoiser(x, t, cond)
        a, s = (f(t).float().view(-1, 1, 1, 1) for f in (self.schedule.alpha, self.schedule.sigma))
        return mu + a * self.spread**2 / (a**2 * self.spread**2 + s**2) * (x - a * mu)


def toy(k=10, seed=0, model=PointMassModel):
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(k, 3, 8, 8, generator=g) * 2 - 1
    return model(protos), [f"class {i}" for i in range(k)]


def test_exact_toy_picks_the_true_label_and_pruning_keeps_it():
    m, labels = toy()
    for y in range(len(labels)):
        image = (((m.protos[y] + 0.1 * torch.randn(3, 8, 8)) + 1) / 2).clamp(0, 1)  # near prototype y
        m.calls = 0
        r = classify(m, image, labels, rounds=((2, 4), (6, 2), (12, 1)), batch_size=7)
        assert r.label == labels[y] and r.index == y
        assert all(labels[y] in alive for alive in r.rounds)  # never pruned
        assert r.evaluations == m.calls == 10 * 2 + 4 * 4 + 2 * 6  # the pruned schedule's cost
        assert r.samples[y] == 12 and sorted(r.samples)[:6] == [2] * 6
        # the score is the exact weighted error: without pruning, it orders the labels by distance
        full = classify(m, image, labels, rounds=((12, 1),))
        dist = [float(((m.encode(image) - p) ** 2).mean()) for p in m.protos]
        assert sorted(range(10), key=lambda i: full.errors[i]) == sorted(range(10), key=lambda i: dist[i])


def test_weightings_agree_on_the_toy_and_shared_noise_is_seeded():
    m, labels = toy(k=5, seed=1)
    image = (m.protos[3] + 1) / 2
    a = classify(m, image, labels, weighting="eps", seed=4)
    assert a.label == classify(m, image, labels, weighting="v").label == "class 3"
    assert a.errors == classify(m, image, labels, weighting="eps", seed=4).errors


def test_pairs_are_stratified_over_t_range():
    """The times are a van der Corput sequence over the t_range share of the schedule: 2^m - 1 pairs are
    exactly its interior points j / 2^m, none at an end (at t_min the eps weight (alpha / sigma)^2 would
    swamp the score), and every candidate is scored on the same times."""
    m, labels = toy(k=3)
    image = (m.protos[0] + 1) / 2
    t_min, t_max = m.schedule.t_min, m.schedule.t_max
    for lo, hi in ((0.0, 1.0), (0.5, 1.0), (0.25, 0.75)):
        m.times = []
        classify(m, image, labels, rounds=((7, 1),), t_range=(lo, hi))
        per_label = [sorted(m.times[c * 7 : (c + 1) * 7]) for c in range(3)]
        expected = [t_min + (t_max - t_min) * (lo + (hi - lo) * j / 8) for j in range(1, 8)]
        for ts in per_label:
            assert ts == pytest.approx(expected, rel=1e-12)


def test_each_weighting_is_its_elbo_weight_of_the_x0_error():
    """On the point masses the x0 error of label k is d_k = ||x0 - mu_k||^2 (mean) at every time, so each
    score is d_k times the weighting's mean over the pairs' times: (alpha / sigma)^2 for eps, 1 / sigma^2
    for v (||v - v_theta||^2, alpha^2 + sigma^2 = 1), 1 for x0."""
    m, labels = toy(k=4, seed=2)
    jitter = 0.2 * torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    image = ((m.protos[1] + jitter + 1) / 2).clamp(0, 1)  # (an image: in [0, 1])
    d = [float(((m.encode(image) - p) ** 2).mean()) for p in m.protos]
    m.times = []
    classify(m, image, labels, rounds=((7, 1),))
    t = torch.tensor(m.times[:7], dtype=torch.float64)
    alpha, sigma = m.schedule.alpha(t), m.schedule.sigma(t)
    weights = {"eps": (alpha / sigma) ** 2, "v": 1 / sigma**2, "x0": torch.ones_like(t)}
    for name, w in weights.items():
        r = classify(m, image, labels, rounds=((7, 1),), weighting=name)
        assert r.errors == pytest.approx([dk * float(w.mean()) for dk in d], rel=1e-5), name


def test_the_seed_draws_the_shared_noise():
    """On a model whose prediction depends on x_t, the scores are a Monte Carlo estimate over the seeded
    noise: the same seed repeats them, another seed changes them (and the label stays right)."""
    m, labels = toy(k=5, seed=1, model=GaussianModel)
    image = (m.protos[3] + 1) / 2
    runs = {s: classify(m, image, labels, rounds=((4, 1),), seed=s) for s in (4, 5)}
    assert runs[4].errors == classify(m, image, labels, rounds=((4, 1),), seed=4).errors
    assert runs[4].errors != pytest.approx(runs[5].errors, rel=1e-3)
    assert runs[4].label == runs[5].label == "class 3"


def test_rounds_may_keep_as_many_and_stop_at_one_candidate():
    """Rounds need growing samples and non-growing keep: an equal keep is valid and runs every round;
    once one candidate is left the later rounds are not run (no evaluations spent for nothing)."""
    from velodiff.edit.classify import check_rounds

    assert check_rounds("4:2,16:2,48:1") == [(4, 2), (16, 2), (48, 1)]
    m, labels = toy()
    image = (m.protos[6] + 1) / 2
    r = classify(m, image, labels, rounds=((2, 2), (6, 2), (12, 1)))
    assert r.label == "class 6" and len(r.rounds) == 3 and r.evaluations == 10 * 2 + 2 * 4 + 2 * 6
    m.calls = 0
    r = classify(m, image, labels, rounds=((2, 1), (6, 1), (12, 1)))
    assert r.label == "class 6" and r.rounds == [labels]
    assert r.evaluations == m.calls == 10 * 2 and r.samples[6] == 2


def test_rgba_is_read_only_without_transparency():
    """An opaque RGBA image is its RGB image; one with any transparent pixel is refused (its
    transparency would be silently dropped)."""
    from PIL import Image

    m, labels = toy(k=3)
    rgb = Image.fromarray(((m.protos[2] + 1) / 2 * 255).byte().permute(1, 2, 0).numpy())
    opaque = rgb.convert("RGBA")
    assert classify(m, opaque, labels).errors == classify(m, rgb, labels).errors
    partly = opaque.copy()
    partly.putpixel((0, 0), (0, 0, 0, 128))
    with pytest.raises(VelodiffError, match=r"mode is 'RGBA'; give an RGB image \(or L, or RGBA without tr"):
        classify(m, partly, labels)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    from velodiff.default_model import default_model_path

    return velodiff.load(default_model_path())


def test_shipped_model_classifies_a_rendered_scene(model):
    from PIL import Image

    from velodiff.data.shapes import ShapesWorld

    labels = ["a red circle", "a blue square", "a green triangle", "a red triangle"]
    image = Image.fromarray(ShapesWorld(seed=0).render("a green triangle", seed=3).image)
    r = classify(model, image, labels, rounds=((4, 2), (12, 1)))
    assert r.label == "a green triangle" and r.evaluations == 4 * 4 + 2 * 8


def test_bad_input_is_one_line(model, tmp_path, capsys):
    from PIL import Image

    from velodiff.cli import main

    img = Image.new("RGB", (64, 64))
    cases = [
        (Image.new("RGB", (32, 32)), ["a", "b"], "trained at 64x64"),
        (Image.new("RGB", (62, 64)), ["a", "b"], "multiples of"),
        (Image.new("CMYK", (64, 64)), ["a", "b"], "mode"),
        (Image.new("RGBA", (64, 64), (0, 0, 0, 0)), ["a", "b"], "mode"),
        (img, [], "no candidate labels"),
        (img, ["a red circle"], "one candidate"),
        (img, ["a red circle", "a red circle"], "repeat"),
        (img, ["A red circle", "a red  circle", "a cross"], r"repeat \(ignoring case and spacing\): 'A red"),
        (img, ["a red circle", ""], "empty"),
        (img, ["a red circle", None], "labels is a list of prompts"),  # ran with the label 'None'
        (img, "a red circle", "labels is a list of prompts"),
        # a tensor as img2img takes it, in [0, 1]: one of 0-255 read as another label
        (torch.full((3, 64, 64), 200.0), ["a", "b"], r"the image tensor must hold values in \[0, 1\]"),
        (torch.zeros(3, 64, 64, dtype=torch.uint8), ["a", "b"], r"is torch.uint8; give floats in \[0, 1\]"),
    ]
    for image, labels, match in cases:
        with pytest.raises(VelodiffError, match=match) as err:
            classify(model, image, labels)
        assert "\n" not in str(err.value)
    with pytest.raises(VelodiffError, match="weighting"):
        classify(model, img, ["a", "b"], weighting="l1")
    with pytest.raises(VelodiffError, match="the model must be a loaded model"):
        classify("default", img, ["a", "b"])
    for size in (-1, 0, 2.5):  # -1 ran no evaluation and named the first label
        with pytest.raises(VelodiffError, match=f"batch_size must be an integer >= 1, got {size}"):
            classify(model, img, ["a", "b"], batch_size=size)
    with pytest.raises(VelodiffError, match="seed 1180591620717411303424 is outside"):
        classify(model, img, ["a", "b"], seed=2**70)
    with pytest.raises(VelodiffError, match="t_range is a pair"):
        classify(model, img, ["a", "b"], t_range=(0, 0.5, 1))
    with pytest.raises(VelodiffError, match="rounds"):
        classify(model, img, ["a", "b"], rounds=((8, 2), (4, 1)))
    with pytest.raises(VelodiffError, match="at most 1000 samples"):
        classify(model, img, ["a", "b"], rounds=((100_000, 1),))
    from velodiff.edit.classify import check_rounds

    assert check_rounds("4:6,16:2,48:1") == [(4, 6), (16, 2), (48, 1)]  # the CLI's form, in Python too
    with pytest.raises(VelodiffError, match="give samples:keep pairs"):
        classify(model, img, ["a", "b"], rounds="4-6,16-2")

    class NaNModel:  # a model whose weights went NaN: no confident label out of NaN errors
        def __getattr__(self, name):
            return getattr(model, name)

        def denoiser(self, x, t, cond):
            return model.denoiser(x, t, cond) * float("nan")

    with pytest.raises(VelodiffError, match="returned NaN or inf while classifying"):
        classify(NaNModel(), img, ["a red circle", "a blue cross"], rounds=((2, 1),))

    def cli(*args: str) -> int:
        try:
            return main(list(args))
        except SystemExit as e:
            return int(e.code or 0)

    path = tmp_path / "s.png"
    Image.new("RGB", (32, 32)).save(path)
    labels = tmp_path / "labels.txt"
    labels.write_text("a red circle\na blue square\n")
    before = path.read_bytes(), labels.read_bytes()
    for args, match in [
        (["--labels", "a red circle,a blue square"], "trained at 64x64"),
        (["--labels", ""], "no candidate labels"),
        (["--labels-file", str(tmp_path / "missing.txt")], "does not exist"),
        ([], "--labels or --labels-file"),
        (["--labels", "a,b", "--json", str(path)], "IMAGE and --json are the same file"),  # the input kept
        (["--labels-file", str(labels), "--json", str(labels)], "--labels-file and --json are the same file"),
    ]:
        capsys.readouterr()
        assert cli("classify", str(path), "--threads", "1", *args) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and "\n" not in err
    assert (path.read_bytes(), labels.read_bytes()) == before


def test_cli_json(tmp_path):
    import json

    from PIL import Image

    from velodiff.cli import main
    from velodiff.data.shapes import ShapesWorld

    path = tmp_path / "s.png"
    Image.fromarray(ShapesWorld(seed=0).render("a blue square", seed=1).image).save(path)
    (tmp_path / "labels.txt").write_text("a red circle\na blue square\n\na white cross\n")
    args = ["classify", str(path), "--labels-file", str(tmp_path / "labels.txt"), "--rounds", "4:2,8:1"]
    try:
        rc = main([*args, "--json", str(tmp_path / "c.json"), "--threads", "1"])
    except SystemExit as e:
        rc = int(e.code or 0)
    assert rc == 0
    out = json.loads((tmp_path / "c.json").read_text())
    assert out["label"] == "a blue square" and out["evaluations"] == 3 * 4 + 2 * 4
    assert [r["label"] for r in out["ranking"]][0] == "a blue square"


def test_cli_seed_draws_the_shared_noise(model, tmp_path):
    """classify --seed 5: the ranking (each label's error) is the API's classification with seed 5."""
    import json

    from PIL import Image

    from velodiff.cli import main
    from velodiff.data.shapes import ShapesWorld
    from velodiff.edit.classify import check_rounds

    path = tmp_path / "s.png"
    Image.fromarray(ShapesWorld(seed=0).render("a blue square", seed=1).image).save(path)
    labels = ["a red circle", "a blue square"]
    try:
        main(["classify", str(path), "--labels", ",".join(labels), "--rounds", "4:2,8:1", "--seed", "5",
              "--threads", "1", "--json", str(tmp_path / "c.json")])
    except SystemExit as e:
        assert not e.code
    got = json.loads((tmp_path / "c.json").read_text())
    want = classify(model, Image.open(path).convert("RGB"), labels, rounds=check_rounds("4:2,8:1"), seed=5)
    assert got["ranking"] == want.as_dict()["ranking"]
