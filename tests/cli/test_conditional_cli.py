"""``sddpm sample`` with a class-conditional model: --class, --labels, --guidance, outputs."""

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sddpm.cli import app
from sddpm.generation import generate, load_for_sampling
from sddpm.images import make_grid
from sddpm.models import build_model, save_pretrained

from unet_configs import tiny_unet_config

CFG = tiny_unet_config(diffusion_steps=100)
EXTRA = {
    "diffusion": {
        "schedule": {"kind": "linear", "T": 100, "beta_1": 1e-4, "beta_T": 0.02},
        "prediction": "eps",
    }
}


def _save(path, num_classes):
    torch.manual_seed(0)
    model = build_model(CFG.replace(num_classes=num_classes))
    with torch.no_grad():
        torch.nn.init.normal_(model.head.conv.weight, std=0.3)  # an output that is not ~0
        if num_classes:
            model.class_embed.weight.normal_(0, 2.0)  # classes that differ
    model.train()(torch.randn(8, 1, 8, 8), torch.randint(0, 100, (8,)))  # BN running stats
    save_pretrained(model.eval(), path, extra=EXTRA)
    return path


@pytest.fixture(scope="module")
def cond_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("m") / "cond", 4)


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("m") / "plain", 0)


def run(*args):
    return CliRunner().invoke(app, ["sample", *[str(a) for a in args]])


COMMON = ("--sampler", "ddim", "--steps", "3", "--batch-size", "3")


def test_sample_class_writes_npz_with_labels_and_the_right_count(cond_dir, tmp_path):
    out = tmp_path / "c2.npz"
    result = run("--checkpoint", cond_dir, "--num", 5, "--class", 2, *COMMON, "--out", out)
    assert result.exit_code == 0, result.output
    data = np.load(out)
    assert data["images"].shape == (5, 8, 8, 1) and data["labels"].tolist() == [2] * 5
    assert data["labels"].dtype == np.int64
    # the images are the library's conditional samples of class 2
    setup = load_for_sampling(cond_dir)
    expected = generate(setup.model, 5, (1, 8, 8), sampler="ddim", steps=3, labels=[2],
                        schedule=setup.schedule, progress=False)  # fmt: skip
    assert np.array_equal(data["images"], ((expected.clamp(-1, 1) + 1) * 127.5).round()
                          .to(torch.uint8).permute(0, 2, 3, 1).numpy())  # fmt: skip
    other = tmp_path / "c0.npz"
    assert run("--checkpoint", cond_dir, "--num", 5, "--class", 0, *COMMON, "--out", other)
    assert not np.array_equal(np.load(other)["images"], data["images"])  # the class matters


def test_labels_cycle_guidance_changes_images_and_png_has_one_class_per_row(cond_dir, tmp_path):
    npz, png = tmp_path / "s.npz", tmp_path / "s.png"
    args = ("--checkpoint", cond_dir, "--num", 7, "--labels", "3,1", *COMMON)
    assert run(*args, "--out", npz).exit_code == 0
    data = np.load(npz)
    assert data["labels"].tolist() == [3, 1, 3, 1, 3, 1, 3]  # image i: (3, 1)[i % 2]
    guided = tmp_path / "g.npz"
    assert run(*args, "--guidance", 3, "--out", guided).exit_code == 0
    assert np.load(guided)["labels"].tolist() == data["labels"].tolist()
    assert not np.array_equal(np.load(guided)["images"], data["images"])
    result = run(*args, "--out", png)
    assert result.exit_code == 0, result.output
    # rows: class 1 (images 1, 3, 5), then class 3 (images 0, 2, 4, 6); 4 columns
    grid = np.asarray(Image.open(png).resize((4 * 10 + 2, 2 * 10 + 2), Image.NEAREST))
    cell = lambda r, c: grid[2 + r * 10 : 10 + r * 10, 2 + c * 10 : 10 + c * 10]  # noqa: E731
    images = data["images"][..., 0]
    for col, i in enumerate([1, 3, 5]):
        assert np.array_equal(cell(0, col), images[i]), i
    for col, i in enumerate([0, 2, 4, 6]):
        assert np.array_equal(cell(1, col), images[i]), i
    assert (cell(0, 3) == 255).all()  # class 1 has 3 images: the 4th cell is padding
    # the library grid without labels is the plain square layout
    plain = make_grid(torch.from_numpy(images[:, None] / 127.5 - 1.0).float())
    assert plain.shape[:2] == (3 * 10 + 2, 3 * 10 + 2)


def test_a_conditional_model_without_labels_spreads_its_classes(cond_dir, tmp_path):
    out = tmp_path / "all.npz"
    assert run("--checkpoint", cond_dir, "--num", 6, *COMMON, "--out", out).exit_code == 0
    assert np.load(out)["labels"].tolist() == [0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize(
    "model, args, message",
    [
        ("cond", ["--class", "1", "--labels", "2"], "give --class K or --labels"),
        ("cond", ["--class", "5"], "--class/--labels: labels must be class indices in [0, 3] or 4"),
        ("cond", ["--labels", "0,9"], "in [0, 3] or 4"),
        ("cond", ["--labels", "a,b"], "--labels must be comma-separated integers"),
        ("cond", ["--class", "-1"], "--class: labels must be class indices >= 0"),
        ("cond", ["--guidance", "-0.5"], "--guidance: guidance must be a finite number >= 0"),
        ("cond", ["--guidance", "inf"], "--guidance: guidance must be a finite number >= 0"),
        ("plain", ["--class", "0"], "labels were given to an unconditional model"),
        ("plain", ["--guidance", "2"], "needs class labels"),
    ],
)
def test_bad_class_input_fails_clearly_and_writes_nothing(
    cond_dir, plain_dir, tmp_path, model, args, message
):
    out = tmp_path / "x.npz"
    source = cond_dir if model == "cond" else plain_dir
    result = run("--checkpoint", source, "--num", 2, *COMMON, *args, "--out", out)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()
