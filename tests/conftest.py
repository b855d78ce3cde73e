"""The suite runs the pure-Python simulator: some tests replace methods of classes that the optional compiled
build (dlora_sim/compiled.py) makes native, which refuse it. tests/test_compiled.py runs configs both ways and
checks the results are byte-identical."""
import os

os.environ["DLORA_SIM_PURE"] = "1"
