"""A neuron kernel that cannot run here is one clear NeuronKernelError naming the fix."""

import subprocess
import sys

import pytest
import torch

from sddpm.snn import NeuronKernelError, SpikingNeuron, set_neuron_kernel


def model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), SpikingNeuron())


def test_triton_kernel_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    with pytest.raises(NeuronKernelError, match="needs Triton.*pip install triton"):
        SpikingNeuron(kernel="triton")
    with pytest.raises(NeuronKernelError, match="pip install triton"):
        set_neuron_kernel(model(), "triton")
    # auto and eager need no Triton
    x = torch.randn(3, 4)
    assert torch.equal(SpikingNeuron()(x), SpikingNeuron(kernel="eager")(x))
    assert set_neuron_kernel(model(), "auto") == 1
    assert isinstance(NeuronKernelError("x"), ValueError)  # the CLI reports ValueErrors


def test_compiled_kernel_without_a_cxx_compiler():
    from torch._inductor import config

    with config.patch({"cpp.cxx": (None, "no-such-compiler++")}):
        with pytest.raises(NeuronKernelError, match=r"no C\+\+ compiler.*no-such-compiler\+\+"):
            set_neuron_kernel(model(), "compiled", device="cpu")
        assert set_neuron_kernel(model(), "compiled") == 1  # no device: checked at the call
        neuron = SpikingNeuron(kernel="compiled")
        with pytest.raises(NeuronKernelError, match="neuron kernel 'eager'"):
            neuron(torch.randn(2, 3))
    with config.patch({"cpp.cxx": (None, sys.executable)}):  # any program on PATH
        assert set_neuron_kernel(model(), "compiled", device="cpu") == 1


def test_unknown_kernel_names_the_choices():
    with pytest.raises(ValueError, match="auto.*eager.*compiled.*triton"):
        SpikingNeuron(kernel="cuda")


def test_package_imports_and_runs_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, sddpm.snn, sddpm.models\n"
        "m = sddpm.models.build_model(sddpm.models.preset('digits').replace(channels=8))\n"
        "print(m(torch.zeros(1, 1, 8, 8), torch.tensor([3])).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch.Size([1, 1, 8, 8])"
