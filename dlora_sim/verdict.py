"""The answer a comparison sweep gives: per case (runs that differ only in `system`), dLoRA against the
best other system, in %, the winner named, and why (what unmerged LoRA costs there, how often dLoRA
switched mode). Read from summary.json files, as every report is; nothing is rerun."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from omegaconf import OmegaConf

TIE = 0.01   # within 1% of mean s/token: a tie (the skew sweep's seeds move single runs by comparable amounts)


@dataclass(frozen=True)
class Verdict:
    case: str                 # the overrides the case's runs share, besides `system`
    best_baseline: str
    s_per_token_change: float     # dlora / best baseline - 1, mean s per output token (lower is better)
    throughput_change: float      # dlora / best baseline - 1, completed req/s (higher is better)
    winner: str               # "dlora", the baseline's name, or "tie"
    why: str

    def line(self) -> str:
        return (f"verdict [{self.case}]: dlora vs best baseline {self.best_baseline}: mean s/token "
                f"{self.s_per_token_change:+.1%}, throughput {self.throughput_change:+.1%} -> "
                f"{'tie (dlora and ' + self.best_baseline + ')' if self.winner == 'tie' else self.winner + ' wins'}"
                f"; {self.why}")


def _case(s: dict[str, Any]) -> str:
    keep = [o for o in (s.get("overrides") or []) if not o.startswith(("system=", "experiment="))]
    return " ".join(keep) or "default"


def _uniform(config: dict[str, Any]) -> bool:
    wl = config.get("workload") or {}
    return wl.get("popularity") == "uniform" or (wl.get("popularity") == "zipf" and not wl.get("popularity_param"))


def lora_share(config: dict[str, Any]) -> float | None:
    """What unmerged LoRA adds to a full batch's decode iteration under this run's profile (the batch
    cap's sequences at 512 tokens, its adapters all distinct up to the workload's count)."""
    from dlora_sim.core.config import build_profile
    from dlora_sim.core.cost_model import CostModel

    try:
        cfg = OmegaConf.create(config)
        cost = CostModel(build_profile(cfg), int(cfg.cluster.gpus_per_replica), str(cfg.cluster.replica.merge))
        batch = int(cfg.cluster.replica.max_num_seqs)
        adapters = min(batch, int(cfg.workload.get("num_adapters") or batch))
        rank = int(cfg.workload.get("rank") or 16)
        merged = cost.decode_time(batch, 512)
        return cost.decode_time(batch, 512, merged=False, distinct_adapters=adapters, rank=rank,
                                resident_adapters=adapters) / merged - 1
    except Exception:   # a run of another app or an older config: no share, the verdict still stands
        return None


def _why(winner: str, dlora: dict[str, Any], best: dict[str, Any], share: float | None) -> str:
    """Why, from what the runs recorded: the LoRA cost here, and how much dlora merged and switched."""
    cost = f"unmerged LoRA adds {share:.0%} to a full batch here" if share is not None else "unmerged LoRA cost unknown"
    switches = dlora.get("num_switches", 0)
    merged = dlora.get("merged_iteration_share")
    ran = (f"dlora ran {merged:.0%} of its iterations merged ({switches} mode switches)" if merged is not None
           else f"dlora switched mode {switches} times")
    if winner == "dlora":
        if merged:
            return f"{cost}; {ran}: merging the queue's dominant adapters saved more than the switches cost"
        return f"{cost}; {ran}: its dispatch and batching, not merging, made the difference"
    if winner == "tie":
        if merged is not None and merged < 0.1:
            uniform = _uniform(dlora.get("config") or {})
            reason = ("at uniform popularity no adapter dominates the queue" if uniform
                      else "merging rarely paid here")
            return f"{cost}; {ran}: {reason}, so it served like {best['system']}"
        return f"{cost}; {ran}: what merging saved about cancelled what it cost"
    return f"{cost}; {ran}: {best['system']} did better; dlora's mode choices cost more than they saved"


def verdicts(rows: Sequence[dict[str, Any]]) -> list[Verdict]:
    """One verdict per case that has a dlora run and at least one other system."""
    cases: dict[str, list[dict[str, Any]]] = {}
    for s in rows:
        cases.setdefault(_case(s), []).append(s)
    out = []
    for case, runs in cases.items():
        dl = [s for s in runs if s.get("system") == "dlora" and s.get("mean_s_per_token") is not None]
        others = [s for s in runs if s.get("system") != "dlora" and s.get("mean_s_per_token") is not None]
        if len(dl) != 1 or not others:
            continue
        d = dl[0]
        best = min(others, key=lambda s: (s["mean_s_per_token"], -s.get("throughput_rps", 0.0)))
        spt = d["mean_s_per_token"] / best["mean_s_per_token"] - 1
        tput = d["throughput_rps"] / best["throughput_rps"] - 1 if best.get("throughput_rps") else 0.0
        winner = "tie" if abs(spt) <= TIE else ("dlora" if spt < 0 else best["system"])
        out.append(Verdict(case, best["system"], spt, tput, winner, _why(winner, d, best, lora_share(d.get("config") or {}))))
    return out


def verdict_chart(rows: Sequence[dict[str, Any]], path) -> Any:
    """One panel per case: every system's mean s/token (log scale: the baselines span orders of
    magnitude), the SLO line, and the verdict in the panel's title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dlora_sim.chart_layout import color

    found = {v.case: v for v in verdicts(rows)}
    cases: dict[str, list[dict[str, Any]]] = {}
    for s in rows:
        if _case(s) in found:
            cases.setdefault(_case(s), []).append(s)
    if not cases:
        return None
    fig, axes = plt.subplots(1, len(cases), figsize=(3.6 * len(cases), 4.2), squeeze=False)
    systems = [s.get("system", "?") for s in rows]
    for ax, (case, runs) in zip(axes[0], cases.items()):
        names = [s["system"] for s in runs]
        vals = [s["mean_s_per_token"] for s in runs]
        bars = ax.bar(range(len(runs)), vals, color=[color(n, systems) for n in names],
                      edgecolor=["k" if n == "dlora" else "none" for n in names], linewidth=1.5)
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in vals], fontsize=7, padding=1)
        ax.set_xticks(range(len(runs)), names, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        slo = runs[0].get("slo_s_per_token")
        if slo:
            ax.axhline(slo, color="k", ls="--", lw=1, label=f"SLO {slo:g} s/token")
        v = found[case]
        verdict = "tie" if v.winner == "tie" else f"{v.winner} wins"
        ax.set_title(f"{case.replace(' ', chr(10))}\n{verdict}: dlora {v.s_per_token_change:+.1%} vs {v.best_baseline}",
                     fontsize=8)
        ax.grid(alpha=0.3, axis="y", which="both")
    axes[0][0].set_ylabel("mean s / output token (log)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
