"""Every scheduling decision lives here: local (per-replica) schedulers, routers, migration.

Policies see read-only views and return decisions; they never know whether time is simulated
(`dlora_sim`) or real (`dlora_gpu`). Configs name a policy class by `_target_`, so adding one is
one module plus one YAML file.
"""
from dlora_sim.core.contracts import (ClusterView, Decision, LocalScheduler, Migrator, PolicyError, ReplicaView,
                                     Router)

__all__ = ["ClusterView", "Decision", "LocalScheduler", "Migrator", "PolicyError", "ReplicaView", "Router"]
