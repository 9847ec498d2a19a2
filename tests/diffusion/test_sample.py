"""The sampling entry point: per-image seeds, threshold guidance, defaults, bad input."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from sddpm.diffusion import (
    EXECUTION_FIELDS,
    NoiseSchedule,
    OptionError,
    PerImageRandn,
    SamplingOptions,
    initial_noise,
    sample,
)
from sddpm.diffusion.seeding import SAMPLER_NOISE_STREAM
from sddpm.models import build_model, preset
from sddpm.snn import SpikingNeuron, get_thresholds

from .closed_form import GaussianEps

SCHEDULE = NoiseSchedule.linear()
SHAPE = (1, 4, 4)


class Recorder:
    """A closed-form model that counts calls and records the grad/inference state."""

    def __init__(self):
        self.inner = GaussianEps(SCHEDULE, 0.1, 0.3)
        self.calls = 0
        self.inference = []

    def __call__(self, x, t):
        self.calls += 1
        self.inference.append(torch.is_inference_mode_enabled())
        return self.inner(x, t)


class TinySpiking(nn.Module):
    """A model holding two spiking neurons; records their threshold at every call."""

    def __init__(self, fail_at_call: int | None = None):
        super().__init__()
        self.a, self.b = SpikingNeuron(threshold=1.0), SpikingNeuron(threshold=0.7)
        self.seen: list[tuple[float, float]] = []
        self.fail_at_call = fail_at_call

    def forward(self, x, t):
        self.seen.append((self.a.threshold, self.b.threshold))
        if len(self.seen) == self.fail_at_call:
            raise RuntimeError("boom")
        spikes = self.b(self.a(x.unsqueeze(0).expand(2, *x.shape)))
        return 0.1 * spikes.mean(0)


# ---------------------------------------------------------------- per-image seeds
@pytest.mark.parametrize(
    "sampler, kwargs", [("ddpm", {"steps": 20}), ("ddim", {"steps": 10, "eta": 0.7})]
)
def test_images_do_not_depend_on_the_batch(sampler, kwargs):
    model = GaussianEps(SCHEDULE, 0.1, 0.3)
    whole = sample(model, initial_noise(8, SHAPE, seed=11), sampler, seed=11, **kwargs)
    for size in (1, 3, 8):
        parts = []
        for start in range(0, 8, size):
            idx = list(range(start, min(start + size, 8)))
            x_T = initial_noise(idx, SHAPE, seed=11)
            parts.append(sample(model, x_T, sampler, seed=11, indices=idx, **kwargs))
        assert torch.equal(torch.cat(parts), whole), f"batch size {size}"
    other = sample(model, initial_noise(8, SHAPE, seed=11), sampler, seed=12, **kwargs)
    assert not torch.isclose(other, whole).any()  # another seed: other sampler noise


def test_initial_noise():
    x = initial_noise(8, (3, 2, 2), seed=5)
    assert x.shape == (8, 3, 2, 2) and x.dtype == torch.float32
    assert torch.equal(initial_noise([6, 2], (3, 2, 2), seed=5), x[[6, 2]])
    assert torch.equal(initial_noise(torch.tensor([3]), (3, 2, 2), seed=5), x[3:4])
    assert not torch.isclose(initial_noise(8, (3, 2, 2), seed=6), x).any()
    # the sampler's noise stream is not the initial-noise stream
    stream = PerImageRandn(range(8), seed=5, stream=SAMPLER_NOISE_STREAM).randn((3, 2, 2))
    assert not torch.isclose(stream, x).any()
    big = initial_noise(4, (1, 64, 64), seed=0)
    assert abs(big.mean().item()) < 5 / 128 and abs(big.std().item() - 1) < 5 / math.sqrt(
        2 * 4 * 4096
    )
    with pytest.raises(ValueError, match=">= 0"):
        initial_noise([-1], (1,), seed=0)


# ---------------------------------------------------------------- defaults and behaviour
@pytest.mark.parametrize(
    "sampler, schedule, calls",
    [
        ("ddpm", SCHEDULE, 1000),
        ("ddim", SCHEDULE, 100),
        ("dpm-solver++", SCHEDULE, 20),
        ("ddim", NoiseSchedule.linear(50), 50),  # default capped at the schedule length
    ],
)
def test_default_steps(sampler, schedule, calls):
    model = Recorder()
    model.inner = GaussianEps(schedule, 0.1, 0.3)
    x_T = initial_noise(2, SHAPE, seed=0)
    out = sample(model, x_T, sampler, schedule=schedule)
    assert model.calls == calls
    assert all(model.inference)  # every call under torch.inference_mode()
    assert not out.is_inference()  # ... but the result can enter autograd
    assert out.shape == x_T.shape and out.dtype == torch.float32
    assert out.abs().max() <= 1


def test_output_is_clipped_and_input_untouched():
    wild = lambda x, t: 50 * torch.sin(100 * x)  # noqa: E731
    x_T = initial_noise(3, SHAPE, seed=0).double()
    before = x_T.clone()
    for sampler in ("ddpm", "ddim", "dpm-solver++"):
        out = sample(wild, x_T, sampler, steps=5)
        assert out.dtype == torch.float32 and out.abs().max() <= 1
    assert torch.equal(x_T, before)


def test_progress_bar(capsys):
    sample(Recorder(), initial_noise(1, SHAPE), "ddim", steps=7, progress=True)
    err = capsys.readouterr().err
    assert "ddim" in err and "7/7" in err
    sample(Recorder(), initial_noise(1, SHAPE), "ddim", steps=7)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- threshold guidance
def test_threshold_guidance_during_and_after_sampling():
    model = TinySpiking()
    sample(model, initial_noise(2, SHAPE), "ddim", steps=4, threshold=1.1)
    assert model.seen == [(1.1, 1.1)] * 4
    assert (model.a.threshold, model.b.threshold) == (1.0, 0.7)
    sample(model, initial_noise(2, SHAPE), "ddim", steps=2)  # no guidance: as they are
    assert model.seen[4:] == [(1.0, 0.7)] * 2


def test_threshold_restored_after_an_exception():
    model = TinySpiking(fail_at_call=3)
    with pytest.raises(RuntimeError, match="boom"):
        sample(model, initial_noise(2, SHAPE), "ddpm", steps=10, threshold=0.9)
    assert model.seen == [(0.9, 0.9)] * 3
    assert (model.a.threshold, model.b.threshold) == (1.0, 0.7)


def test_threshold_guidance_on_the_spiking_unet():
    model = build_model(preset("digits")).eval()
    before = get_thresholds(model)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(set(get_thresholds(m))))
    out = sample(model, initial_noise(2, (1, 8, 8)), "dpm-solver++", steps=2, threshold=1.25)
    assert seen == [{1.25}, {1.25}]
    assert get_thresholds(model) == before
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sampler": "euler"}, "unknown sampler 'euler'; choose one of ddpm, ddim, dpm-solver++"),
        ({"steps": 0}, r"steps must be an integer >= 1"),
        ({"steps": 1001}, r"steps must be an integer in \[1, 1000\]"),
        ({"steps": 2.5}, "steps must be an integer"),
        ({"threshold": 0.0}, "threshold must be > 0"),
        ({"threshold": -1}, "threshold must be > 0"),
        ({"threshold": float("nan")}, "threshold must be a finite number"),
        (
            {"x_T": torch.zeros(1, 4, 4)},
            r"x_T must be a 4-D tensor \[B, C, H, W\], got \(1, 4, 4\)",
        ),
        ({"x_T": torch.zeros(1, 1, 4, 4, dtype=torch.int64)}, "floating-point"),
        ({"eta": 0.5}, "eta applies to the ddim sampler only"),
        ({"sampler": "ddim", "eta": -0.1}, "eta must be"),
        ({"prediction": "x0"}, "unknown prediction"),
        ({"spacing": "cubic"}, "unknown spacing"),
        ({"indices": [0, 1, 2]}, "3 indices given for a batch of 2"),
        ({"seed": -1}, "seed must be an integer >= 0"),
    ],
)
def test_bad_input_raises_before_any_work(kwargs, message):
    model = Recorder()
    args = {"x_T": initial_noise(2, SHAPE), **kwargs}
    with pytest.raises(ValueError, match=message):
        sample(model, **args)
    assert model.calls == 0


def test_model_validate_input_is_called_first():
    model = build_model(preset("digits")).eval()
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(1))
    with pytest.raises(ValueError, match="multiples of"):
        sample(model, torch.zeros(2, 1, 7, 7), "ddim", steps=2)
    with pytest.raises(ValueError, match="1-channel"):
        sample(model, torch.zeros(2, 3, 8, 8), "ddim", steps=2)
    assert calls == []


def test_threshold_needs_spiking_neurons():
    with pytest.raises(ValueError, match="no spiking neurons"):
        sample(nn.Identity(), initial_noise(1, SHAPE), "ddim", steps=2, threshold=1.1)
    with pytest.raises(ValueError, match="nn.Module"):
        sample(Recorder(), initial_noise(1, SHAPE), "ddim", steps=2, threshold=1.1)


# ---------------------------------------------------------------- SamplingOptions
def test_options_object_gives_the_same_images_as_the_keywords():
    model = GaussianEps(SCHEDULE, 0.1, 0.3)
    x_T = initial_noise(3, SHAPE, seed=2)
    kw = dict(sampler="ddim", steps=7, eta=0.4, seed=2, spacing="quadratic")
    by_keywords = sample(model, x_T, **kw)
    opts = SamplingOptions(**kw, batch_size=1, device="cpu")  # execution fields: not used here
    assert torch.equal(sample(model, x_T, options=opts), by_keywords)
    assert not torch.equal(sample(model, x_T, options=opts.replace(seed=3)), by_keywords)
    with pytest.raises(ValueError, match="as keywords or as options=, not both"):
        sample(model, x_T, steps=7, options=opts)


def test_options_validate_once_and_name_the_field():
    cases = {
        "sampler": {"sampler": "euler"},
        "steps": {"steps": 0},
        "spacing": {"spacing": "cubic"},
        "eta": {"sampler": "ddpm", "eta": 0.5},
        "threshold": {"threshold": float("inf")},
        "seed": {"seed": 1.5},
        "batch_size": {"batch_size": 0},
        "bf16": {"bf16": "yes"},
        "compile": {"compile": 1},
        "neuron_kernel": {"neuron_kernel": "cuda"},
        "device": {"device": "bogus"},
        "memory_format": {"memory_format": "nhwc"},
        "moments": {"sampler": "ddim", "moments": torch.ones(1000)},
        "labels": {"labels": [0, -1]},
        "guidance": {"guidance": float("nan")},
    }
    assert set(cases) == {f.name for f in dataclasses.fields(SamplingOptions)}
    for field, kwargs in cases.items():
        with pytest.raises(OptionError) as info:
            SamplingOptions(**kwargs)
        assert info.value.field == field, (field, str(info.value))
    with pytest.raises(OptionError, match=r"steps must be an integer in \[1, 50\]"):
        SamplingOptions(steps=51).steps_for(50)
    with pytest.raises(TypeError, match="unknown sampling option"):
        SamplingOptions().replace(stepz=3)


def test_options_records_round_trip():
    opts = SamplingOptions(sampler="ddpm", threshold=1.01, seed=4, batch_size=8, bf16=True)
    d = opts.to_dict()
    assert d == {
        "sampler": "ddpm", "steps": None, "spacing": None, "eta": 0.0, "threshold": 1.01,
        "seed": 4, "batch_size": 8, "bf16": True, "compile": False, "neuron_kernel": "auto",
        "device": "cpu", "memory_format": "contiguous", "moments": None, "labels": None,
        "guidance": None,
    }  # fmt: skip
    assert SamplingOptions.from_dict({**d, "num_images": 10}) == opts
    resolved = opts.to_dict(T=50)
    assert (resolved["steps"], resolved["spacing"]) == (50, "linear")  # what ran
    assert SamplingOptions(sampler="dpm-solver++").to_dict(T=1000)["steps"] == 20
    assert set(opts.image_settings()) == set(d) - set(EXECUTION_FIELDS)
    assert SamplingOptions(device=torch.device("cpu")).device == "cpu"
    # A moments tensor is recorded by its fingerprint, which another tensor does not share.
    gamma = torch.linspace(0.5, 1.0, 1000, dtype=torch.float64)
    rec = SamplingOptions(sampler="analytic-ddpm", moments=gamma).to_dict()
    assert rec["moments"].startswith("sha256:") and len(rec["moments"]) == 23
    other = SamplingOptions(sampler="analytic-ddpm", moments=gamma * 1.001).to_dict()
    assert other["moments"] != rec["moments"]
    assert SamplingOptions.from_dict(rec).moments is None  # records hold no tensors
