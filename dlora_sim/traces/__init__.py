"""Real traces: loaders into the canonical request stream, adapter mapping, registry and stats.

Loaders (azure_llm, mooncake, servegen, azure_functions) parse; mapping assigns adapters; lengths
fills token counts a trace lacks; transform windows and scales; workloads wires these into the
classes Hydra `workload` configs instantiate; registry finds and fetches files; stats describes them.
"""
from dlora_sim.core.errors import TraceFormatError, TraceNotFoundError

__all__ = ["TraceFormatError", "TraceNotFoundError"]
