"""Our FID InceptionV3 against the published network's outputs (tests/data/fid-inception.*).

The real weights cannot be downloaded here, so the reference file stores the published network's
outputs for weights made by a deterministic rule from the real file's key list; we regenerate
those weights and must reproduce ``output.pool`` and ``output.prob``.
"""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sddpm.evaluation import (
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_FILENAME,
    INCEPTION_WEIGHTS_URL,
    FIDInceptionV3,
    check_state_dict,
    load_fid_inception,
    resolve_inception_weights,
)
from sddpm.evaluation.inception import _prepare_images, rule_made_weights

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "fid-inception.safetensors"

# Tolerance for the reference vectors. Same float32 ops in the same order give bit-identical
# results on the machine the file was made on (measured max abs error 0.0); these bounds leave
# room for other BLAS / thread counts. pool values are O(1), prob values <= 0.42.
POOL_ATOL, PROB_ATOL, RTOL = 1e-5, 1e-6, 1e-4


def _reference():
    with safe_open(str(REFERENCE), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return meta, tensors


@pytest.fixture(scope="module")
def reference():
    meta, tensors = _reference()
    keys_and_shapes = json.loads(meta["keys_and_shapes"])
    return keys_and_shapes, rule_made_weights(keys_and_shapes), tensors


@pytest.fixture(scope="module")
def model(reference):
    _, state_dict, _ = reference
    net = FIDInceptionV3()
    net.load_state_dict(state_dict, strict=True)
    return net.eval().requires_grad_(False)


def test_keys_and_shapes_are_the_real_files(reference):
    keys_and_shapes, _, _ = reference
    ours = {k: list(v.shape) for k, v in FIDInceptionV3().state_dict().items()}
    assert ours == keys_and_shapes  # exactly the real file's 566 entries, fc included
    assert len(ours) == 566


def test_reproduces_published_pool_and_prob(model, reference):
    _, _, tensors = reference
    with torch.no_grad():
        out = model(tensors["input.images"])
    assert out.pool.shape == (4, 2048) and out.prob.shape == (4, 1008)
    torch.testing.assert_close(out.pool, tensors["output.pool"], atol=POOL_ATOL, rtol=RTOL)
    torch.testing.assert_close(out.prob, tensors["output.prob"], atol=PROB_ATOL, rtol=RTOL)


def test_fc_bias_is_ignored_and_gray_images_are_repeated(model, reference):
    """The published IS head drops fc.bias: a bias that would change the probabilities a lot
    (a constant one would not: softmax ignores a shift) leaves them as the reference's."""
    _, _, tensors = reference
    pool = tensors["output.pool"]
    bias = 3 * torch.randn(1008, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.fc.bias.copy_(bias)
        try:
            prob = model.class_probabilities(pool)
            forward_prob = model(tensors["input.images"][:1]).prob
        finally:
            model.fc.bias.zero_()
        with_bias = torch.softmax(torch.nn.functional.linear(pool, model.fc.weight, bias), dim=1)
    torch.testing.assert_close(prob, tensors["output.prob"], atol=PROB_ATOL, rtol=RTOL)
    torch.testing.assert_close(forward_prob, tensors["output.prob"][:1], atol=PROB_ATOL, rtol=RTOL)
    # Had the bias been used, the probabilities would be far from the reference's.
    assert (with_bias - tensors["output.prob"]).abs().max() > 0.05
    # A grey image enters the network exactly as its 3-channel copy (as the published code).
    grey = tensors["input.images"][:2, :1]
    torch.testing.assert_close(
        _prepare_images(grey), _prepare_images(grey.expand(-1, 3, -1, -1)), atol=0, rtol=0
    )


def test_refuses_images_outside_unit_range(model):
    with pytest.raises(ValueError, match=r"\[0, 1\].*\(x \+ 1\) / 2"):
        model(torch.full((1, 3, 8, 8), -1.0))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(1, 2, 8, 8))


def test_wrong_state_dict_is_refused_with_a_list(reference):
    keys_and_shapes, state_dict, _ = reference
    expected = {k: tuple(v) for k, v in keys_and_shapes.items()}
    bad = dict(state_dict)
    bad["Mixed_5b.branch1x1.conv.weights"] = bad.pop("Mixed_5b.branch1x1.conv.weight")
    bad["fc.weight"] = torch.zeros(1000, 2048)
    with pytest.raises(ValueError) as info:
        check_state_dict(bad, expected, source="my.pth")
    msg = str(info.value)
    assert "my.pth" in msg
    assert "1 missing keys: Mixed_5b.branch1x1.conv.weight" in msg
    assert "1 unexpected keys: Mixed_5b.branch1x1.conv.weights" in msg
    assert "fc.weight: expected [1008, 2048], got [1000, 2048]" in msg
    check_state_dict(state_dict, expected)  # the right one passes


def test_load_from_env_var_path(tmp_path, monkeypatch, reference):
    _, state_dict, tensors = reference
    file = tmp_path / "weights.pth"
    torch.save(state_dict, file)
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(file))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # must not be used
    assert resolve_inception_weights() == file
    net = load_fid_inception()
    assert not net.training
    assert all(not p.requires_grad for p in net.parameters())
    for key, value in net.state_dict().items():
        assert torch.equal(value, state_dict[key]), key


def test_load_refuses_a_file_with_wrong_keys(tmp_path):
    file = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(3)}, file)
    with pytest.raises(ValueError, match=r"(?s)bad\.pth.*566 missing keys.*unexpected keys: conv"):
        load_fid_inception(file)


def test_env_var_to_missing_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_ENV):
        resolve_inception_weights()


def test_hub_cache_is_used(tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    target = tmp_path / "checkpoints" / INCEPTION_WEIGHTS_FILENAME
    target.parent.mkdir()
    target.write_bytes(b"")

    def no_download(*args, **kwargs):
        raise AssertionError("must not download when the cache has the file")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    assert resolve_inception_weights() == target


def test_download_goes_to_hub_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        Path(dst).write_bytes(b"x")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    path = resolve_inception_weights()
    assert path == tmp_path / "checkpoints" / INCEPTION_WEIGHTS_FILENAME
    assert calls == [(INCEPTION_WEIGHTS_URL, "6726825d")]


def test_offline_gives_clear_error_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    target = hub / "checkpoints" / INCEPTION_WEIGHTS_FILENAME
    with pytest.raises(FileNotFoundError) as info:
        load_fid_inception()
    msg = str(info.value)
    assert str(target) in msg and INCEPTION_WEIGHTS_ENV in msg and INCEPTION_WEIGHTS_URL in msg
    assert "no network" in msg
    assert list(tmp_path.iterdir()) == []  # not even the cache folder is left behind
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_ENV):
        resolve_inception_weights(download=False)
