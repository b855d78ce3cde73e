"""The suite runs the pure-Python simulator: a test that replaces a method of a class the optional compiled build
(dlora_sim/compiled.py) makes native would check less there (compiled callers call the original directly).
tests/test_compiled.py runs configs both ways and checks the results are byte-identical."""
import os

os.environ.setdefault("DLORA_SIM_PURE", "1")   # DLORA_SIM_PURE=0 pytest: the suite on the compiled build
