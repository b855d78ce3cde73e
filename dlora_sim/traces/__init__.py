"""Real traces: loaders into the canonical request stream, adapter mapping, registry and stats.

Loaders (azure_llm, mooncake, servegen, azure_functions) parse; mapping assigns adapters; lengths
fills token counts a trace lacks; transform windows and scales; workloads wires these into the
classes Hydra `workload` configs instantiate; registry finds and fetches files; stats describes them.
"""
from dlora_sim.core.errors import TraceFormatError, TraceNotFoundError

__all__ = ["TraceFormatError", "TraceNotFoundError"]


def load(name_or_path: str, *overrides: str, seed: int = 0):
    """The canonical request table of a workload as a pandas DataFrame (arrival_s, adapter, prompt_tokens,
    output_tokens): a canonical CSV by path (file order), or a `conf/workload` name (azure_conv, mooncake,
    servegen_small, ...) with its config's overrides, e.g. `load("azure_conv", "workload.max_requests=1000")`:
    the requests every executor would serve, in arrival order."""
    from pathlib import Path

    import numpy as np
    import pandas as pd

    from dlora_sim.core.config import build_workload, compose
    from dlora_sim.core.paths import CONF_DIR

    if Path(name_or_path).suffix == ".csv" or Path(name_or_path).exists():
        from dlora_sim.workload.trace_csv import read_canonical_table
        return read_canonical_table(name_or_path)
    names = sorted(p.stem for p in (CONF_DIR / "workload").glob("*.yaml"))
    if name_or_path not in names:
        raise TraceNotFoundError(f"{name_or_path!r}: neither a file nor a workload config; workloads: {names}")
    reqs = build_workload(compose([f"workload={name_or_path}", f"seed={seed}", *overrides])).requests
    cols = ("arrival_s", "adapter", "prompt_tokens", "output_tokens")
    # RequestArrays has the columns; a list of RequestSpec gives them field by field
    data = {k: getattr(reqs, k) if hasattr(reqs, k) else [getattr(r, k) for r in reqs] for k in cols}
    return pd.DataFrame({k: np.asarray(data[k], dtype="float64" if k == "arrival_s" else "int64") for k in cols})

__all__ += ["load"]
