"""The optional compiled build of the simulator's hot modules (mypyc): the same Python source, compiled to C
extension modules, about twice as fast (docs/performance.md#compiled-build); results byte-identical
(tests/test_compiled.py runs configs both ways).

`make run` and `make test` build it after installing (`python -m dlora_sim.mypyc_build`, ~30 s on 2
cores) into `dlora_sim/_compiled/`; where the build fails (no C compiler, say) the simulator stays pure
Python. Importing `dlora_sim` loads it only if it was built by this interpreter from the sources now on disk:
a digest of every module of dlora_sim/core, policies and des (the hot modules and every module mypyc read
their types from); a build that no longer matches is skipped with a warning that names a changed file, so
an edit is never shadowed by old compiled code. `DLORA_SIM_PURE=1` turns it off (the test suite runs pure:
a method a test replaces on a compiled class is still called directly by compiled code).

`dlora_sim.policies.dlora` and the other policy classes stay interpreted: a compiled dataclass that subclasses
an ABC fails at import (mypyc issue 1061).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import sys
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
# what the build is checked against: the folders of the hot modules (core imports only core, policies only core,
# the replica process core and policies: pyproject.toml's import-linter contracts)
SOURCES = ("core", "policies", "des")
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]   # this interpreter's own (EXT_SUFFIX), what builds are named

_active = False


def source(module: str) -> Path:
    return PACKAGE.parent / (module.replace(".", "/") + ".py")


def digests() -> dict[str, str]:
    """sha256 of every source file the build depends on, by path relative to the package's parent."""
    import hashlib   # only where a build exists: `import dlora_sim` stays light without one
    root = PACKAGE.parent
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in SOURCES for p in sorted((PACKAGE / folder).rglob("*.py"))}


class _Finder:
    """A meta path finder: the compiled modules (and the one shared library they import) in the build folder."""

    def __init__(self, files: dict[str, Path]):
        self.files = files

    def find_spec(self, name, path=None, target=None):
        f = self.files.get(name)
        return None if f is None else importlib.util.spec_from_file_location(name, f)


def read_build() -> tuple[dict | None, str | None]:
    """(the build's manifest, None) where this process can use the build in DIR, else (None, why not; '' where
    none was built)."""
    try:
        manifest = json.loads((DIR / MANIFEST).read_text())
    except FileNotFoundError:
        return None, ""
    except (OSError, ValueError) as e:
        return None, f"{DIR / MANIFEST} unreadable ({e})"
    built_by = str(manifest.get("python", "?"))
    if built_by != sys.version:
        return None, f"built by Python {built_by.split()[0]}, this is {sys.version.split()[0]}"
    if manifest.get("suffix") != SUFFIX:
        return None, f"built as *{manifest.get('suffix')}, this interpreter loads *{SUFFIX}"
    files = manifest.get("files", {})
    if not set(HOT) <= set(files):
        return None, f"its manifest lists no module for {sorted(set(HOT) - set(files))[0]}"
    built = manifest.get("sources", {})
    now = digests()
    changed = sorted(set(built) ^ set(now) | {p for p in now if built.get(p) != now[p]})
    if changed:
        return None, f"{changed[0]} changed since it was built"
    if not all((DIR / rel).is_file() for rel in files.values()):
        return None, "files listed in its manifest are missing"
    return manifest, None


def why_not() -> str | None:
    """None where the build in DIR can be used by this process, else why not ('' where none was built)."""
    return read_build()[1]


PURE_ENV = {"DLORA_SIM_PURE": "1"}   # a child process's environment for pure Python beside a compiled build


def turned_off() -> bool:
    """DLORA_SIM_PURE is set (to anything but 0): pure Python whatever is built."""
    return os.environ.get("DLORA_SIM_PURE", "") not in ("", "0")


def available() -> bool:
    """Whether a new process would run the compiled build (it exists, matches, and is not turned off)."""
    return not turned_off() and why_not() is None


def install() -> bool:
    """Put the compiled build in front of the pure-Python modules if it exists and matches this interpreter
    and the sources; called by `dlora_sim/__init__.py` before any hot module is imported."""
    global _active
    if _active or turned_off():
        return _active
    manifest, why = read_build()
    if manifest is None:
        if why:
            warnings.warn(f"dlora_sim: not using the compiled build in {DIR}: {why}; running pure Python "
                          "(rebuild: make compile)", RuntimeWarning, stacklevel=2)
        return False
    sys.meta_path.insert(0, _Finder({name: DIR / rel for name, rel in manifest["files"].items()}))
    _active = True
    return True


def active() -> bool:
    """Whether this process runs the hot modules compiled (those imported so far are, and the rest will be)."""
    return _active and all(loaded(sys.modules[m]) == "compiled" for m in HOT if m in sys.modules)


def build_kind() -> str:
    """'compiled' or 'pure': what this process runs the simulator on (summary.json's `sim_build`)."""
    return "compiled" if active() else "pure"


def loaded(module: ModuleType) -> str:
    """'compiled' or 'pure', for one imported module."""
    return "compiled" if (getattr(module, "__file__", None) or "").endswith(SUFFIX) else "pure"
