"""Noise schedules of the forward process q(x_t | x_0) and the grids samplers walk on.

A schedule is a vector of betas ``beta_0 .. beta_{T-1}`` (index ``t`` here is the published
code's 0-based diffusion step, which the model receives as its time input). Every derived
quantity is computed once, in float64, the way the published SDDPM code (after pytorch-ddpm)
builds its buffers; samplers cast a gathered coefficient to float32 just before using it, as the
published ``extract(...).float()`` does.

Notation: ``abar_t = prod_{s<=t} (1 - beta_s)``; ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

SCHEDULE_KINDS = ("linear", "cosine", "custom")
SPACINGS = ("uniform", "quadratic", "linear", "logsnr")


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete noise schedule and its precomputed float64 coefficient tables.

    Build one with :meth:`linear` (the published default), :meth:`cosine` or :meth:`from_dict`;
    the constructor takes raw ``betas`` (a 1-D tensor of ``T >= 2`` values in (0, 1)).

    Every table below is a float64 tensor of shape ``[T]`` on the CPU, indexed by ``t``:

    - ``alphas_cumprod`` (abar_t), ``alphas_cumprod_prev`` (abar_{t-1}, with abar_{-1} = 1);
    - ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``, ``sqrt_recip_alphas_cumprod``
      (1/sqrt(abar)), ``sqrt_recipm1_alphas_cumprod`` (sqrt(1/abar - 1));
    - ``posterior_variance``: Var q(x_{t-1} | x_t, x_0) = beta_t (1 - abar_{t-1}) / (1 - abar_t);
    - ``posterior_mean_coef1`` (of x_0) and ``posterior_mean_coef2`` (of x_t);
    - ``fixedsmall_log_variance``: log of the posterior variance, its t=0 entry (which is 0)
      replaced by the t=1 entry (published ``posterior_log_var_clipped``);
    - ``fixedlarge_log_variance``: ``log(cat([posterior_var[1:2], betas[1:]]))``, the published
      default reverse-process variance;
    - ``log_snr``: log(abar / (1 - abar)), decreasing in t.
    """

    betas: torch.Tensor
    kind: str = "custom"
    params: dict[str, Any] = field(default_factory=dict)

    alphas: torch.Tensor = field(init=False, repr=False)
    alphas_cumprod: torch.Tensor = field(init=False, repr=False)
    alphas_cumprod_prev: torch.Tensor = field(init=False, repr=False)
    sqrt_alphas_cumprod: torch.Tensor = field(init=False, repr=False)
    sqrt_one_minus_alphas_cumprod: torch.Tensor = field(init=False, repr=False)
    sqrt_recip_alphas_cumprod: torch.Tensor = field(init=False, repr=False)
    sqrt_recipm1_alphas_cumprod: torch.Tensor = field(init=False, repr=False)
    posterior_variance: torch.Tensor = field(init=False, repr=False)
    posterior_mean_coef1: torch.Tensor = field(init=False, repr=False)
    posterior_mean_coef2: torch.Tensor = field(init=False, repr=False)
    fixedsmall_log_variance: torch.Tensor = field(init=False, repr=False)
    fixedlarge_log_variance: torch.Tensor = field(init=False, repr=False)
    log_snr: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        betas = torch.as_tensor(self.betas).detach().to(device="cpu", dtype=torch.float64)
        if betas.dim() != 1 or betas.numel() < 2:
            raise ValueError(
                f"betas must be a 1-D tensor of T >= 2 values, got shape {tuple(betas.shape)}"
            )
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(
                f"betas must lie in (0, 1); got min {betas.min().item()}, max {betas.max().item()}"
            )
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown schedule kind {self.kind!r}; choose one of {SCHEDULE_KINDS}")
        s = object.__setattr__
        s(self, "betas", betas)
        # The published GaussianDiffusionSampler buffers, in the same float64 arithmetic.
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        posterior_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        s(self, "alphas", alphas)
        s(self, "alphas_cumprod", abar)
        s(self, "alphas_cumprod_prev", abar_prev)
        s(self, "sqrt_alphas_cumprod", torch.sqrt(abar))
        s(self, "sqrt_one_minus_alphas_cumprod", torch.sqrt(1.0 - abar))
        s(self, "sqrt_recip_alphas_cumprod", torch.sqrt(1.0 / abar))
        s(self, "sqrt_recipm1_alphas_cumprod", torch.sqrt(1.0 / abar - 1.0))
        s(self, "posterior_variance", posterior_var)
        s(self, "posterior_mean_coef1", torch.sqrt(abar_prev) * betas / (1.0 - abar))
        s(self, "posterior_mean_coef2", torch.sqrt(alphas) * (1.0 - abar_prev) / (1.0 - abar))
        # posterior_var[0] is 0: both published variances borrow posterior_var[1] at t = 0.
        s(
            self,
            "fixedsmall_log_variance",
            torch.log(torch.cat([posterior_var[1:2], posterior_var[1:]])),
        )
        s(self, "fixedlarge_log_variance", torch.log(torch.cat([posterior_var[1:2], betas[1:]])))
        s(self, "log_snr", torch.log(abar) - torch.log1p(-abar))

    # ---------------------------------------------------------------- construction
    @classmethod
    def linear(cls, T: int = 1000, beta_1: float = 1e-4, beta_T: float = 0.02) -> NoiseSchedule:
        """Ho et al. (2020) linear betas from ``beta_1`` to ``beta_T`` over ``T`` steps.

        Computed as ``torch.linspace(beta_1, beta_T, T, dtype=float64)``. (The published code
        writes ``torch.linspace(beta_1, beta_T, T).double()``, a float32 linspace cast to
        float64; the betas differ by < 2e-9 and abar by < 3e-7 relative, about one float32
        rounding, so the sampled float32 values agree.)
        """
        T = _check_T(T)
        if not 0 < beta_1 <= beta_T < 1:
            raise ValueError(f"need 0 < beta_1 <= beta_T < 1, got beta_1={beta_1}, beta_T={beta_T}")
        betas = torch.linspace(beta_1, beta_T, T, dtype=torch.float64)
        return cls(betas, kind="linear", params={"beta_1": float(beta_1), "beta_T": float(beta_T)})

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        """Nichol & Dhariwal (2021) cosine schedule.

        ``abar(t) = f(t) / f(0)`` with ``f(t) = cos(((t / T) + s) / (1 + s) * pi / 2)^2`` and
        ``beta_t = min(1 - abar(t + 1) / abar(t), max_beta)`` for ``t = 0 .. T-1``.
        """
        T = _check_T(T)
        if not s >= 0 or not 0 < max_beta < 1:
            raise ValueError(f"need s >= 0 and 0 < max_beta < 1, got s={s}, max_beta={max_beta}")
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        abar = f / f[0]
        betas = (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)
        return cls(betas, kind="cosine", params={"s": float(s), "max_beta": float(max_beta)})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NoiseSchedule:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        kind = d.pop("kind", None)
        if kind == "linear":
            allowed, build = {"T", "beta_1", "beta_T"}, cls.linear
        elif kind == "cosine":
            allowed, build = {"T", "s", "max_beta"}, cls.cosine
        elif kind == "custom":
            if set(d) - {"T", "betas"} or "betas" not in d:
                raise ValueError(
                    f"a custom schedule dict holds 'betas' (and 'T'), got keys {sorted(d)}"
                )
            betas = torch.tensor(d["betas"], dtype=torch.float64)
            if "T" in d and int(d["T"]) != betas.numel():
                raise ValueError(f"T={d['T']} but {betas.numel()} betas were given")
            return cls(betas)
        else:
            raise ValueError(f"unknown schedule kind {kind!r}; choose one of {SCHEDULE_KINDS}")
        if set(d) - allowed:
            raise ValueError(
                f"unexpected keys {sorted(set(d) - allowed)} for a {kind} schedule; "
                f"allowed: {sorted(allowed)}"
            )
        return build(**d)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description: ``{"kind": "linear", "T": 1000, "beta_1": 1e-4,
        "beta_T": 0.02}``, ``{"kind": "cosine", "T", "s", "max_beta"}`` or, for custom betas,
        ``{"kind": "custom", "T", "betas": [...]}``."""
        if self.kind == "custom":
            return {"kind": "custom", "T": self.T, "betas": self.betas.tolist()}
        return {"kind": self.kind, "T": self.T, **self.params}

    def to(self, device: str | torch.device) -> NoiseSchedule:
        """This schedule with every table on ``device`` (the CPU: ``self``), so that lookups
        (:func:`sddpm.diffusion.loss.extract`) gather on the device with no host-to-device
        copy per call. The copy is made once per device and cached on this schedule."""
        device = torch.device(device)
        if device.type == "cpu":
            return self
        cache = self.__dict__.setdefault("_device_copies", {})
        key = str(device)
        if key not in cache:
            copy = object.__new__(NoiseSchedule)
            for name, value in self.__dict__.items():
                if name != "_device_copies":
                    moved = value.to(device) if isinstance(value, torch.Tensor) else value
                    object.__setattr__(copy, name, moved)
            cache[key] = copy
        return cache[key]

    # ---------------------------------------------------------------- queries
    @property
    def T(self) -> int:
        """Number of diffusion steps."""
        return int(self.betas.numel())

    def __len__(self) -> int:
        return self.T

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "betas")
        return f"NoiseSchedule({args})"

    def log_variance(self, variance: str) -> torch.Tensor:
        """The ``[T]`` reverse-step log-variance table, ``"fixedlarge"`` or ``"fixedsmall"``."""
        if variance == "fixedlarge":
            return self.fixedlarge_log_variance
        if variance == "fixedsmall":
            return self.fixedsmall_log_variance
        raise ValueError(f"unknown variance {variance!r}; choose 'fixedlarge' or 'fixedsmall'")

    def respace(self, timesteps: list[int] | torch.Tensor) -> NoiseSchedule:
        """The schedule of the sub-chain on ``timesteps`` (Nichol & Dhariwal 2021, Sec. 4).

        ``timesteps`` are distinct steps of this schedule; the result has ``len(timesteps)``
        steps whose i-th ``abar`` equals this schedule's ``abar`` at the i-th smallest timestep:
        ``beta'_i = 1 - abar[t_i] / abar[t_{i-1}]``. Respacing onto every step returns ``self``.
        """
        ts = sorted({int(t) for t in torch.as_tensor(timesteps).flatten().tolist()})
        if len(ts) != len(torch.as_tensor(timesteps).flatten()) or ts[0] < 0 or ts[-1] >= self.T:
            raise ValueError(
                f"timesteps must be distinct steps in [0, {self.T - 1}], got {timesteps}"
            )
        if ts == list(range(self.T)):
            return self
        abar = self.alphas_cumprod[ts]
        prev = torch.cat([abar.new_ones(1), abar[:-1]])
        return NoiseSchedule(1.0 - abar / prev)


def _check_T(T: int) -> int:
    if int(T) != T or T < 2:
        raise ValueError(f"T (number of diffusion steps) must be an integer >= 2, got {T}")
    return int(T)


def timesteps(schedule: NoiseSchedule, steps: int, spacing: str = "uniform") -> list[int]:
    """The ``steps`` distinct, decreasing diffusion steps a sampler evaluates the model at.

    Every sampler here makes one model call per grid point and, after the last one, jumps to
    clean data (abar = 1), so ``steps`` is also the number of model evaluations.

    Spacings (``T = schedule.T``, ``N = steps``, ``i = 0 .. N-1``):

    - ``"uniform"``: ``int(T - 1 - i T / N)``, the published SDDPM grid ("trailing": starts at
      ``T - 1``; for N = 10, T = 1000: 999, 899, ..., 99);
    - ``"quadratic"``: ``int(T (1 - i / N)^2) - 1``, denser near t = 0 (DDIM, Song et al. 2021,
      used quadratic spacing for CIFAR-10; theirs stops at 0.8 T, this one starts at T - 1);
    - ``"linear"``: ``round(linspace(T - 1, 0, N))``, both ends included (iDDPM respacing);
    - ``"logsnr"``: uniform in log-SNR between ``t = T - 1`` and ``t = 0``, both included,
      each point rounded to the nearest step (DPM-Solver, Lu et al. 2022, Sec. 3.3).

    Rounding collisions (possible only when N approaches T) are resolved by moving points to
    the nearest free steps, so the result always holds N distinct steps; N = T gives every step.
    """
    T = schedule.T
    if int(steps) != steps or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in [1, {T}] (the schedule length), got {steps}")
    n = int(steps)
    if spacing == "uniform":
        # Exactly the published expression, in Python floats: max(int(T - 1 - (T / N) i), 0).
        raw = torch.tensor([float(int(T - 1 - (T / n) * k)) for k in range(n)])
    elif spacing == "quadratic":
        # 1e-9 keeps exact squares (T u^2 = 40.0) from rounding down through float error.
        raw = torch.tensor([float(int(T * ((n - k) / n) ** 2 + 1e-9) - 1) for k in range(n)])
    elif spacing == "linear":
        raw = torch.round(torch.linspace(T - 1, 0, n, dtype=torch.float64))
    elif spacing == "logsnr":
        lam = schedule.log_snr
        targets = torch.linspace(float(lam[-1]), float(lam[0]), n, dtype=torch.float64)
        raw = torch.round(_invert_decreasing(lam, targets))
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
    ts = [int(v) for v in raw.clamp(0, T - 1).tolist()]
    return _make_strictly_decreasing(ts, T)


def _invert_decreasing(values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fractional index at which the decreasing ``values`` take each target (linear interp)."""
    asc = values.flip(0)  # increasing
    k = torch.searchsorted(asc, targets).clamp(1, asc.numel() - 1)
    lo, hi = asc[k - 1], asc[k]
    frac = ((targets - lo) / (hi - lo)).clamp(0, 1)
    idx_asc = (k - 1).to(torch.float64) + frac
    return (values.numel() - 1) - idx_asc


def _make_strictly_decreasing(ts: list[int], T: int) -> list[int]:
    n = len(ts)
    out = list(ts)
    for j in range(1, n):  # no point at or above its predecessor
        out[j] = min(out[j], out[j - 1] - 1)
    out[-1] = max(out[-1], 0)
    for j in range(n - 2, -1, -1):  # no point at or below its successor (and >= 0)
        out[j] = max(out[j], out[j + 1] + 1)
    assert out[0] <= T - 1
    return out
