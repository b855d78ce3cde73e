"""Builds the optional compiled build of the simulator's hot modules (dlora_sim/compiled.py says what it is
and when it is used): `python -m dlora_sim.mypyc_build [build|status|clean] [--force]`. Needs the `compiled`
extra (mypy, which carries mypyc) and a C compiler; `make compile` runs it."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from dlora_sim.compiled import DIR, HOT, MANIFEST, SUFFIX, digests, source, turned_off, why_not


@contextlib.contextmanager
def _locked(dest: Path):
    """One build at a time (two `make` runs at once wait for each other instead of colliding)."""
    try:
        import fcntl
    except ImportError:   # not POSIX: no lock
        yield
        return
    with open(dest.with_name(dest.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _compile(work: Path) -> dict[str, str]:
    """mypyc's C for the hot modules, compiled under `work`; {module: path relative to work/lib}."""
    from mypyc.build import mypycify   # the `compiled` extra
    from setuptools import setup

    log, cwd = io.StringIO(), os.getcwd()
    try:
        os.chdir(work)   # mypyc writes its C and setuptools its objects under the working directory
        with contextlib.redirect_stdout(log):   # a compiler command line per module: shown only on failure
            # type errors only in the compiled modules themselves; others are read for their types
            exts = mypycify(["--follow-imports=silent", "--ignore-missing-imports",
                             *(str(source(m)) for m in HOT)], opt_level="3")
            if os.name == "posix":   # no fused multiply-add where CPython rounds twice: the same floats
                for ext in exts:
                    ext.extra_compile_args = [*ext.extra_compile_args, "-ffp-contract=off"]
            setup(name="dlora_sim_compiled", ext_modules=exts, script_args=[
                "-q", "build_ext", "--build-lib", str(work / "lib"), "--build-temp", str(work / "tmp")])
    except (Exception, SystemExit):   # mypy's type errors end in SystemExit
        sys.stderr.write(log.getvalue()[-4000:])
        raise
    finally:
        os.chdir(cwd)
    files = {".".join(p.relative_to(work / "lib").parts).removesuffix(SUFFIX): str(p.relative_to(work / "lib"))
             for p in (work / "lib").rglob(f"*{SUFFIX}")}
    missing = [m for m in HOT if m not in files]
    if missing:
        raise RuntimeError(f"mypyc built no module for {missing}")
    return files


def build(dest: Path = DIR) -> Path:
    """Compile the hot modules with mypyc into `dest`, replacing what is there only once the whole build
    succeeded (a failed build leaves the previous one, or none, and no files of its own)."""
    with _locked(dest):
        sums = digests()
        work = Path(tempfile.mkdtemp(prefix="dlora_mypyc_"))
        stage = Path(tempfile.mkdtemp(prefix="_compiled.", dir=dest.parent))
        old = dest.with_name(dest.name + ".old")
        try:
            files = _compile(work)
            for rel in files.values():
                (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(work / "lib" / rel, stage / rel)
            (stage / MANIFEST).write_text(json.dumps({"python": sys.version, "suffix": SUFFIX, "sources": sums,
                                                      "files": files}, indent=1) + "\n")
            shutil.rmtree(old, ignore_errors=True)
            if dest.exists():   # a process importing in between finds no build and runs pure Python
                dest.rename(old)
            stage.rename(dest)
        finally:
            for leftover in (work, stage, old):
                shutil.rmtree(leftover, ignore_errors=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m dlora_sim.mypyc_build", description=__doc__.splitlines()[0])
    ap.add_argument("command", nargs="?", default="build", choices=["build", "status", "clean"],
                    help="build: (re)build unless the build is current; status: whether runs use it; clean: remove it")
    ap.add_argument("--force", action="store_true", help="build even if the build is current")
    a = ap.parse_args(argv)
    why = why_not()
    if a.command == "clean":
        shutil.rmtree(DIR, ignore_errors=True)
        print(f"removed {DIR}")
    elif a.command == "status":
        print(f"compiled ({len(HOT)} modules, {DIR})" if why is None and not turned_off() else
              "pure Python: " + ("DLORA_SIM_PURE is set" if turned_off() else why or "no compiled build (make compile)"))
    elif why is None and not a.force:
        print(f"compiled build: current ({DIR})")
    else:
        try:
            import mypyc  # noqa: F401
        except ImportError:
            print("compiled build: skipped (mypyc not installed: pip install -e '.[compiled]'); pure Python")
            return 0
        try:
            print(f"compiled build: {build()} ({len(HOT)} modules)")
        except (Exception, SystemExit) as e:   # any failure leaves pure Python, which gives the same results
            print(f"compiled build failed, the simulator runs as pure Python: {type(e).__name__}: {e}",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
