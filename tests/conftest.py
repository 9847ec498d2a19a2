import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "sddpm-small-gray.safetensors"

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def load_reference(path: Path = REFERENCE) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="session")
def reference():
    """Tensors and metadata of the published small spiking U-Net (see data/REFERENCE.md)."""
    return load_reference()


@pytest.fixture()
def published_model(reference):
    """Our U-Net loaded from the reference's published state_dict, in eval mode."""
    from sddpm.compat import from_published

    tensors, meta = reference
    config = json.loads(meta["config"])
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    return from_published(state, config, image_size=config["img_size"])


@pytest.fixture(params=["eager", "compiled", "triton", "auto"])
def kernel(request, monkeypatch):
    """Every neuron kernel (:data:`sddpm.snn.KERNELS`); ``triton`` runs on the CPU under
    Triton's interpreter."""
    from sddpm.snn import KERNELS

    assert request.param in KERNELS
    if request.param == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        from sddpm.snn import triton_neuron

        # the interpreter runs the programs one by one: few wide ones are faster
        monkeypatch.setattr(triton_neuron, "BLOCK", 1 << 16)
    return request.param
