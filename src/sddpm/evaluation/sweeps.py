"""Sweeps: the same images (same seeds) scored for several values of one sampling option.

:func:`sweep_threshold` evaluates every threshold-guidance value (the paper's threshold table),
:func:`sweep_guidance` every classifier-free guidance weight w of a class-conditional model
(both through :func:`sweep`, over :data:`SWEEP_PARAMS`); each returns a :class:`SweepResult`
that writes JSON, CSV and a PNG plot. Given an output folder it writes the sweep after every
value, and a rerun into the same folder reuses the values already there
(they must have been made with the same settings), so a sweep that was stopped resumes where it
stopped. KID is not computed in sweeps.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch.distributed as dist

from ..diffusion import SamplingOptions
from ..distributed import rank_and_world
from ..finite import NonFiniteError
from ..io import atomic_path, write_json
from .evaluate import _evaluate_prepared, _prepare
from .features import PROXY_NOTE, FeatureNetwork
from .results import EvaluationResult

if TYPE_CHECKING:
    from ..generation import SamplingSetup

__all__ = [
    "MAX_SWEEP_VALUES",
    "SWEEP_METRICS",
    "SweepResult",
    "parse_threshold_values",
    "SWEEP_PARAMS",
    "parse_sweep_values",
    "sweep",
    "sweep_guidance",
    "sweep_paths",
    "sweep_threshold",
]

SWEEP_METRICS = ("fid", "proxy-fid")
MAX_SWEEP_VALUES = 1000
KID_NOTE = "not computed in sweeps"
# The options a sweep can vary -> (smallest value, whether it may equal it, x-axis label).
SWEEP_PARAMS = {
    "threshold": (0.0, False, "neuron threshold while sampling"),
    "guidance": (0.0, True, "classifier-free guidance weight w"),
}


def sweep_paths(out_dir: str | os.PathLike) -> dict[str, Path]:
    """``{"json": OUT/sweep.json, "csv": ..., "png": ...}``: the files a sweep writes."""
    return {k: Path(out_dir) / f"sweep.{k}" for k in ("json", "csv", "png")}


def parse_threshold_values(text: str) -> list[float]:
    """``"a:b:step"`` (inclusive of ``b``) or ``"v1,v2,..."`` -> thresholds, all > 0
    (:func:`parse_sweep_values` of ``"threshold"``)."""
    return parse_sweep_values(text, "threshold")


def parse_sweep_values(text: str, param: str = "threshold") -> list[float]:
    """``"a:b:step"`` (inclusive of ``b``) or ``"v1,v2,..."`` -> values of ``param``
    (:data:`SWEEP_PARAMS`): thresholds > 0, guidance weights >= 0.

    Ranges are computed in decimal, so ``"0.995:1.005:0.001"`` gives exactly the 11 values
    0.995, 0.996, ..., 1.005 (no float drift dropping the end point or giving 0.9970000001).
    """
    text = (text or "").strip()
    bad = f"sweep values must be 'start:stop:step' or a comma list of numbers, got {text!r}"
    try:
        if ":" in text:
            parts = [p.strip() for p in text.split(":")]
            if len(parts) != 3:
                raise ValueError(bad)
            a, b, step = (Decimal(p) for p in parts)
            if not all(x.is_finite() for x in (a, b, step)):
                raise ValueError(bad)
            if step <= 0:
                raise ValueError(f"sweep values: the step must be > 0, got {parts[2]}")
            if b < a:
                raise ValueError(f"sweep values: stop {parts[1]} is below start {parts[0]}")
            n = int(((b - a) / step).to_integral_value(rounding=ROUND_FLOOR)) + 1
            if n > MAX_SWEEP_VALUES:
                raise ValueError(f"sweep values {text!r}: {n} values, at most {MAX_SWEEP_VALUES}")
            decimals = [a + i * step for i in range(n)]
        else:
            items = [p.strip() for p in text.split(",")]
            if not text or any(not p for p in items):
                raise ValueError(bad)
            decimals = [Decimal(p) for p in items]
            if not all(x.is_finite() for x in decimals):
                raise ValueError(bad)
    except InvalidOperation:
        raise ValueError(bad) from None
    values = [float(x) for x in decimals]
    low, inclusive, _ = SWEEP_PARAMS[param]
    for v in values:
        if v < low or (v == low and not inclusive):
            raise ValueError(
                f"sweep values: every {param} must be {'>=' if inclusive else '>'} {low:g}, "
                f"got {v:g}"
            )
    if len(set(values)) != len(values):
        raise ValueError(f"sweep values {text!r}: a value repeats")
    return values


@dataclass
class SweepResult:
    """One :class:`EvaluationResult` per value of ``param`` (``thresholds`` holds the values,
    whatever the parameter); ``best`` is the index of the lowest metric."""

    metric: str
    thresholds: list[float]
    results: list[EvaluationResult]
    settings: dict[str, Any] = field(default_factory=dict)
    param: str = "threshold"

    @property
    def values(self) -> list[float]:
        return [r.fid for r in self.results]

    @property
    def best(self) -> int:
        """The index of the lowest finite metric (a NaN row is never the best)."""
        values = np.asarray(self.values, dtype=np.float64)
        finite = np.isfinite(values)
        if not finite.any():
            raise NonFiniteError(f"no {self.param} gave a finite {self.metric}: {self.values}")
        return int(np.argmin(np.where(finite, values, np.inf)))

    @property
    def proxy(self) -> bool:
        return self.results[0].proxy

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per value (the CSV / JSON table)."""
        key = self.metric.replace("-", "_")
        out = []
        for i, (t, r) in enumerate(zip(self.thresholds, self.results, strict=True)):
            row: dict[str, Any] = {self.param: t, key: r.fid}
            row["is_mean"] = None if r.inception_score is None else r.inception_score[0]
            row["is_std"] = None if r.inception_score is None else r.inception_score[1]
            if r.digits_report is not None:
                row["confident_fraction"] = r.digits_report["confident_fraction"]
                row["classes_present"] = r.digits_report["classes_present"]
            row["best"] = i == self.best
            out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "metric": self.metric,
            "param": self.param,
            "best": {self.param: self.thresholds[self.best], "value": self.values[self.best]},
            "rows": self.rows(),
            "feature_network": self.results[0].feature_network,
            "comparable_to_published": not self.proxy,
        }
        if self.proxy:
            d["note"] = PROXY_NOTE
        d["num_images"] = self.results[0].num_images
        d.update(self.settings)
        d["results"] = [r.to_dict() for r in self.results]  # what a rerun resumes from
        return d

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Headers and string rows for a terminal table; the best row is marked ``*``."""
        rows = self.rows()
        headers = list(rows[0].keys())
        body = []
        for row in rows:
            cells = []
            for k in headers:
                v = row[k]
                if k == "best":
                    cells.append("*" if v else "")
                elif isinstance(v, float):
                    cells.append(f"{v:g}" if k == self.param else f"{v:.4f}")
                else:
                    cells.append("" if v is None else str(v))
            body.append(cells)
        return headers, body

    def write(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """``sweep.json``, ``sweep.csv`` and ``sweep.png`` in ``out_dir``, each atomically."""
        paths = sweep_paths(out_dir)
        write_json(paths["json"], self.to_dict())
        rows = self.rows()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        with atomic_path(paths["csv"]) as tmp:
            tmp.write_text(buf.getvalue())
        self.plot(paths["png"])
        return paths

    def plot(self, path: str | os.PathLike) -> None:
        """A PNG: the metric against the swept value, the best value marked. Written
        atomically."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        ax.plot(self.thresholds, self.values, "o-", color="tab:blue")
        b = self.best
        ax.plot(
            [self.thresholds[b]],
            [self.values[b]],
            marker="*",
            markersize=16,
            color="tab:red",
            linestyle="none",
            label=f"best: {self.thresholds[b]:g} ({self.values[b]:.3f})",
        )
        ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.ticklabel_format(useOffset=False)
        label = "proxy FID (digits; not comparable to published)" if self.proxy else "FID"
        ax.set_xlabel(SWEEP_PARAMS[self.param][2])
        ax.set_ylabel(label)
        s = self.settings
        ax.set_title(
            f"{self.param.capitalize()} sweep: {s.get('sampler')} {s.get('steps') or ''} steps, "
            f"{self.results[0].num_images} images"
        )
        ax.legend()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)


def sweep_threshold(
    setup: SamplingSetup,
    net: FeatureNetwork,
    stats: str | os.PathLike,
    values: Sequence[float],
    num: int,
    options: SamplingOptions | None = None,
    **kwargs: Any,
) -> SweepResult:
    """:func:`sweep` over threshold-guidance values (every spiking neuron's threshold)."""
    return sweep(setup, net, stats, "threshold", values, num, options, **kwargs)


def sweep_guidance(
    setup: SamplingSetup,
    net: FeatureNetwork,
    stats: str | os.PathLike,
    values: Sequence[float],
    num: int,
    options: SamplingOptions | None = None,
    **kwargs: Any,
) -> SweepResult:
    """:func:`sweep` over classifier-free guidance weights w of a class-conditional model
    (without ``options.labels`` image ``i`` is of class ``i mod num_classes``)."""
    return sweep(setup, net, stats, "guidance", values, num, options, **kwargs)


def sweep(
    setup: SamplingSetup,
    net: FeatureNetwork,
    stats: str | os.PathLike,
    param: str,
    values: Sequence[float],
    num: int,
    options: SamplingOptions | None = None,
    *,
    metric: str = "fid",
    is_splits: int = 10,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    out_dir: str | os.PathLike | None = None,
    record: dict[str, Any] | None = None,
    **changes: Any,
) -> SweepResult:
    """Evaluate every value in ``values`` of the sampling option ``param`` (:data:`SWEEP_PARAMS`)
    with the same seeds (image ``i`` starts from the same noise for every value). ``metric``
    ``"fid"`` needs the FID Inception, ``"proxy-fid"`` the digits network. ``options`` (keyword
    ``changes`` applied) says how to sample; its ``param`` is replaced by each value.

    With ``out_dir`` the sweep is written there (rank 0) as soon as each value is done, and
    values already in ``out_dir/sweep.json`` are not evaluated again; the result then holds
    those too, in value order. A file made with other settings (sampler, steps, seed,
    images, the ``record`` fields, ...) is refused rather than mixed in. ``record`` (e.g.
    ``{"weights": "ema"}``) is written into every result, like ``checkpoint``.
    """
    if param not in SWEEP_PARAMS:
        raise ValueError(f"unknown sweep parameter {param!r}; choose one of {list(SWEEP_PARAMS)}")
    if metric not in SWEEP_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {SWEEP_METRICS}")
    if (metric == "proxy-fid") != net.proxy:
        want = "digits" if metric == "proxy-fid" else "inception"
        raise ValueError(f"metric {metric!r} is measured with the {want} feature network")
    values = [float(v) for v in values]
    if not values:
        raise ValueError(f"no {param} values to sweep")
    from ..generation import class_options

    opts = class_options(SamplingOptions.build(options, **changes), setup.model)
    per_value = {v: opts.replace(**{param: v}) for v in values}  # checks every value first
    prep = _prepare(
        setup, net, stats, num, opts, checkpoint=checkpoint, progress=progress, kid=False
    )  # fmt: skip
    prep.settings.update(record or {})
    base = opts.replace(**{param: None})
    T = setup.schedule.T
    settings = {**prep.settings, **base.to_dict(T=T), "world_size": rank_and_world()[1]}
    settings.pop(param)
    expected = {"feature_network": net.name, "num_images": num, "is_splits": is_splits}
    expected.update({k: settings[k] for k in ("checkpoint", "stats", *(record or {}))})
    expected.update({k: v for k, v in base.image_settings(T=T).items() if k != param})
    done = _finished(out_dir, expected, param)
    rank = rank_and_world()[0]

    def result() -> SweepResult:
        ts = sorted(done)
        return SweepResult(metric, ts, [done[t] for t in ts], settings, param)

    for v in values:
        if v in done:
            continue
        r = _evaluate_prepared(
            prep, net, num, per_value[v], is_splits=is_splits, progress=progress,
            desc=f"{param} {v:g}",
        )  # fmt: skip
        r.kid_note = KID_NOTE
        done[v] = r
        if out_dir is not None and rank == 0:
            result().write(out_dir)
    return result()


def _finished(
    out_dir: str | os.PathLike | None, expected: dict[str, Any], param: str = "threshold"
) -> dict[float, Any]:
    """``{value of param: EvaluationResult}`` of the values already in ``out_dir/sweep.json`` (read
    on rank 0 and shared with every rank); ``{}`` without a file. A file of other settings is
    an error naming them."""
    if out_dir is None:
        return {}
    payload: list[Any] = [None]
    if rank_and_world()[0] == 0:
        try:
            payload[0] = ("ok", _read_finished(sweep_paths(out_dir)["json"], expected, param))
        except ValueError as err:
            payload[0] = ("error", str(err))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(payload, src=0)
    status, data = payload[0]
    if status == "error":
        raise ValueError(data)
    return {t: EvaluationResult.from_dict(d) for t, d in data.items()}


def _read_finished(
    path: Path, expected: dict[str, Any], param: str = "threshold"
) -> dict[float, dict[str, Any]]:
    if not path.is_file():
        return {}
    try:
        stored = json.loads(path.read_text())
        results = [EvaluationResult.from_dict(d) for d in stored["results"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{path} is not a sweep this version can resume ({type(err).__name__}: {err}); "
            "choose another output folder or remove it"
        ) from None
    done = {}
    for r in results:
        have = {
            **r.settings,
            "feature_network": r.feature_network,
            "num_images": r.num_images,
            "is_splits": r.is_splits,
        }
        diff = [f"{k} {have.get(k)!r} (now {v!r})" for k, v in expected.items() if have.get(k) != v]
        if diff:
            raise ValueError(
                f"{path} holds a sweep made with other settings: {', '.join(diff)}; choose "
                "another output folder, or remove it to start again"
            )
        if np.isfinite(r.fid):  # a non-finite row is never reused
            done[float(r.settings[param])] = r.to_dict()
    return done
