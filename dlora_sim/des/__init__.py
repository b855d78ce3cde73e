"""Simulated time: the SimPy processes that drive the serving core (arrivals, replicas, migration)."""
