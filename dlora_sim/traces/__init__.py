"""Real traces: loaders into the canonical request stream, adapter mapping, registry and stats.

Loaders (azure_llm, mooncake, servegen, azure_functions) parse; mapping assigns adapters; lengths
fills token counts a trace lacks; transform windows and scales; workloads wires these into the
classes Hydra `workload` configs instantiate; registry finds and fetches files; stats describes them.
"""
from dlora_sim.core.errors import TraceFormatError, TraceNotFoundError

__all__ = ["TraceFormatError", "TraceNotFoundError"]


def load(name_or_path: str, *overrides: str, seed: int = 0):
    """The canonical request table of a workload as a pandas DataFrame (arrival_s, adapter, prompt_tokens,
    output_tokens, in arrival order): a canonical CSV by path, or a `conf/workload` name (azure_conv,
    mooncake, servegen_small, ...) with its config's overrides, e.g. `load("azure_conv",
    "workload.max_requests=1000")`: the requests every executor would serve."""
    from pathlib import Path

    import numpy as np
    import pandas as pd

    from dlora_sim.core.config import build_workload, compose
    from dlora_sim.core.paths import CONF_DIR
    from dlora_sim.core.workload import RequestArrays

    if Path(name_or_path).suffix == ".csv" or Path(name_or_path).exists():
        from dlora_sim.workload.trace_csv import read_canonical_csv
        specs = read_canonical_csv(name_or_path)
        cols = {"arrival_s": [r.arrival_s for r in specs], "adapter": [r.adapter for r in specs],
                "prompt_tokens": [r.prompt_tokens for r in specs], "output_tokens": [r.output_tokens for r in specs]}
    else:
        names = sorted(p.stem for p in (CONF_DIR / "workload").glob("*.yaml"))
        if name_or_path not in names:
            raise TraceNotFoundError(f"{name_or_path!r}: neither a file nor a workload config; workloads: {names}")
        reqs = build_workload(compose([f"workload={name_or_path}", f"seed={seed}", *overrides])).requests
        if isinstance(reqs, RequestArrays):
            cols = {k: getattr(reqs, k) for k in ("arrival_s", "adapter", "prompt_tokens", "output_tokens")}
        else:
            cols = {k: [getattr(r, k) for r in reqs] for k in ("arrival_s", "adapter", "prompt_tokens", "output_tokens")}
    return pd.DataFrame({"arrival_s": np.asarray(cols["arrival_s"], dtype="float64"),
                         **{k: np.asarray(cols[k], dtype="int64") for k in ("adapter", "prompt_tokens", "output_tokens")}})


__all__ += ["load"]
