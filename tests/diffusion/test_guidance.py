"""Classifier-free guidance: the formula, one batched call, samplers, threshold, label dropout."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sddpm.diffusion import (
    DEFAULT_GUIDANCE,
    GuidedModel,
    NoiseSchedule,
    SamplingOptions,
    cycle_labels,
    drop_labels,
    image_seed,
    initial_noise,
    label_dropout_generator,
    label_dropout_uniforms,
    output_to_eps,
    sample,
)
from sddpm.models import build_model
from sddpm.snn import get_thresholds

from .closed_form import GaussianEps
from unet_configs import tiny_unet_config

SCHEDULE = NoiseSchedule.linear()
MEANS = (0.3, -0.4, 0.0)  # class k: pixels N(MEANS[k], S^2)
NULL_MEAN = -0.1  # the null class: N(NULL_MEAN, S^2)
S = 0.15
K = len(MEANS)


class ClassGaussians(nn.Module):
    """A closed-form conditional model: row b predicts the eps (or v) of its class's Gaussian.

    With a common S the guided predictor is again a Gaussian's: eps_u + w (eps_c - eps_u) =
    k_t (x - a_t m) with m = NULL_MEAN + w (MEANS[y] - NULL_MEAN). Records every call's labels.
    """

    def __init__(self, prediction="eps"):
        super().__init__()
        self.branches = [GaussianEps(SCHEDULE, m, S, prediction) for m in (*MEANS, NULL_MEAN)]
        self.calls: list[list[int]] = []

    def forward(self, x, t, y):
        self.calls.append(y.tolist())
        out = torch.empty_like(x)
        for k, branch in enumerate(self.branches):
            rows = y == k
            if rows.any():
                out[rows] = branch(x[rows], t[rows])
        return out


def tiny_unet(kind="spiking"):
    torch.manual_seed(0)
    cfg = tiny_unet_config(kind=kind, num_classes=K)
    model = build_model(cfg).eval()
    with torch.no_grad():  # an output head that is not ~0 (its init gain is 1e-5)
        nn.init.normal_(model.head.conv.weight, std=0.3)
    return model


def count_calls(model):
    """Batch size and labels of every forward call of ``model``."""
    calls = []

    def hook(module, args):
        calls.append((len(args[0]), args[2].tolist() if len(args) > 2 else None))

    model.register_forward_pre_hook(hook)
    return calls


# ---------------------------------------------------------------- the formula, one call
@pytest.mark.parametrize("kind", ["spiking", "ann"])
def test_w_1_is_one_conditional_call(kind):
    unet = tiny_unet(kind)
    calls = count_calls(unet)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([5, 500, 999]), torch.tensor([2, 0, 1])
    with torch.no_grad():
        guided = GuidedModel(unet, y, guidance=1.0)(x, t)
        assert calls == [(3, [2, 0, 1])]
        assert torch.equal(guided, unet(x, t, y))
        uncond = GuidedModel(unet, y, guidance=0.0)(x, t)
        assert calls[-1] == (3, [K] * 3)  # w = 0: the unconditional branch alone
        assert torch.equal(uncond, unet(x, t))


@pytest.mark.parametrize("kind", ["spiking", "ann"])
@pytest.mark.parametrize("w", [0.5, 2.0, 4.5])
def test_guided_output_is_the_formula_from_two_calls_in_one(kind, w):
    unet = tiny_unet(kind)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([5, 500, 999]), torch.tensor([2, 0, K])
    with torch.no_grad():
        cond, uncond = unet(x, t, y), unet(x, t)
        calls = count_calls(unet)
        guided = GuidedModel(unet, y, guidance=w)(x, t)
    assert calls == [(6, [2, 0, K, K, K, K])]  # one call: [y; null] on [x; x]
    expected = uncond + w * (cond - uncond)
    torch.testing.assert_close(guided, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(guided[:2], cond[:2], atol=1e-3)  # w != 1 moves it
    torch.testing.assert_close(guided[2], uncond[2], rtol=0, atol=1e-5)  # null label: uncond


def test_v_prediction_guides_like_eps():
    """The formula on v gives exactly the eps of the formula on eps (weights sum to 1)."""
    x, t = torch.randn(4, 1, 4, 4), torch.tensor([0, 10, 400, 999])
    y = torch.tensor([0, 1, 2, 0])
    w = 3.0
    v_model = ClassGaussians("v")
    guided_v = GuidedModel(v_model, y, w, num_classes=K)(x, t)
    eps_c = output_to_eps(v_model(x, t, y), x, t, SCHEDULE, "v")
    eps_u = output_to_eps(v_model(x, t, torch.full_like(y, K)), x, t, SCHEDULE, "v")
    torch.testing.assert_close(
        output_to_eps(guided_v, x, t, SCHEDULE, "v"), eps_u + w * (eps_c - eps_u)
    )


# ---------------------------------------------------------------- through every sampler
SAMPLER_ARGS = [("ddpm", {"steps": 100}), ("ddim", {"steps": 50}), ("dpm-solver++", {})]


@pytest.mark.parametrize("sampler, kwargs", SAMPLER_ARGS)
@pytest.mark.parametrize("w", [1.0, 2.5])
def test_guided_sampling_is_sampling_the_guided_gaussian(sampler, kwargs, w):
    """With a common S, guiding class k with w is exactly the predictor of the Gaussian
    N(NULL_MEAN + w (MEANS[k] - NULL_MEAN), S^2): every sampler must give the images that
    predictor gives, from the same noise and seeds."""
    labels = cycle_labels(12, range(K))
    x_T = initial_noise(12, (1, 8, 8), seed=3)
    model = ClassGaussians()
    x0 = sample(GuidedModel(model, labels, w, num_classes=K), x_T, sampler, seed=3, **kwargs)
    steps = kwargs.get("steps", 20)
    assert [len(c) for c in model.calls] == [12 if w == 1 else 24] * steps
    for k in range(K):
        oracle = GaussianEps(SCHEDULE, NULL_MEAN + w * (MEANS[k] - NULL_MEAN), S)
        expected = sample(oracle, x_T, sampler, seed=3, **kwargs)
        rows = labels == k
        torch.testing.assert_close(x0[rows], expected[rows], rtol=0, atol=1e-4)
        assert not torch.allclose(x0[rows], x0[~rows][: int(rows.sum())], atol=0.05)


@pytest.mark.parametrize("sampler, kwargs", [("ddpm", {"steps": 30}), ("ddim", {"eta": 0.8})])
def test_images_do_not_depend_on_the_batch(sampler, kwargs):
    model = ClassGaussians()
    kwargs = {"steps": 20, **kwargs}

    def run(idx):
        guided = GuidedModel(model, cycle_labels(idx, [2, 0]), 2.5, num_classes=K)
        return sample(guided, initial_noise(idx, (1, 4, 4), seed=9), sampler, seed=9,
                      indices=idx, **kwargs)  # fmt: skip

    whole = run(list(range(7)))
    for size in (1, 3):
        parts = [run(list(range(s, min(s + size, 7)))) for s in range(0, 7, size)]
        assert torch.equal(torch.cat(parts), whole), size


@pytest.mark.parametrize("sampler, kwargs", SAMPLER_ARGS)
def test_sampling_the_unet_calls_it_once_per_step_with_2b_images(sampler, kwargs):
    unet = tiny_unet()
    calls = count_calls(unet)
    y = torch.tensor([1, 2])
    steps = 3
    out = sample(GuidedModel(unet, y, 1.5), initial_noise(2, (1, 8, 8)), sampler, steps=steps)
    assert calls == [(4, [1, 2, K, K])] * steps
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_threshold_guidance_reaches_the_wrapped_neurons():
    unet = tiny_unet()
    before = get_thresholds(unet)
    seen = []
    unet.register_forward_pre_hook(lambda m, args: seen.append(set(get_thresholds(m))))
    guided = GuidedModel(unet, [0, 1], 2.0)
    out = sample(guided, initial_noise(2, (1, 8, 8)), "dpm-solver++", steps=2, threshold=1.25)
    assert seen == [{1.25}, {1.25}]
    assert get_thresholds(unet) == before
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("w, per_step", [(1.0, 1), (3.0, 2)])
def test_energy_meter_on_the_unet_counts_two_evaluations_per_guided_step(w, per_step):
    """Metering the wrapped U-Net: a guided image costs 2 U-Net evaluations per step (one call
    of 2B images), a w = 1 image one."""
    from sddpm.evaluation.energy import EnergyMeter

    unet = tiny_unet()
    with EnergyMeter(unet) as meter:
        sample(GuidedModel(unet, [0, 1], w), initial_noise(2, (1, 8, 8)), "ddim", steps=3)
    report = meter.report(num_images=2)
    assert (meter.model_calls, meter.evaluations) == (3, 2 * 3 * per_step)
    assert report.calls_per_image == 3 * per_step


# ---------------------------------------------------------------- bad input
def test_bad_input_is_refused_before_any_call():
    unet = tiny_unet()
    calls = count_calls(unet)
    with pytest.raises(ValueError, match=r"3 labels were given for a batch of 2 images"):
        sample(GuidedModel(unet, [0, 1, 2], 2.0), initial_noise(2, (1, 8, 8)), "ddim", steps=2)
    with pytest.raises(ValueError, match="1-channel"):  # the U-Net's own checks still run
        sample(GuidedModel(unet, [0, 1], 2.0), torch.zeros(2, 3, 8, 8), "ddim", steps=2)
    assert calls == []
    with pytest.raises(ValueError, match=r"got values 0\.\.4"):
        GuidedModel(unet, [0, 4], 2.0)
    with pytest.raises(ValueError, match="guidance must be a finite number >= 0"):
        GuidedModel(unet, [0], -1.0)
    with pytest.raises(ValueError, match="guidance must be a finite number >= 0"):
        GuidedModel(unet, [0], math.nan)
    plain = build_model(unet.config.replace(num_classes=0))
    with pytest.raises(ValueError, match="unconditional model"):
        GuidedModel(plain, [0], 2.0)


def test_cycle_labels():
    assert cycle_labels(7, range(3)).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert cycle_labels([4, 5, 9], [3, 7]).tolist() == [3, 7, 7]
    assert cycle_labels(3, [5]).tolist() == [5, 5, 5]
    with pytest.raises(ValueError, match="at least one class"):
        cycle_labels(3, [])


# ---------------------------------------------------------------- label dropout
def test_label_dropout_rate_and_seed():
    n, p, null = 100_000, 0.1, 10
    y = torch.arange(n) % 10
    out = drop_labels(y, p, null, torch.Generator().manual_seed(0))
    dropped = out == null
    # exactly the positions whose uniform from the same stream is below p
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dropped, u < p)
    assert torch.equal(out[~dropped], y[~dropped]) and torch.equal(y, torch.arange(n) % 10)
    # the rate: within 5 standard deviations of n p
    assert abs(int(dropped.sum()) - n * p) < 5 * math.sqrt(n * p * (1 - p))
    # seeded: the same seed repeats, another differs; the stream advances per call
    g = torch.Generator().manual_seed(0)
    assert torch.equal(drop_labels(y, p, null, g), out)
    assert not torch.equal(drop_labels(y, p, null, g), out)
    assert not torch.equal(drop_labels(y, p, null, torch.Generator().manual_seed(1)), out)


def test_label_dropout_edges():
    y = torch.tensor([0, 1, 2, 3])
    g = torch.Generator().manual_seed(0)
    assert torch.equal(drop_labels(y, 0.0, 4, g), y)
    assert drop_labels(y, 1.0, 4, g).tolist() == [4, 4, 4, 4]
    assert g.initial_seed() == 0 and not torch.equal(
        g.get_state(), torch.Generator().manual_seed(0).get_state()
    )  # drawn even at p = 0 and 1: the stream position does not depend on p
    for bad in (-0.1, 1.5, math.nan, True):
        with pytest.raises(ValueError, match=r"probability must be in \[0, 1\]"):
            drop_labels(y, bad, 4, g)
    with pytest.raises(ValueError, match="integer"):
        drop_labels(y.float(), 0.1, 4, g)
    with pytest.raises(ValueError, match="null_class must be the model's num_classes"):
        drop_labels(y, 0.1, 0, g)


def test_label_dropout_uniforms_are_a_function_of_seed_and_step():
    u = label_dropout_uniforms(7, 5, 64)
    assert u.shape == (64,) and u.dtype == torch.float32 and u.device.type == "cpu"
    assert bool((u >= 0).all() and (u < 1).all())
    # nothing but (seed, step): the same pair repeats, whatever was drawn before
    label_dropout_uniforms(7, 4, 64)
    assert torch.equal(label_dropout_uniforms(7, 5, 64), u)
    assert not torch.equal(label_dropout_uniforms(7, 6, 64), u)
    assert not torch.equal(label_dropout_uniforms(8, 5, 64), u)
    # the step's own stream of the run's seed, apart from the per-image sampling streams
    gen = torch.Generator().manual_seed(image_seed(7, 5, 2))
    assert torch.equal(u, torch.rand(64, generator=gen))
    assert torch.equal(u, torch.rand(64, generator=label_dropout_generator(7, 5)))
    for stream in (0, 1):
        other = torch.Generator().manual_seed(image_seed(7, 5, stream))
        assert not torch.equal(u, torch.rand(64, generator=other))
    assert label_dropout_uniforms(7, 5, 0).shape == (0,)
    with pytest.raises(ValueError, match="batch_size"):
        label_dropout_uniforms(7, 5, -1)


def test_label_dropout_from_given_uniforms():
    y = torch.arange(6) % 3
    u = torch.tensor([0.0, 0.2, 0.29, 0.3, 0.9, 1 - 2**-24])  # 1 - 2^-24: float32's last < 1
    assert drop_labels(y, 0.3, 3, uniforms=u).tolist() == [3, 3, 3, 0, 1, 2]  # u < p
    # p = 0 drops nothing (not even u = 0), p = 1 everything (even the largest u < 1)
    assert torch.equal(drop_labels(y, 0.0, 3, uniforms=u), y)
    assert drop_labels(y, 1.0, 3, uniforms=u).tolist() == [3] * 6
    assert torch.equal(y, torch.arange(6) % 3)  # not modified
    with pytest.raises(ValueError, match="exactly one of generator= and uniforms="):
        drop_labels(y, 0.3, 3)
    with pytest.raises(ValueError, match="exactly one of generator= and uniforms="):
        drop_labels(y, 0.3, 3, torch.Generator(), uniforms=u)
    with pytest.raises(ValueError, match="one uniform per label"):
        drop_labels(y, 0.3, 3, uniforms=u[:5])
    with pytest.raises(ValueError, match="floating-point tensor"):
        drop_labels(y, 0.3, 3, uniforms=torch.zeros(6, dtype=torch.int64))


@pytest.mark.parametrize("p", [0.0, 0.05, 0.1, 0.5, 1.0])
def test_label_dropout_rate_over_many_steps(p):
    """Dropped iff u < p with u uniform on [0, 1): probability exactly p (0 and 1 included).
    Counted over 400 steps x 256 labels of one seed: within 5 standard deviations of n p, and
    so is every quarter of the global batch (no position is favoured)."""
    steps, batch, null = 400, 256, 10
    y = torch.arange(batch) % 10
    dropped = torch.stack(
        [
            drop_labels(y, p, null, uniforms=label_dropout_uniforms(0, step, batch)) == null
            for step in range(steps)
        ]
    )
    for part in (dropped, *dropped.chunk(4, dim=1)):
        n = part.numel()
        sd = math.sqrt(n * p * (1 - p))
        assert abs(int(part.sum()) - n * p) <= 5 * sd, (p, int(part.sum()), n)
    if p in (0.0, 1.0):
        assert bool((dropped == bool(p)).all())


# ---------------------------------------------------------------- sample(labels=, guidance=)
class Conditional(nn.Module):
    """The plain conditional model ``model(x, t, y)`` for fixed labels, without the wrapper."""

    def __init__(self, model, y):
        super().__init__()
        self.model, self.y = model, y

    def forward(self, x, t):
        return self.model(x, t, self.y)


@pytest.mark.parametrize("sampler, kwargs", [("ddim", {"steps": 3}), ("ddpm", {"steps": 3})])
def test_sample_with_labels_and_w_1_is_the_plain_conditional_sample(sampler, kwargs):
    unet = tiny_unet()
    y = torch.tensor([2, 0, 1])
    x_T = initial_noise(3, (1, 8, 8), seed=5)
    plain = sample(Conditional(unet, y), x_T, sampler, seed=5, **kwargs)
    calls = count_calls(unet)
    guided = sample(unet, x_T, sampler, seed=5, labels=y, guidance=1.0, **kwargs)
    assert torch.equal(guided, plain)
    assert calls == [(3, [2, 0, 1])] * 3  # no unconditional branch at all
    opts = SamplingOptions(sampler=sampler, seed=5, labels=[2, 0, 1], guidance=1.0, **kwargs)
    assert torch.equal(sample(unet, x_T, options=opts), plain)
    # the default guidance of a labelled sample is DEFAULT_GUIDANCE
    default = sample(unet, x_T, sampler, seed=5, labels=y, **kwargs)
    w = sample(unet, x_T, sampler, seed=5, labels=y, guidance=DEFAULT_GUIDANCE, **kwargs)
    assert torch.equal(default, w)


class ConfiguredGaussians(ClassGaussians):
    config = SimpleNamespace(num_classes=K)  # what sample() reads the class count from


@pytest.mark.parametrize("w", [0.0, 2.5])
def test_sample_with_guidance_is_the_guided_gaussian_and_cycles_labels_by_index(w):
    model = ConfiguredGaussians()
    idx = [5, 6, 7, 8]
    x_T = initial_noise(idx, (1, 4, 4), seed=1)
    x0 = sample(model, x_T, "ddim", steps=10, labels=(1, 2), guidance=w, indices=idx, seed=1)
    labels = [2, 1, 2, 1]  # image i: (1, 2)[i % 2], by its global index
    assert model.calls[0] == ([K] * 4 if w == 0 else labels + [K] * 4)  # w = 0: null alone
    for b, k in enumerate(labels):
        oracle = GaussianEps(SCHEDULE, NULL_MEAN + w * (MEANS[k] - NULL_MEAN), S)
        expected = sample(oracle, x_T[b : b + 1], "ddim", steps=10, seed=1)
        torch.testing.assert_close(x0[b : b + 1], expected, rtol=0, atol=1e-4)


def test_sample_labels_bad_input():
    unet = tiny_unet()
    x_T = initial_noise(2, (1, 8, 8))
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\] or 3"):
        sample(unet, x_T, "ddim", steps=1, labels=[0, 4])
    with pytest.raises(ValueError, match="needs class labels"):
        sample(unet, x_T, "ddim", steps=1, guidance=2.0)
    with pytest.raises(ValueError, match="guidance must be a finite number >= 0"):
        sample(unet, x_T, "ddim", steps=1, labels=[0, 1], guidance=-1.0)
    plain = build_model(tiny_unet_config()).eval()
    with pytest.raises(ValueError, match="unconditional model"):
        sample(plain, x_T, "ddim", steps=1, labels=[0, 1])


def test_generation_spreads_a_conditional_model_over_its_classes_whatever_the_batch():
    from sddpm.generation import generate

    unet = tiny_unet()
    calls = count_calls(unet)
    kw = dict(sampler="ddim", steps=2, guidance=2.0, progress=False, fold_bn=False)
    whole = generate(unet, 7, (1, 8, 8), batch_size=7, **kw)
    assert calls == [(14, [0, 1, 2, 0, 1, 2, 0] + [K] * 7)] * 2  # image i: class i mod K
    calls.clear()
    parts = generate(unet, 7, (1, 8, 8), batch_size=3, **kw)
    assert [c[1][: c[0] // 2] for c in calls[::2]] == [[0, 1, 2], [0, 1, 2], [0]]
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="labels must be class indices"):
        generate(unet, 2, (1, 8, 8), labels=[5], sampler="ddim", steps=1, progress=False)
