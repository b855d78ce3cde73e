"""Calibration: microbenchmarks -> CSV -> fitted profiles, and analytic profiles from datasheets."""
