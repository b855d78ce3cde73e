"""What a comparison chart plots: runs grouped into series (one per system) over the swept parameter,
seeds pooled into a band; plus the title every chart shares. Pure data, no matplotlib, so it is tested
without drawing."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

from dlora_sim.core.jobs import UNCOMPARED

# fixed colours per system, so one system has one colour in every chart the project makes
SYSTEM_COLORS = {"dlora": "tab:green", "slora": "tab:blue", "merged": "tab:orange", "peft": "tab:purple",
                 "vllm": "tab:red", "vllm_grouped": "tab:brown", "vllm_lora": "tab:pink"}
_SPARE = ["tab:olive", "tab:cyan", "tab:gray", "gold", "navy", "teal"]


def color(name: str, others: Sequence[str] = ()) -> str:
    if name in SYSTEM_COLORS:
        return SYSTEM_COLORS[name]
    rest = sorted(n for n in set(others) | {name} if n not in SYSTEM_COLORS)
    return _SPARE[rest.index(name) % len(_SPARE)]


def overrides_of(summary: dict[str, Any]) -> dict[str, str]:
    out = {}
    for o in summary.get("overrides") or []:
        key, _, value = o.lstrip("+~").partition("=")
        if key not in UNCOMPARED:   # overrides that change no result
            out[key] = value
    if "system" not in out and summary.get("system"):
        out["system"] = str(summary["system"])
    return out


def _number(v: str) -> float | None:
    try:
        return float(v)
    except ValueError:
        return None


@dataclass
class Series:
    label: str
    color: str
    x: list[float] = field(default_factory=list)
    runs: list[list[dict[str, Any]]] = field(default_factory=list)   # per x: the seeds' summaries


@dataclass
class Layout:
    """`x_key` set: a line chart, one `Series` per label over x; else one bar per run (`bars`)."""
    x_key: str | None
    series: list[Series]
    bars: list[tuple[str, str, dict[str, Any]]]   # (label, colour, summary)
    seeds: int


def layout(rows: Sequence[dict[str, Any]]) -> Layout:
    """Series = system plus any non-numeric swept key; x = the one numeric swept key (the first, when
    several: the others join the series label); seeds that differ only by `seed` share a point."""
    ovs = [overrides_of(s) for s in rows]
    keys = sorted({k for o in ovs for k in o})
    varying = [k for k in keys if len({o.get(k) for o in ovs}) > 1]
    numeric = [k for k in varying if k not in ("system", "seed")
               and all(o.get(k) is not None and _number(o[k]) is not None for o in ovs)]
    x_key = numeric[0] if numeric else None
    label_keys = [k for k in varying if k not in ("seed", x_key)]
    labels = [" ".join(o.get(k, "-") if k == "system" else f"{k}={o.get(k, '-')}" for k in label_keys)
              or str(s.get("system", "run")) for s, o in zip(rows, ovs)]
    systems = [str(s.get("system", "run")) for s in rows]
    seeds = len({o.get("seed") for o in ovs})
    if x_key is None:
        return Layout(None, [], [(lab, color(sy, systems), s) for lab, sy, s in zip(labels, systems, rows)], seeds)
    groups: dict[str, Series] = {}
    points: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for lab, sy, s, o in zip(labels, systems, rows, ovs):
        if lab not in groups:
            # a second series of one system (another swept key) gets a spare colour
            used = {g.color for g in groups.values()}
            c = color(sy, systems)
            spare = next((x for x in _SPARE if x not in used), f"C{len(groups) % 10}")
            groups[lab] = Series(lab, c if c not in used else spare)
        points[(lab, float(o[x_key]))].append(s)
    for (lab, x), runs in sorted(points.items(), key=lambda kv: kv[0][1]):
        groups[lab].x.append(x)
        groups[lab].runs.append(runs)
    return Layout(x_key, list(groups.values()), [], seeds)


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def describe(summary: dict[str, Any], *, with_system: bool = True) -> str:
    """One line a reader needs to place a chart: system, workload, rate, adapters, replicas, profile,
    LoRA cost path, from a run's summary.json."""
    cfg = summary.get("config") or {}
    wl = cfg.get("workload") or {}
    target = str(wl.get("_target_", "")).rsplit(".", 1)[-1].replace("Workload", "") or "workload"
    if wl.get("service"):
        target += f" {wl['service']}"
    parts = [str(summary.get("system"))] if with_system and summary.get("system") else []
    parts.append(f"{target}, {summary.get('num_requests', '?')} requests")
    if wl.get("rate") is not None:
        parts.append(f"{_fmt(wl['rate'])} req/s")
    elif summary.get("offered_rps") is not None:
        parts.append(f"{summary['offered_rps']:.3g} req/s offered")
    n_ad = wl.get("num_adapters")
    if n_ad is not None:
        skew = f", {wl.get('mapping', 'zipf')} {_fmt(wl['skew'])}" if wl.get("skew") is not None and n_ad > 1 else ""
        parts.append(f"{n_ad} adapter{'s' if n_ad != 1 else ''}{skew}")
    parts.append(f"{summary.get('num_replicas', '?')} replica(s)")
    prof, model = cfg.get("profile") or {}, (cfg.get("model") or {}).get("name")
    if prof.get("hardware") or model:
        parts.append(f"{prof.get('hardware', '?')} / {model or '?'}")
    if prof.get("lora"):
        parts.append(f"LoRA cost: {prof['lora']}")
    return " · ".join(parts)


def common_description(rows: Sequence[dict[str, Any]], x_key: str | None) -> str:
    """The description's parts every run shares (what a sweep varies is on an axis or in the legend)."""
    if not rows:
        return "no runs"
    descs = [describe(s, with_system=False).split(" · ") for s in rows]
    shared = [p for p in descs[0] if all(p in d for d in descs[1:])]
    systems = {str(s.get("system")) for s in rows}
    title = " · ".join(([systems.pop()] if len(systems) == 1 else []) + shared)
    return title + (f"  (swept: {x_key})" if x_key else "")
