"""Fit profile coefficients to measurements with the simulator's own cost model.

A fit varies named coefficients of a base profile (``iteration.overhead_s``,
``lora.kernel.per_token_rank_s``, ``switch.merge_s``, ...) and asks `CostModel` for every measured
point's prediction, so the fitted formula is the simulator's by construction. The objective is
relative error (least squares with coefficients >= 0, scipy's trust-region reflective solver), as
DistServe fits its latency model. Every fit reports its in-sample error, and its held-out error on
points it never saw.

Relative to what: dividing by the *measured* time, as plain relative least squares does, biases a fit to
noisy points low (a slow run of a point weighs less than a fast one: at a per-run spread of 20%, the
fit lands ~8% under the mean, and timing noise is skewed slow). The simulator must charge the mean
time of a step, since a replay's time is the sum of its steps. So with `passes` > 1 the residual
divides by the *predicted* time of the previous pass instead (iteratively reweighted, starting from
the measured): still relative error, unbiased in the mean. `dlora-calibrate` fits noisy timings that
way (`NOISY_PASSES`); one pass (the default) is plain relative least squares, which the analytic
profiles' fit to medians of GPU kernel timings keeps. Optional `weights` scale each point's squared
error (`dlora-calibrate` weighs its two sources of points alike).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy.optimize import least_squares

from dlora_sim.core.cost_model import CostModel
from dlora_sim.core.profile import LoraCost, Profile


@dataclass(frozen=True)
class Point:
    """One measurement: the features a prediction needs and the measured seconds."""

    features: Mapping[str, float]
    seconds: float


Predict = Callable[[CostModel, Point], float]
NOISY_PASSES = 3   # passes for noisy timings (a CPU's): the fit charges their mean


@dataclass(frozen=True)
class ErrorStats:
    n: int
    mean_abs_rel: float
    p90_abs_rel: float
    max_abs_rel: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FitResult:
    values: dict[str, float]
    profile: Profile
    in_sample: ErrorStats
    held_out: ErrorStats | None


def set_coefficients(profile: Profile, values: Mapping[str, float]) -> Profile:
    """A copy of `profile` with dotted keys replaced: section.key, or lora.<path>.key."""
    sections: dict[str, dict[str, float]] = {}
    lora: dict[str, dict[str, float]] = {}
    for key, v in values.items():
        parts = key.split(".")
        if parts[0] == "lora" and len(parts) == 3:
            lora.setdefault(parts[1], {})[parts[2]] = float(v)
        elif len(parts) == 2 and parts[0] != "lora":
            sections.setdefault(parts[0], {})[parts[1]] = float(v)
        else:
            raise KeyError(f"not a profile coefficient: {key!r} (use section.key or lora.<path>.key)")
    changes: dict = {}
    for name, kv in sections.items():
        changes[name] = dataclasses.replace(getattr(profile, name), **kv)
    if lora:
        paths = dict(profile.lora_paths)
        for path, kv in lora.items():
            paths[path] = dataclasses.replace(paths.get(path, LoraCost(0.0, 0.0, 0.0)), **kv)
        changes["lora_paths"] = paths
    return dataclasses.replace(profile, **changes)


def coefficient(profile: Profile, key: str) -> float:
    parts = key.split(".")
    if parts[0] == "lora":
        return getattr(profile.lora_paths[parts[1]], parts[2])
    return getattr(getattr(profile, parts[0]), parts[1])


def errors(profile: Profile, points: Sequence[Point], predict: Predict, gpus: int = 1) -> ErrorStats:
    cost = CostModel(profile, gpus)
    rel = np.abs(np.array([predict(cost, p) / p.seconds - 1.0 for p in points]))
    return ErrorStats(len(points), round(float(rel.mean()), 6), round(float(np.percentile(rel, 90)), 6),
                      round(float(rel.max()), 6))


def fit(base: Profile, keys: Sequence[str], points: Sequence[Point], predict: Predict, *,
        held_out: Sequence[Point] = (), gpus: int = 1, passes: int = 1,
        weights: Sequence[float] | None = None) -> FitResult:
    """Least squares on relative error over `keys` (non-negative), starting from `base`'s values; after
    the first pass, each point's error relative to the previous pass's prediction of it (the module
    doc says why). `weights` (> 0, one per point) multiply each point's squared error."""
    if not points:
        raise ValueError("no points to fit")
    if any(p.seconds <= 0 for p in points):
        raise ValueError("measured seconds must be > 0")
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    root = np.ones(len(points)) if weights is None else np.sqrt(np.asarray(weights, dtype=float))
    if root.shape != (len(points),) or not (root > 0).all():
        raise ValueError(f"weights must be {len(points)} numbers > 0, one per point")
    scale = np.array([max(coefficient(base, k), 1e-9) for k in keys])
    measured = np.array([p.seconds for p in points])

    def predictions(z: np.ndarray) -> np.ndarray:
        cost = CostModel(set_coefficients(base, dict(zip(keys, z * scale))), gpus)
        return np.array([predict(cost, p) for p in points])

    weight = measured
    for i in range(passes):
        if i:   # relative to the previous pass's prediction
            weight = np.maximum(predictions(sol.x), 1e-12)
        sol = least_squares(lambda z, w=weight: (predictions(z) - measured) / w * root, sol.x if i else np.ones(len(keys)),
                            bounds=(0.0, np.inf), x_scale="jac", method="trf")
    values = {k: float(f"{v:.6g}") for k, v in zip(keys, sol.x * scale)}
    prof = set_coefficients(base, values)
    return FitResult(values, prof, errors(prof, points, predict, gpus),
                     errors(prof, held_out, predict, gpus) if held_out else None)
