"""The optional compiled build of the simulator's hot modules (mypyc): the same Python source, compiled to C
extension modules, about twice as fast (benchmarks/results/sim_speed.md); results byte-identical
(tests/test_compiled.py runs configs both ways).

`make run` and `make test` build it after installing (`python -m dlora_sim.mypyc_build`, ~30 s on 2
cores) into `dlora_sim/_compiled/`; where the build fails (no C compiler, say) the simulator stays pure
Python. Importing `dlora_sim` loads it only if it was built by this interpreter from the sources now on disk
(a digest of the compiled modules' files); a build that no longer matches is skipped with a warning that
names the changed file, so an edit is never silently shadowed by old compiled code. `DLORA_SIM_PURE=1`
turns it off (the test suite does: some tests replace methods, which compiled classes refuse).

`dlora_sim.policies.dlora` stays interpreted: a compiled dataclass that subclasses an ABC fails at import
(mypyc issue 1061).
"""
from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import sysconfig
import warnings
from pathlib import Path
from types import ModuleType

PACKAGE = Path(__file__).resolve().parent
DIR = PACKAGE / "_compiled"
MANIFEST = "manifest.json"
# the modules a run spends its time in (py-spy over dlora and slora runs at 8-128 replicas)
HOT = ("dlora_sim.core.request", "dlora_sim.core.step", "dlora_sim.core.cost_model", "dlora_sim.core.validation",
       "dlora_sim.core.replica_state", "dlora_sim.policies.batching", "dlora_sim.policies.estimates",
       "dlora_sim.des.replica", "dlora_sim.policies.thresholds", "dlora_sim.policies.credits")
SUFFIX = sysconfig.get_config_var("EXT_SUFFIX") or importlib.machinery.EXTENSION_SUFFIXES[0]

_active = False


def source(module: str) -> Path:
    return PACKAGE.parent / (module.replace(".", "/") + ".py")


def digests() -> dict[str, str]:
    """sha256 of each hot module's source file, as the build records them."""
    return {m: hashlib.sha256(source(m).read_bytes()).hexdigest() for m in HOT}


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the compiled modules (and the one shared library they import) in the build folder."""

    def __init__(self, files: dict[str, Path]):
        self.files = files

    def find_spec(self, name, path=None, target=None):
        f = self.files.get(name)
        return None if f is None else importlib.util.spec_from_file_location(name, f)


def why_not() -> str | None:
    """None where the build in DIR can be used by this process, else why not ('' where none was built)."""
    try:
        manifest = json.loads((DIR / MANIFEST).read_text())
    except FileNotFoundError:
        return ""
    except (OSError, ValueError) as e:
        return f"{DIR / MANIFEST} unreadable ({e})"
    if manifest.get("python") != sys.version or manifest.get("suffix") != SUFFIX:
        return f"built by Python {str(manifest.get('python', '?')).split()[0]}, this is {sys.version.split()[0]}"
    changed = [m for m, d in digests().items() if manifest.get("sources", {}).get(m) != d]
    if changed:
        return f"{source(changed[0]).relative_to(PACKAGE.parent)} changed since it was built"
    if not all((DIR / rel).is_file() for rel in manifest.get("files", {}).values()):
        return "files listed in its manifest are missing"
    return None


def install() -> bool:
    """Put the compiled build in front of the pure-Python modules if it exists and matches this interpreter
    and the sources; called by `dlora_sim/__init__.py` before any hot module is imported."""
    global _active
    if _active or os.environ.get("DLORA_SIM_PURE", "") not in ("", "0"):
        return _active
    why = why_not()
    if why is None and any(name in sys.modules for name in HOT):
        why = "hot modules were imported before dlora_sim"
    if why is not None:
        if why:
            warnings.warn(f"dlora_sim: not using the compiled build in {DIR}: {why}; running pure Python "
                          "(rebuild: make compile)", RuntimeWarning, stacklevel=2)
        return False
    manifest = json.loads((DIR / MANIFEST).read_text())
    sys.meta_path.insert(0, _Finder({name: DIR / rel for name, rel in manifest["files"].items()}))
    _active = True
    return True


def active() -> bool:
    """Whether the hot modules run compiled in this process."""
    return _active and all(getattr(sys.modules.get(m), "__file__", "").endswith(SUFFIX) for m in HOT
                           if m in sys.modules)


def loaded(module: ModuleType) -> str:
    """'compiled' or 'pure', for one imported module."""
    return "compiled" if getattr(module, "__file__", "").endswith(SUFFIX) else "pure"
