"""`dlora-trace list | fetch NAME | stats [NAME ...]`: the registry of public traces from the shell."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dlora_sim.core.errors import UserError
from dlora_sim.traces import registry


def _list(args) -> int:
    reg = registry.load_registry()
    print(f"registry: {registry.registry_path()}")
    print(f"{'name':24} {'format':10} {'present':8} {'files':>5}  {'licence':12} description")
    for name, e in reg.items():
        present = "yes" if registry.is_present(name) else "no"
        print(f"{name:24} {e.format:10} {present:8} {len(e.files):5d}  {e.licence:12} {e.description}")
    print("search order: " + ", ".join(str(d) for d in registry.search_dirs()))
    return 0


def _fetch(args) -> int:
    from tqdm import tqdm

    for name in args.names:
        entry = registry.get_entry(name)
        folder, unverified = registry.fetch(name, Path(args.dest) if args.dest else None, args.allow_unverified,
                                            progress=lambda files: tqdm(files, desc=name, unit="file"))
        print(f"{name}: {len(entry.files) - len(unverified)} file(s) verified in {folder}")
        for path, digest in unverified.items():
            print(f"  UNVERIFIED {path}: sha256 {digest} (add it to {registry.registry_path()})")
        if entry.note:
            print(f"  note: {entry.note}")
    return 0


def _stats(args) -> int:
    from dlora_sim.traces.stats import format_stats, save_charts, trace_stats, write_json

    names = args.names or [n for n in registry.load_registry() if registry.is_present(n)]
    if args.path and len(names) != 1:
        print("--path needs exactly one trace name", file=sys.stderr)
        return 2
    out = Path(args.out)
    reg = registry.load_registry()
    path = args.path
    if len(names) == 1 and names[0] not in reg and Path(names[0]).exists():   # `stats FILE`
        path = names[0]
        match = [n for n, e in reg.items() if Path(path).name in {Path(f.path).name for f in e.files}]
        if len(match) != 1:
            print(f"dlora-trace: {path} is a file, not a trace name: say which trace's format it has, "
                  f"e.g. `dlora-trace stats azure_conv --path {path}` (names: {', '.join(reg)})", file=sys.stderr)
            return 2
        names = match
    for name in names:
        s = trace_stats(name, path)
        print(format_stats(s))
        paths = save_charts(s, out) + [write_json(s, out)]
        print("  saved: " + ", ".join(str(p) for p in paths))
    if not args.names:
        absent = [n for n in registry.load_registry() if n not in names]
        if absent:
            print(f"not present (run `dlora-trace fetch NAME`): {', '.join(absent)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dlora-trace", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="registered traces and whether they are present locally").set_defaults(fn=_list)
    f = sub.add_parser("fetch", help="download a trace into $DLORA_TRACE_DIR or the user cache, verifying sha256")
    f.add_argument("names", nargs="+")
    f.add_argument("--dest", help="root folder to download into (default $DLORA_TRACE_DIR or ~/.cache/dlora/traces)")
    f.add_argument("--allow-unverified", action="store_true", help="accept files the registry has no sha256 for")
    f.set_defaults(fn=_fetch)
    s = sub.add_parser("stats", help="rate, length percentiles, skew and charts (default: every present trace)")
    s.add_argument("names", nargs="*", help="trace names, or one trace file (its format is recognised by its name)")
    s.add_argument("--path", help="read this file/folder instead of resolving the trace")
    s.add_argument("--out", default="outputs/trace-stats", help="folder for charts and JSON")
    s.set_defaults(fn=_stats)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except (KeyError, ValueError, FileNotFoundError, UserError) as e:
        print(f"dlora-trace: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
