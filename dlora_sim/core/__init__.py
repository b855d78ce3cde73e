"""The serving core: everything both executors share, and nothing that moves time.

Requests and workloads, the policy contracts, replica and cluster configuration, the replica state that
applies a decision, the `Cluster` front end, the cost model and its profiles, results, config
composition and the apps' shared plumbing. It imports neither SimPy nor torch (import-linter checks):
the simulator (`dlora_sim.des`) advances simulated time over it, the runtime (`dlora_gpu`) runs kernels.
"""
