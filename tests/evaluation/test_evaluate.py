"""Generation + scoring: fid-stats, evaluate, sweep-threshold (library and CLI), DDP split.

Everything runs offline in seconds: a tiny saved U-Net, the digits proxy network (trained once
into a temporary cache), and, for the Inception code path, a small network shaped like the FID
Inception injected through the library API (the real one needs its weights and minutes of CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from sddpm.cli import app
from sddpm.data import build_dataset
from sddpm.diffusion import DEFAULT_GUIDANCE
from sddpm.evaluation import (
    EvaluationResult,
    FeatureNetwork,
    FIDInceptionV3,
    InceptionOutput,
    SampleScores,
    SweepResult,
    digits_report_from_probs,
    digits_sample_report,
    evaluate_model,
    frechet_distance,
    generate_and_score,
    inception_score,
    kernel_inception_distance,
    load_digits_feature_net,
    parse_threshold_values,
    score_dataset,
    shard_indices,
    sweep_threshold,
    write_stats_file,
)
from sddpm.finite import NonFiniteError
from sddpm.generation import generate, load_for_sampling
from sddpm.models import build_model, save_pretrained

from unet_configs import tiny_unet_config

T = 50


@pytest.fixture(scope="module", autouse=True)
def cache_env(tmp_path_factory):
    """The digits network is trained once into a temporary cache (also for subprocesses).

    One thread: these models are tiny, and on busy shared cores a second thread only adds
    contention (measured 5x slower per U-Net call)."""
    cache = tmp_path_factory.mktemp("sddpm-cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SDDPM_CACHE_DIR", str(cache))
        yield cache
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_net(cache_env):
    return load_digits_feature_net(cache_env)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = tiny_unet_config(diffusion_steps=T)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()(torch.randn(8, 1, 8, 8), torch.randint(0, T, (8,)))  # BN running stats
    path = tmp_path_factory.mktemp("run") / "model"
    return _save_with_schedule(model, path, T)


def _save_with_schedule(model, path, T: int):
    """``model`` (eval mode) as a model directory whose checkpoint has the ``diffusion``
    section training writes: the linear schedule over ``T`` steps, eps prediction."""
    extra = {
        "diffusion": {
            "schedule": {"kind": "linear", "T": T, "beta_1": 1e-4, "beta_T": 0.02},
            "prediction": "eps",
        }
    }
    save_pretrained(model.eval(), path, extra=extra)
    return path


@pytest.fixture(scope="module")
def setup(model_dir):
    return load_for_sampling(model_dir)


@pytest.fixture(scope="module")
def digits_stats(tmp_path_factory, digits_net):
    """``sddpm fid-stats --dataset digits --features digits --keep-features``."""
    out = tmp_path_factory.mktemp("stats") / "digits.npz"
    args = ["fid-stats", "--dataset", "digits", "--features", "digits", "--keep-features"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "NOT comparable to published" in result.output
    return out


def all_digits01() -> torch.Tensor:
    ds = build_dataset("digits", hflip=False)
    return (torch.stack([ds[i] for i in range(len(ds))]) + 1) / 2


def np_stats(features) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features, dtype=np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def run_cli(args: list[str]):
    return CliRunner().invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------ fid-stats


def test_fid_stats_digits_equals_numpy(digits_stats, digits_net, tmp_path):
    feats = digits_net.features(all_digits01()).double().numpy()
    mu, sigma = np_stats(feats)
    with np.load(digits_stats) as f:
        assert sorted(f.files) == ["features", "mu", "sigma"]
        assert f["mu"].shape == (128,) and f["sigma"].shape == (128, 128)
        np.testing.assert_allclose(f["mu"], mu, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(f["sigma"], sigma, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(f["features"], feats, rtol=1e-5, atol=1e-6)
        assert f["features"].shape == (1797, 128)

    # --num takes the first N images; without --keep-features only mu and sigma are written
    out = tmp_path / "s500.npz"
    args = ["fid-stats", "--dataset", "digits", "--features", "digits", "--num", 500]
    result = run_cli([*args, "--batch-size", 64, "--out", out])
    assert result.exit_code == 0, result.output
    mu500, sigma500 = np_stats(feats[:500])
    with np.load(out) as f:
        assert sorted(f.files) == ["mu", "sigma"]
        np.testing.assert_allclose(f["mu"], mu500, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(f["sigma"], sigma500, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ evaluate (digits, CLI)


def test_evaluate_cli_digits_matches_hand_computation(
    model_dir, setup, digits_stats, digits_net, tmp_path
):
    out = tmp_path / "metrics.json"
    args = ["evaluate", "--run", model_dir, "--num", 12, "--sampler", "ddim", "--steps", 3]
    args += ["--threshold", 1.002, "--seed", 3, "--batch-size", 5, "--stats", digits_stats]
    result = run_cli([*args, "--features", "digits", "--out", out])
    assert result.exit_code == 0, result.output
    assert "proxy FID" in result.output and "NOT comparable to published" in result.output
    m = json.loads(out.read_text())

    images = generate(
        setup.model,
        12,
        (1, 8, 8),
        sampler="ddim",
        steps=3,
        threshold=1.002,
        seed=3,
        batch_size=5,
        schedule=setup.schedule,
        progress=False,
    )
    x01 = ((images + 1) / 2).clamp(0, 1)
    feats = digits_net.features(x01).double().numpy()
    with np.load(digits_stats) as f:
        ref_mu, ref_sigma, ref_feats = f["mu"], f["sigma"], f["features"]
    fid = frechet_distance(*np_stats(feats), ref_mu, ref_sigma)
    is_mean, is_std = inception_score(digits_net.probs(x01), splits=10)
    kid_mean, kid_std = kernel_inception_distance(feats, ref_feats)
    report = digits_sample_report(x01, digits_net)

    assert "fid" not in m and "inception_score" not in m  # proxy numbers have proxy names
    assert m["proxy_fid"] == pytest.approx(fid, rel=1e-6)
    assert m["proxy_fid"] > 10  # an untrained model: far from the digits
    assert m["proxy_inception_score"]["mean"] == pytest.approx(is_mean, rel=1e-5)
    assert m["proxy_inception_score"]["std"] == pytest.approx(is_std, rel=1e-4, abs=1e-6)
    assert m["proxy_inception_score"]["splits"] == 10
    assert m["proxy_kid"]["mean"] == pytest.approx(kid_mean, rel=1e-5)
    assert m["proxy_kid"]["std"] == pytest.approx(kid_std, rel=1e-4)
    assert m["proxy_kid"]["num_reference"] == 1797 and m["proxy_kid"]["subset_size"] == 12
    assert m["comparable_to_published"] is False and "NOT comparable" in m["note"]
    assert m["feature_network"] == "digits" and m["feature_dim"] == 128
    for k in ("confident_fraction", "class_coverage", "class_counts"):
        assert m["digits_report"][k] == pytest.approx(report[k])
    assert m["digits_report"]["classes_present"] == sum(c > 0 for c in report["class_counts"])
    assert m["num_images"] == 12 and m["world_size"] == 1
    assert (m["sampler"], m["steps"], m["threshold"], m["seed"]) == ("ddim", 3, 1.002, 3)
    assert m["checkpoint"] == str(model_dir.resolve())
    assert m["stats"] == str(digits_stats)


def test_digits_report_from_probs_equals_sample_report(digits_net):
    x = all_digits01()[:300]
    mine = digits_report_from_probs(digits_net.probs(x), digits_net.test_accuracy)
    ref = digits_sample_report(x, digits_net)
    for k, v in ref.items():
        assert mine[k] == pytest.approx(v), k
    assert mine["classes_present"] == 10


# ------------------------------------------------------------------ Inception path (injected)


class TinyInception(nn.Module):
    """Shaped like FIDInceptionV3 (``fc``, ``InceptionOutput``), 8-d features, 5 classes."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> InceptionOutput:
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        pool = torch.tanh(self.conv(2 * x - 1)).mean(dim=(2, 3))
        return InceptionOutput(pool=pool, prob=torch.softmax(F.linear(pool, self.fc.weight), 1))


def test_feature_network_wraps_the_fid_inception():
    net = FeatureNetwork.inception(FIDInceptionV3())
    assert (net.name, net.dim, net.num_classes, net.proxy) == ("inception", 2048, 1008, False)


def test_evaluate_with_injected_inception_network(setup, tmp_path):
    net = FeatureNetwork.inception(TinyInception())
    ref = score_dataset(build_dataset("digits"), net, num=60, keep_features=True, progress=False)
    stats = write_stats_file(tmp_path / "ref.npz", ref)
    kw = dict(sampler="ddpm", steps=4, seed=1, batch_size=3, progress=False)
    result = evaluate_model(setup, net, stats, 8, is_splits=2, checkpoint="ckpt", **kw)

    images = generate(setup.model, 8, (1, 8, 8), schedule=setup.schedule, **kw)
    out = net.module(((images + 1) / 2).clamp(0, 1))
    feats = out.pool.double().numpy()
    x_ref = all_digits01()[:60]
    ref_feats = net.module(x_ref).pool.double().numpy()
    fid = frechet_distance(*np_stats(feats), *np_stats(ref_feats))
    d = result.to_dict()
    assert d["fid"] == pytest.approx(fid, rel=1e-6) and d["fid"] > 0
    mean, std = inception_score(out.prob, splits=2)
    assert d["inception_score"] == {
        "mean": pytest.approx(mean, rel=1e-6),
        "std": pytest.approx(std, rel=1e-5, abs=1e-7),
        "splits": 2,
    }
    kid = kernel_inception_distance(feats, ref_feats)
    assert d["kid"]["mean"] == pytest.approx(kid[0], rel=1e-5)
    assert d["kid"]["subset_size"] == 8 and d["kid"]["num_reference"] == 60
    assert d["comparable_to_published"] is True and "note" not in d and "digits_report" not in d
    assert (d["feature_network"], d["feature_dim"], d["checkpoint"]) == ("inception", 8, "ckpt")

    # stats without features: KID is null with a reason; IS needs >= splits images
    plain = write_stats_file(
        tmp_path / "plain.npz", SampleScores(ref.stats, ref.indices, ref.probs)
    )
    r2 = evaluate_model(setup, net, plain, 8, **kw).to_dict()
    assert r2["kid"] is None and "--keep-features" in r2["kid_note"]
    assert r2["inception_score"] is None and "10 images" in r2["inception_score_note"]
    assert r2["fid"] == pytest.approx(d["fid"], rel=1e-12)


# ------------------------------------------------------------------ DDP split


def test_two_simulated_ranks_merge_to_the_single_process_result(setup, digits_net):
    net = FeatureNetwork.digits(digits_net)
    # batch_size=1: every image is generated and scored alone, so shards see the same numbers
    kw = dict(sampler="ddpm", steps=3, seed=5, batch_size=1, keep_features=True, progress=False)
    assert shard_indices(7, 0, 2) == [0, 2, 4, 6] and shard_indices(7, 1, 2) == [1, 3, 5]
    whole = generate_and_score(setup, 7, net, **kw)
    r0 = generate_and_score(setup, 7, net, rank=0, world_size=2, **kw)
    r1 = generate_and_score(setup, 7, net, rank=1, world_size=2, **kw)
    assert (r0.count, r1.count) == (4, 3)
    merged = r1.merge(r0)
    assert merged.count == 7 and merged.indices.tolist() == list(range(7))
    np.testing.assert_allclose(merged.stats.mu, whole.stats.mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.stats.sigma, whole.stats.sigma, rtol=1e-10, atol=1e-12)
    assert torch.equal(merged.probs, whole.probs)
    assert torch.equal(merged.features, whole.features)
    assert inception_score(merged.probs, 7) == inception_score(whole.probs, 7)


def test_torchrun_two_processes_equal_one(model_dir, digits_stats, tmp_path):
    """The real thing: ``torchrun --nproc_per_node 2 sddpm evaluate`` (Gloo) vs one process."""
    args = ["evaluate", "--run", model_dir, "--num", 9, "--sampler", "ddpm", "--steps", 2]
    args += ["--batch-size", 1, "--seed", 2, "--stats", digits_stats, "--features", "digits"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    result = run_cli([*args, "--out", one])
    assert result.exit_code == 0, result.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    # `torchrun ... -- SCRIPT ARGS`: without the `--`, torchrun's parser takes --run and --num for
    # abbreviations of its own --run-path and --numa-binding.
    script = tmp_path / "sddpm_main.py"
    script.write_text("from sddpm.cli import main\nmain()\n")
    proc = subprocess.run(
        [*cmd, "--", str(script), *map(str, args), "--out", str(two)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert b["num_images"] == 9
    assert b["proxy_fid"] == pytest.approx(a["proxy_fid"], rel=1e-9)
    assert b["proxy_kid"]["mean"] == pytest.approx(a["proxy_kid"]["mean"], rel=1e-9)
    assert b["digits_report"] == a["digits_report"]
    assert proc.stdout.count("wrote") == 1  # only rank 0 writes and prints


# ------------------------------------------------------------------ threshold sweep


def test_parse_threshold_values():
    values = parse_threshold_values("0.995:1.005:0.001")
    assert values == [round(0.995 + 0.001 * i, 3) for i in range(11)]
    assert values[-1] == 1.005 and values[2] == 0.997
    assert parse_threshold_values("0.99:1.01:0.01") == [0.99, 1.0, 1.01]
    assert parse_threshold_values("1:1.25:0.1") == [1.0, 1.1, 1.2]  # stop not on the grid
    assert parse_threshold_values(" 0.99, 1 ,1.01") == [0.99, 1.0, 1.01]
    assert parse_threshold_values("1.0") == [1.0]
    for bad in ("", "a", "0.9:1", "1:0.9:0.01", "0.9:1:0", "0.9:1:-0.1", "1,,2", "nan",
                "-1,1", "0:1:0.5", "1,1", "0.9:1:x", "0:1:0.000001"):  # fmt: skip
        with pytest.raises(ValueError, match="^sweep values"):
            parse_threshold_values(bad)


def test_sweep_threshold_cli(model_dir, digits_stats, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep-threshold", "--run", model_dir, "--values", "0.99:1.01:0.01"]
    args += ["--metric", "proxy-fid", "--num", 10, "--sampler", "ddim", "--steps", 3]
    result = run_cli([*args, "--stats", digits_stats, "--out", out])
    assert result.exit_code == 0, result.output
    assert "NOT comparable to published" in result.output
    table = json.loads((out / "sweep.json").read_text())
    rows = table["rows"]
    assert [r["threshold"] for r in rows] == [0.99, 1.0, 1.01]
    values = [r["proxy_fid"] for r in rows]
    best = int(np.argmin(values))
    assert [r["best"] for r in rows] == [i == best for i in range(3)]
    assert table["best"] == {"threshold": rows[best]["threshold"], "value": values[best]}
    assert table["metric"] == "proxy-fid" and table["comparable_to_published"] is False
    assert (table["num_images"], table["seed"], table["steps"]) == (10, 0, 3)
    lines = (out / "sweep.csv").read_text().splitlines()
    assert lines[0].startswith("threshold,proxy_fid,is_mean,is_std") and len(lines) == 4
    assert float(lines[1 + best].split(",")[1]) == pytest.approx(values[best])
    assert Image.open(out / "sweep.png").size[0] > 300
    assert f"best threshold {rows[best]['threshold']:g}" in result.output

    # a rerun finds every value done: nothing is generated, the files are the same
    import sddpm.generation as generation

    def no_generation(*args, **kwargs):
        raise AssertionError("a finished value was generated again")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generation, "generate_batches", no_generation)
        again = run_cli([*args, "--stats", digits_stats, "--out", out])
    assert again.exit_code == 0, again.output
    assert "resumed from" in again.output
    assert json.loads((out / "sweep.json").read_text())["rows"] == rows


def test_sweep_uses_the_same_seeds_for_every_value(setup, digits_net, digits_stats):
    net = FeatureNetwork.digits(digits_net)
    kw = dict(sampler="ddim", steps=2, seed=4, batch_size=8, progress=False)
    sweep = sweep_threshold(
        setup, net, digits_stats, [1.0, 1.0 + 1e-9], 8, metric="proxy-fid", **kw
    )
    # a threshold change too small to flip a spike gives the same images, so the same numbers
    assert sweep.values[0] == pytest.approx(sweep.values[1], rel=1e-12)
    with pytest.raises(ValueError, match="inception feature network"):
        sweep_threshold(setup, net, digits_stats, [1.0], 8, metric="fid", **kw)


# ------------------------------------------------------------------ bad input


def test_bad_inputs_fail_clearly_and_write_nothing(model_dir, digits_stats, tmp_path):
    out = tmp_path / "m.json"
    base = ["evaluate", "--num", 4, "--steps", 2, "--stats", digits_stats, "--out", out]
    digits = ["--features", "digits"]
    empty_run = tmp_path / "empty-run"
    empty_run.mkdir()
    steps_range = f"steps must be an integer in [1, {T}] (the schedule length)"
    cases = [
        # digits statistics, Inception features: refused before any network is loaded
        ([*base, "--run", model_dir, "--features", "inception"], "feature dimension mismatch"),
        ([*base, "--run", model_dir, *digits, "--num", 1], "at least 2 images"),
        ([*base, "--run", empty_run, *digits], "holds no checkpoint"),
        ([*base, "--run", model_dir, *digits, "--threshold", 0], "threshold must be"),
        ([*base, "--run", model_dir, *digits, "--threshold", -0.5], "threshold must be"),
        ([*base, "--run", model_dir, *digits, "--steps", T + 1], f"--steps: {steps_range}"),
        ([*base, "--run", model_dir, "--features", "vgg"], "--features must be one of"),
        ([*base, "--run", model_dir, *digits, "--stats", tmp_path / "no.npz"], "not found"),
        ([*base, "--run", model_dir, *digits, "--device", "bogus"], "not a device name"),
    ]
    for args, message in cases:
        result = run_cli(args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (message, result.output)
        assert not out.exists()

    sweep_out = tmp_path / "sweep"
    sweep = ["sweep-threshold", "--run", model_dir, "--num", 4, "--steps", 2, "--out", sweep_out]
    for extra, message in [
        (["--values", "0.99:1.01", "--metric", "proxy-fid"], "--values must be"),
        (["--values", "0,1", "--metric", "proxy-fid"], "must be > 0"),
        (["--values", "1", "--metric", "fid"], "feature dimension mismatch"),
        (["--values", "1", "--metric", "psnr"], "--metric must be one of"),
    ]:
        result = run_cli([*sweep, *extra, "--stats", digits_stats])
        assert result.exit_code == 2, result.output
        assert message in result.output, (message, result.output)
        assert not sweep_out.exists()

    result = run_cli(["fid-stats", "--dataset", "digits", "--features", "digits", "--num", 1,
                      "--out", tmp_path / "s.npz"])  # fmt: skip
    assert result.exit_code == 2 and "at least 2 images" in result.output
    assert not (tmp_path / "s.npz").exists()


def test_evaluate_cli_speed_options(model_dir, digits_stats, tmp_path):
    """--neuron-kernel compiled gives the same numbers; --bf16 nearly the same, and says so."""
    args = ["evaluate", "--run", model_dir, "--num", 6, "--steps", 2, "--batch-size", 3]
    args += ["--stats", digits_stats, "--features", "digits"]
    scores, flags = {}, {}
    for name, extra in {
        "eager": [],
        "compiled": ["--neuron-kernel", "compiled"],
        "bf16": ["--bf16"],
    }.items():
        out = tmp_path / f"{name}.json"
        result = run_cli([*args, *extra, "--out", out])
        assert result.exit_code == 0, result.output
        m = json.loads(out.read_text())
        scores[name] = (m["proxy_fid"], m["proxy_inception_score"], m["digits_report"])
        flags[name] = m["bf16"]
    assert scores["compiled"] == scores["eager"]
    assert flags == {"eager": False, "compiled": False, "bf16": True}
    # bf16 changes the images a little (1401.9 -> 1402.5 here), not the scoring
    assert scores["bf16"][0] != scores["eager"][0]
    assert scores["bf16"][0] == pytest.approx(scores["eager"][0], rel=0.01)
    bad = run_cli([*args, "--neuron-kernel", "fast", "--out", tmp_path / "x.json"])
    assert bad.exit_code != 0 and "kernel" in bad.output


# ------------------------------------------------------------------ threshold changes the images


def test_sweep_thresholds_change_the_numbers(setup, digits_net, digits_stats):
    """A sweep that ignored its thresholds would give one number for all of them."""
    net = FeatureNetwork.digits(digits_net)
    kw = dict(sampler="ddim", steps=2, seed=4, batch_size=8, progress=False)
    sweep = sweep_threshold(setup, net, digits_stats, [0.8, 1.0, 1.25], 8, metric="proxy-fid", **kw)
    assert len(set(sweep.values)) == 3, sweep.values
    # each value is what evaluate_model gives with that threshold
    alone = evaluate_model(setup, net, digits_stats, 8, threshold=1.25, **kw)
    assert alone.fid == sweep.values[2]


# ------------------------------------------------------------------ resumable sweeps


def test_a_sweep_killed_midway_resumes_without_redoing_values(
    setup, digits_net, digits_stats, tmp_path, monkeypatch
):
    import sddpm.generation as generation

    net = FeatureNetwork.digits(digits_net)
    kw = dict(sampler="ddim", steps=2, seed=1, batch_size=4, metric="proxy-fid", progress=False)
    values = [0.9, 1.0, 1.1]
    whole = sweep_threshold(setup, net, digits_stats, values, 6, **kw)

    real = generation.generate_batches
    thresholds = []

    def counting(model, indices, shape, options, **k):
        thresholds.append(options.threshold)
        if len(thresholds) == 2 and kill:
            raise KeyboardInterrupt("killed")  # the job is stopped during the second value
        return real(model, indices, shape, options, **k)

    monkeypatch.setattr(generation, "generate_batches", counting)
    out = tmp_path / "sweep"
    kill = True
    with pytest.raises(KeyboardInterrupt):
        sweep_threshold(setup, net, digits_stats, values, 6, out_dir=out, **kw)
    saved = json.loads((out / "sweep.json").read_text())
    assert [r["threshold"] for r in saved["rows"]] == [0.9]  # written as soon as it was done
    assert thresholds == [0.9, 1.0]

    kill, thresholds[:] = False, []
    resumed = sweep_threshold(setup, net, digits_stats, values, 6, out_dir=out, **kw)
    assert thresholds == [1.0, 1.1]  # 0.9 is not generated again
    assert resumed.thresholds == values and resumed.values == whole.values
    assert resumed.best == whole.best
    thresholds[:] = []
    again = sweep_threshold(setup, net, digits_stats, values, 6, out_dir=out, **kw)
    assert thresholds == [] and again.values == whole.values
    saved = json.loads((out / "sweep.json").read_text())
    assert [r["threshold"] for r in saved["rows"]] == values

    # a folder holding a sweep of other settings is refused, not mixed in
    with pytest.raises(ValueError, match=r"other settings: steps 2 \(now 3\)"):
        sweep_threshold(setup, net, digits_stats, values, 6, out_dir=out, **{**kw, "steps": 3})
    assert thresholds == []


def test_sweep_best_is_never_a_nan_row():
    def result(fid):
        return EvaluationResult("digits", 128, True, 4, fid, None, 10, None)

    sweep = SweepResult(
        "proxy-fid", [0.9, 1.0, 1.1], [result(float("nan")), result(3.0), result(2.0)]
    )
    assert sweep.best == 2
    sweep = SweepResult("proxy-fid", [0.9, 1.0], [result(float("nan")), result(5.0)])
    assert sweep.best == 1
    with pytest.raises(NonFiniteError, match="no threshold gave a finite proxy-fid"):
        _ = SweepResult("proxy-fid", [1.0], [result(float("nan"))]).best


def test_evaluation_result_round_trips_through_json(setup, digits_net, digits_stats):
    net = FeatureNetwork.digits(digits_net)
    result = evaluate_model(setup, net, digits_stats, 6, steps=2, batch_size=3, progress=False)
    d = json.loads(json.dumps(result.to_dict()))
    assert EvaluationResult.from_dict(d).to_dict() == d
    assert d["proxy_kid"] is not None and d["proxy_inception_score"] is None
    assert d["feature_tf32"] is False and d["feature_dtype"] == "float32"
    assert (d["steps"], d["spacing"], d["batch_size"], d["device"]) == (2, "uniform", 3, "cpu")


# ------------------------------------------------------------------ non-finite values


def test_nan_features_stop_the_evaluation_naming_the_stage(setup, tmp_path):
    class NaNInception(TinyInception):
        def forward(self, images):
            out = super().forward(images)
            return InceptionOutput(pool=out.pool * float("nan"), prob=out.prob)

    ok = FeatureNetwork.inception(TinyInception())
    ref = score_dataset(build_dataset("digits"), ok, num=20, progress=False)
    stats = write_stats_file(tmp_path / "ref.npz", ref)
    net = FeatureNetwork.inception(NaNInception())
    with pytest.raises(NonFiniteError, match="inception features of images 0..3: 32 of 32"):
        evaluate_model(setup, net, stats, 8, steps=2, batch_size=4, progress=False)


def test_nan_weights_evaluate_refuses_and_writes_nothing(model_dir, digits_stats, tmp_path):
    from sddpm.models import load_pretrained

    model = load_pretrained(model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    bad = tmp_path / "nan-model"
    save_pretrained(model, bad)
    out = tmp_path / "m.json"
    args = ["evaluate", "--checkpoint", bad, "--num", 4, "--steps", 2, "--features", "digits"]
    result = run_cli([*args, "--stats", digits_stats, "--out", out])
    assert result.exit_code == 2, result.output
    assert "the model's weights hold NaN or infinite values" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_json_refuses_nan(tmp_path):
    from sddpm.io import write_json

    with pytest.raises(ValueError, match=r"x\.json: not written, it would hold NaN"):
        write_json(tmp_path / "x.json", {"fid": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_feature_networks_run_without_tf32_and_restore_it():
    seen = []

    class Spy(TinyInception):
        def forward(self, images):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
            return super().forward(images)

    net = FeatureNetwork.inception(Spy())
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        net(torch.rand(2, 3, 8, 8))
        assert seen == [(False, False)]
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (
            True,
            True,
        )
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ------------------------------------------------------------------ class-conditional models


@pytest.fixture(scope="module")
def cond_model_dir(tmp_path_factory):
    cfg = tiny_unet_config(diffusion_steps=T, num_classes=4)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        nn.init.normal_(model.head.conv.weight, std=0.3)
        model.class_embed.weight.normal_(0, 2.0)
    model.train()(torch.randn(8, 1, 8, 8), torch.randint(0, T, (8,)))  # BN running stats
    path = tmp_path_factory.mktemp("cond") / "model"
    return _save_with_schedule(model, path, T)


def record_labels(monkeypatch):
    """The labels of every U-Net call (any copy of the model)."""
    from sddpm.models import UNet

    seen, real = [], UNet.forward

    def forward(self, x, t, y=None):
        seen.append(None if y is None else y.tolist())
        return real(self, x, t, y)

    monkeypatch.setattr(UNet, "forward", forward)
    return seen


def test_evaluate_spreads_labels_uniformly_over_the_classes(
    cond_model_dir, digits_net, digits_stats, monkeypatch
):
    setup = load_for_sampling(cond_model_dir)
    seen = record_labels(monkeypatch)
    net = FeatureNetwork.digits(digits_net)
    kw = dict(sampler="ddim", steps=2, batch_size=3, progress=False)
    result = evaluate_model(setup, net, digits_stats, 8, guidance=1.0, **kw)
    # image i of class i mod 4, chunk by chunk, once per step (guidance 1: one branch)
    chunks = [[0, 1, 2], [3, 0, 1], [2, 3]]
    assert seen == [c for c in chunks for _ in range(2)]
    assert result.settings["labels"] == [0, 1, 2, 3] and result.settings["guidance"] == 1.0
    # the same images as asking for the labels explicitly
    same = evaluate_model(setup, net, digits_stats, 8, labels=[0, 1, 2, 3], guidance=1.0, **kw)
    assert same.fid == result.fid
    guided = evaluate_model(setup, net, digits_stats, 8, **kw)  # the default guidance
    assert seen[-1] == [2, 3, 4, 4]  # [y; null] in one call
    assert guided.fid != result.fid and guided.settings["guidance"] == DEFAULT_GUIDANCE != 1


def test_sweep_guidance_cli(cond_model_dir, model_dir, digits_stats, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep-guidance", "--run", cond_model_dir, "--values", "0,1,2.5", "--num", 8]
    args += ["--metric", "proxy-fid", "--sampler", "ddim", "--steps", 2, "--stats", digits_stats]
    result = run_cli([*args, "--out", out])
    assert result.exit_code == 0, result.output
    table = json.loads((out / "sweep.json").read_text())
    assert table["param"] == "guidance" and [r["guidance"] for r in table["rows"]] == [0, 1, 2.5]
    assert table["labels"] == [0, 1, 2, 3]
    values = [r["proxy_fid"] for r in table["rows"]]
    assert len(set(values)) == 3  # w changes the images
    setup = load_for_sampling(cond_model_dir)
    net = FeatureNetwork.digits(load_digits_feature_net())
    one = evaluate_model(setup, net, digits_stats, 8, sampler="ddim", steps=2, guidance=2.5,
                         progress=False)  # fmt: skip
    assert values[2] == pytest.approx(one.fid, rel=1e-9)  # the row is that evaluation
    assert (out / "sweep.csv").read_text().startswith("guidance,proxy_fid")
    assert f"best guidance {table['best']['guidance']:g}" in result.output
    again = run_cli([*args, "--out", out])
    assert again.exit_code == 0 and "resumed from" in again.output
    bad = run_cli(
        [
            "sweep-guidance",
            "--run",
            model_dir,
            "--values",
            "1,2",
            "--num",
            8,
            "--metric",
            "proxy-fid",
            "--stats",
            digits_stats,
            "--out",
            tmp_path / "b",
        ]
    )
    assert bad.exit_code == 2 and "needs a class-conditional model" in bad.output  # fmt: skip
    neg = run_cli([*args[:4], "-1,2", *args[5:], "--out", tmp_path / "c"])
    assert neg.exit_code == 2 and "every guidance must be >= 0" in neg.output
