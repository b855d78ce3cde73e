"""Workloads: the canonical request stream, synthetic generators and trace replay."""
from dlora_sim.core.workload import AdapterSpec, RequestSpec, Workload, WorkloadSource

__all__ = ["AdapterSpec", "RequestSpec", "Workload", "WorkloadSource"]
