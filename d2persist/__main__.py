"""
``d2persist`` (also ``python -m d2persist``): look at and check runs and bundles without
touching them.

    d2persist ls RUN|BUNDLE [--verify] [--json]
    d2persist verify RUN|BUNDLE

Exit codes: 0 all is well; 1 ``verify`` found a problem; 2 bad input (one sentence on stderr).
"""

import argparse
import json
import sys
import time

PROG = "d2persist"


def _size(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def ls(args):
    from d2persist.runview import open_view

    view = open_view(args.path)
    problems = set()
    if args.verify:
        problems = {p.split(":", 1)[0] for p in view.verify()[0]}
    rows = []
    for e in view.checkpoints() if view.kind == "run" else []:
        row = {"name": e.name, "iteration": e.iteration, "size": e.size,
               "time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.mtime)),
               "markers": e.markers, "metrics": e.metrics}
        if args.verify:
            row["verified"] = not any(p.endswith("/" + e.name) for p in problems)
        rows.append(row)
    data = {"path": view.path, "kind": view.kind, "checkpoints": rows, "export": view.export(),
            "mirror": view.mirror()}
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"{view.kind} {view.path}")
    for r in rows:
        shown = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["metrics"].items())
                          if k.endswith(("/AP", "/AP50")) and v is not None)
        it = "-" if r["iteration"] is None else r["iteration"]
        mark = ",".join(r["markers"])
        ok = "" if "verified" not in r else ("  ok" if r["verified"] else "  DAMAGED")
        print(f"  {r['name']:22s} it {it!s:>7}  {_size(r['size']):>9}  {r['time']}  "
              f"{mark:17s} {shown}{ok}")
    ex = data["export"]
    if ex is None:
        print("  export: none")
    elif not ex["complete"]:
        print(f"  export: {ex['folder']} INCOMPLETE (no manifest.json)")
    else:
        src = ex.get("source") or {}
        print(f"  export: {ex['folder']} complete, {', '.join(ex['formats'])}, weights "
              f"{src.get('from', 'final')} of iteration {ex.get('iteration')}")
        ev = ex.get("evaluation")
        if ev:
            from d2persist.manifest import EVAL_BACKENDS

            for b in sorted(ev["backends"], key=EVAL_BACKENDS.index):
                scores = ", ".join(f"{k} {v:.1f}" for k, v in ev["backends"][b].items()
                                   if v is not None)
                print(f"    {b:17s} {scores}" + ("  FAILED" if b in ev["failed"] else ""))
    if data["mirror"]:
        print(f"  mirror: {data['mirror']}")
    return 0


def verify(args):
    from d2persist.runview import open_view

    view = open_view(args.path)
    problems, notes = view.verify(progress=sys.stderr.isatty())
    for p in problems:
        print(f"PROBLEM: {p}")
    for n in notes:
        print(f"note: {n}")
    verdict = f"{len(problems)} problem(s)" if problems else "everything verifies"
    print(f"{view.kind} {view.path}: {verdict}")
    return 1 if problems else 0


def get_parser():
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.strip().split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ls", help="checkpoints, export and mirror of a run (newest first)")
    p.add_argument("path", help="a run folder (OUTPUT_DIR) or an export bundle")
    p.add_argument("--verify", action="store_true", help="also hash every checkpoint")
    p.add_argument("--json", action="store_true", help="print JSON, for scripts")
    p.set_defaults(fn=ls)
    p = sub.add_parser("verify", help="check every file against its sha256 or by safe loading")
    p.add_argument("path", help="a run folder (OUTPUT_DIR) or an export bundle")
    p.set_defaults(fn=verify)
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    from d2persist.cli import exit_on_known_errors

    return exit_on_known_errors(PROG)(args.fn)(args)


if __name__ == "__main__":
    sys.exit(main())
