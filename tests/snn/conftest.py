"""The neuron variants every kernel is checked on, and Triton's interpreter for CPU tests."""

import itertools

import pytest

from sddpm.snn import SpikingNeuron, Surrogate

VARIANTS = [
    {"tau": tau, "reset": reset, "detach_reset": detach, "decay_input": decay, "kind": kind}
    for tau, reset, detach, decay, kind in itertools.product(
        [None, 2.0],
        ["hard", "soft"],
        [False, True],
        [True, False],
        ["atan", "sigmoid", "rectangular"],
    )
]


def variant_id(v: dict) -> str:
    return "-".join(
        [
            "IF" if v["tau"] is None else f"LIF{v['tau']:g}",
            v["reset"],
            "detached" if v["detach_reset"] else "attached",
            "decay" if v["decay_input"] else "nodecay",
            v["kind"],
        ]
    )


@pytest.fixture(params=VARIANTS, ids=[variant_id(v) for v in VARIANTS])
def neuron_variant(request):
    """A factory of the :class:`SpikingNeuron` of one variant (threshold 0.7; hard resets to
    -0.2, so v_reset != 0 is covered) with extra keyword arguments such as ``kernel``."""
    v = request.param

    def make(**kwargs) -> SpikingNeuron:
        return SpikingNeuron(
            threshold=0.7,
            tau=v["tau"],
            reset=v["reset"],
            v_reset=-0.2 if v["reset"] == "hard" else 0.0,
            detach_reset=v["detach_reset"],
            surrogate=Surrogate(v["kind"]),
            decay_input=v["decay_input"],
            **kwargs,
        )

    return make


@pytest.fixture()
def triton_interpreter(monkeypatch):
    """Triton's interpreter on for one test: the triton kernel then runs CPU tensors (its
    kernels are built on first use, and triton reads TRITON_INTERPRET when it builds one)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
