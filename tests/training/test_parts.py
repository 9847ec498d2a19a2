"""EMA, warm-up, trainable parameters and the sample grid."""

import numpy as np
import pytest
import torch
from PIL import Image

from sddpm.config import OptimSettings
from sddpm.models import build_model, preset
from sddpm.training import (
    EMA,
    build_optimizer,
    lr_factor,
    save_grid,
    trainable_parameters,
    warmup_factor,
)


def _tiny_model(kind="spiking"):
    torch.manual_seed(0)
    return build_model(preset("digits", kind).replace(channels=8))


def test_ema_update_closed_form_for_parameters_and_batchnorm_buffers():
    model = _tiny_model()
    d = 0.9
    ema = EMA(model, d)
    old = {k: v.clone() for k, v in ema.state_dict().items()}
    # change the weights and the BatchNorm statistics: a train-mode forward and a nudge
    model.train()
    model(torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,)))
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.add_(torch.randn_like(p))
    new = model.state_dict()
    ema.update(model)
    got = ema.state_dict()
    checked = {"param": 0, "running_mean": 0, "running_var": 0, "count": 0}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    for k, v in got.items():
        if k.endswith("num_batches_tracked"):
            assert torch.equal(v, new[k]) and int(v) == 1
            checked["count"] += 1
        elif k in frozen:
            assert torch.equal(v, new[k])
        else:
            assert not torch.equal(new[k], old[k]), k  # the entry really changed
            torch.testing.assert_close(v, d * old[k] + (1 - d) * new[k], rtol=1e-6, atol=1e-7)
            kind = k.rsplit(".", 1)[-1]
            checked[kind if kind in checked else "param"] += 1
    assert all(n > 0 for n in checked.values()), checked
    assert frozen == {"time_embed.table"}


def test_ema_decay_extremes():
    model = _tiny_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    copy, keep = EMA(model, 0.0), EMA(model, 1.0)
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.mul_(2)
    copy.update(model)
    keep.update(model)
    for k, v in model.state_dict().items():
        assert torch.equal(copy.state_dict()[k], v)
        assert torch.equal(keep.state_dict()[k], start[k])


def test_only_trainable_parameters_are_optimised():
    model = _tiny_model()
    optimizer, _ = build_optimizer(model, OptimSettings())
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(model.time_embed.table) not in ids
    assert ids == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(ids) == sum(1 for _ in model.parameters()) - 1


def test_warmup_learning_rates():
    model = _tiny_model("ann")
    optimizer, scheduler = build_optimizer(model, OptimSettings(lr=1e-3, warmup_steps=4))
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert [warmup_factor(i, 0) for i in range(3)] == [1.0, 1.0, 1.0]


def test_warmup_then_decay():
    model = _tiny_model("ann")
    settings = OptimSettings(lr=1.0, warmup_steps=2, decay="linear")
    optimizer, scheduler = build_optimizer(model, settings, total_steps=6)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # warm-up 1/2, 1; then linear from 1 (end of warm-up) towards 0 after the last update
    assert seen == pytest.approx([0.5, 1.0, 0.8, 0.6, 0.4, 0.2])
    cosine = [lr_factor(i, 2, "cosine", 6) for i in range(6)]
    assert cosine[:2] == [0.5, 1.0] and cosine[3] == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.4)))


def test_save_grid_writes_png(tmp_path):
    images = torch.linspace(-1, 1, 5 * 64).reshape(5, 1, 8, 8)
    images[0] = -1.0
    images[1] = 1.0
    path = save_grid(images, tmp_path / "sub" / "grid.png", nrow=3, padding=2, scale=1)
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["grid.png"]
    img = np.asarray(Image.open(path))
    assert img.shape == (2 * 10 + 2, 3 * 10 + 2)  # 2 rows x 3 columns of 8 + 2 padding
    assert (img[2:10, 2:10] == 0).all() and (img[2:10, 12:20] == 255).all()
    rgb = save_grid(torch.zeros(4, 3, 8, 8), tmp_path / "rgb.png")  # default scale: 4x
    assert Image.open(rgb).size == (4 * (2 * 10 + 2), 4 * (2 * 10 + 2))
    assert Image.open(rgb).mode == "RGB"


def test_one_process_group_module_for_training_and_evaluation(monkeypatch):
    from sddpm import distributed

    assert distributed.shard_indices(7, 1, 3) == [1, 4]
    with pytest.raises(ValueError, match="rank < world_size"):
        distributed.shard_indices(7, 3, 3)
    assert distributed.rank_and_world() == (0, 1)
    with pytest.raises(ValueError, match="not a device name"):
        distributed.check_device("gpu")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.distributed_from_env("cpu") as (rank, world, dev):
        assert (rank, world, dev) == (0, 1, torch.device("cpu"))
    ctx = distributed.setup_distributed("cpu")
    assert not ctx.distributed and distributed.any_rank(ctx, True)
    assert not distributed.any_rank(ctx, False)
    # evaluation takes its process-group helpers from this module: there is no second copy
    from sddpm.evaluation import evaluate, reference_stats, scores, sweeps

    for module in (evaluate, reference_stats, scores, sweeps):
        for name in ("rank_and_world", "shard_indices", "all_gather_rows"):
            if hasattr(module, name):
                assert getattr(module, name) is getattr(distributed, name), (module, name)


@pytest.mark.parametrize("cuda_build", [None, "12.1"])
def test_one_device_check_names_the_problem_and_the_fix(monkeypatch, cuda_build):
    """check_device owns the device-name check and its message; the sampling options and the
    process groups say the same thing (the options name the field)."""
    from sddpm import distributed
    from sddpm.diffusion import OptionError, SamplingOptions

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    fix = "install a CUDA build of torch" if cuda_build is None else "run on a machine with"
    for check in (
        distributed.check_device,
        lambda d: SamplingOptions(device=d),
        distributed.resolve_device,
    ):
        with pytest.raises(ValueError, match=r"'gpu' is not a device name; use 'cpu', 'cuda'"):
            check("gpu")
        with pytest.raises(ValueError) as info:
            check("cuda:1")
        message = str(info.value)
        assert "device 'cuda:1' asked for, but CUDA is not available here" in message
        assert "use device='cpu' (CLI: --device cpu)" in message and fix in message
    with pytest.raises(OptionError) as info:
        SamplingOptions(device=3.5)
    assert info.value.field == "device" and "3.5 is not a device name" in str(info.value)
