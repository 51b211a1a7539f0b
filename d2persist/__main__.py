"""
``d2persist`` (also ``python -m d2persist``): look at and check runs and bundles without
touching them, and predict with them at scale.

    d2persist ls RUN|BUNDLE|URL [--verify] [--json]
    d2persist verify RUN|BUNDLE|URL [--json]
    d2persist diff A B [--json]          (runs, bundles, their URLs, or config files)
    d2persist plot RUN|URL [-o FILE]
    d2persist predict SRC --artifacts BUNDLE|RUN|URL --output DST [--pictures] [--ray [ADDR]]
    d2persist serve BUNDLE|RUN|URL [--port N] [--replicas N]

A URL is a run's mirror or a bundle at any fsspec location (``s3://bucket/runs/a``), read with
fsspec's usual credentials and settings.

Exit codes: 0 all is well; 1 ``verify`` (or ``ls --verify``) found a problem, or ``predict`` an
image it could not read; 2 bad input (one sentence on stderr). None of them takes the run lock
or writes into a run (``plot`` writes only its picture, ``training.png`` here or ``-o FILE``;
``predict`` only into DST).
"""

import argparse
import dataclasses
import json
import sys
import time

PROG = "d2persist"
#: what ``ls`` shows of each checkpoint's evaluation: each family's headline metrics, and the
#: validation loss (PERSIST.VAL_LOSS)
_HEADLINES = ("/AP", "/AP50", "/mIoU", "/PQ")
_VAL_LOSS = "validation/total_loss"


def _shown(key, value):
    return f"{key} {value:.4g}" if key == _VAL_LOSS else f"{key} {value:.1f}"


def _size(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def ls(args):
    from d2persist.artifacts.problems import DAMAGED, MISSING
    from d2persist.artifacts.view import open_view

    view = open_view(args.path)
    entries = view.checkpoints() if view.kind == "run" else []  # (before verify: each hashed)
    problems = []
    if args.verify:
        problems = view.verify(progress=sys.stderr.isatty())[0]
    rows = []
    for e in entries:
        row = {"name": e.name, "iteration": e.iteration, "size": e.size,
               "time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.mtime)),
               "markers": e.markers, "metrics": e.metrics}
        if args.verify:
            # this file's own bytes (a record about it, e.g. best.json's, is not damage)
            row["verified"] = not any(p.path == view.where(e.name) and p.kind in (DAMAGED, MISSING)
                                      for p in problems)
        rows.append(row)
    data = {"path": view.path, "kind": view.kind, "checkpoints": rows, "export": view.export(),
            "mirror": view.mirror_state(), "early_stop": view.early_stop()}
    failed = 1 if problems else 0  # (--verify: as verify's exit code)
    if args.json:
        print(json.dumps(data, indent=2))
        return failed
    print(f"{view.kind} {view.path}")
    for r in rows:
        shown = ", ".join(_shown(k, v) for k, v in sorted(r["metrics"].items())
                          if v is not None and (k.endswith(_HEADLINES) or k == _VAL_LOSS))
        it = "-" if r["iteration"] is None else r["iteration"]
        mark = ",".join(r["markers"])
        ok = "" if "verified" not in r else ("  ok" if r["verified"] else "  DAMAGED")
        print(f"  {r['name']:22s} it {it!s:>7}  {_size(r['size']):>9}  {r['time']}  "
              f"{mark:17s} {shown}{ok}")
    early = data["early_stop"]
    if early and early.get("stopped_after") is not None:
        print(f"  stopped early after iteration {early['stopped_after']}: {early['metric']} "
              f"did not improve by more than {early['min_delta']} in "
              f"{early['without_improvement']} evaluations (best {early['best']} after "
              f"iteration {early['best_iteration']})")
    ex = data["export"]
    if ex is None:
        print("  export: none")
    elif ex["folder"] is None:
        print(f"  export: unknown: {ex['problem']}")
    elif not ex["complete"]:
        print(f"  export: {ex['folder']} INCOMPLETE: {ex.get('problem', 'no manifest.json')}")
    else:
        src = ex.get("source") or {}
        print(f"  export: {ex['folder']} complete, {', '.join(ex['formats'])}, weights "
              f"{src.get('from', 'final')} of iteration {ex.get('iteration')}")
        ev = ex.get("evaluation")
        if ev:
            from d2persist.layout import EVAL_BACKENDS

            # (a backend a later d2persist evaluated: after this version's own)
            for b in sorted(ev["backends"], key=lambda b: (EVAL_BACKENDS + (b,)).index(b)):
                scores = ", ".join(f"{k} {v:.1f}" for k, v in ev["backends"][b].items()
                                   if v is not None)
                print(f"    {b:17s} {scores}" + ("  FAILED" if b in ev["failed"] else ""))
    m = data["mirror"]
    if m is not None:
        if m["error"]:
            state = f"cannot be read ({m['error']})"
        elif m["in_step"]:
            state = f"in step (last_checkpoint {m['last_checkpoint']})"
        else:
            lacks = f"lacks {', '.join(m['missing'])}; " if m["missing"] else ""
            state = f"behind: {lacks}its last_checkpoint is {m['last_checkpoint'] or 'missing'}"
        print(f"  mirror: {m['url']} {state}")
    return failed


def verify(args):
    from d2persist.artifacts.view import open_view

    view = open_view(args.path)
    problems, notes = view.verify(progress=sys.stderr.isatty() and not args.json)
    if args.json:
        print(json.dumps({"path": view.path, "kind": view.kind,
                          "problems": [dataclasses.asdict(p) for p in problems],
                          "notes": notes}, indent=2))
        return 1 if problems else 0
    for p in problems:
        print(f"PROBLEM: {p.sentence}")
    for n in notes:
        print(f"note: {n}")
    verdict = f"{len(problems)} problem(s)" if problems else "everything verifies"
    print(f"{view.kind} {view.path}: {verdict}")
    return 1 if problems else 0


def _jsonable(v):
    """What a config value JSON cannot hold becomes: a dataclass (ShapeSpec) its fields."""
    return dataclasses.asdict(v) if dataclasses.is_dataclass(v) else repr(v)


def _value(v):
    return "(absent)" if v is None else json.dumps(v, default=_jsonable)


def diff(args):
    from d2persist.artifacts.describe import diff as diff_runs

    d = diff_runs(args.a, args.b)
    if args.json:
        print(json.dumps(d, indent=2, default=_jsonable))
        return 0
    print(f"A: {args.a} ({d['kinds'][0]})")
    print(f"B: {args.b} ({d['kinds'][1]})")
    for section in ("config", "persist"):
        print(f"{section}: {len(d[section])} key(s) differ" + (":" if d[section] else ""))
        for key, (x, y) in d[section].items():
            print(f"  {key}: {_value(x)} -> {_value(y)}")
    ca, cb = d["classes"]
    print("classes: " + ("the same" if ca == cb else f"{ca} -> {cb}"))
    for side, it, final in zip("AB", d["last_iteration"], d["final"]):
        shown = ", ".join(f"{k} {v:.1f}" for k, v in sorted(final.items())
                          if k.endswith(("/AP", "/AP50")) and v is not None)
        print(f"{side}: last iteration {it if it is not None else '-'}; final {shown or '-'}")
    return 0


def plot(args):
    import os

    from d2persist.artifacts.plot import plot_run
    from d2persist.artifacts.view import open_view
    from d2persist.errors import D2PersistError
    from d2persist.files.atomic import check_output_file

    try:
        import matplotlib  # noqa: F401 (detectron2 brings it; a deploy install may not)
    except ImportError:
        raise D2PersistError("d2persist plot draws with matplotlib, which is not installed "
                             "here: pip install matplotlib.") from None
    view = open_view(args.path)
    if view.kind != "run":
        raise D2PersistError(f"{args.path} is a bundle: plot needs the run folder (its "
                             "metrics.json).")
    # here by default, never into the run: its training writes RUN/training.png itself
    out = args.output or "training.png"
    check_output_file(out)
    if not view.remote:
        run = os.path.realpath(args.path)
        if os.path.commonpath([run, os.path.realpath(out)]) == run:
            raise D2PersistError(f"{os.path.abspath(out)} is inside the run {args.path}, which "
                                 "plot never writes into: name an output outside it (-o FILE).")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    plot_run(view, out)
    print(f"picture: {os.path.abspath(out)}")
    return 0


def _loader(args, backend, sha256=None):
    """
    A picklable loader of the predictor for Ray's actors and replicas (called in each with its
    ``threads``): ``backend`` as resolved here, so that every copy loads the same one, and of a
    run folder the checkpoint of ``sha256`` (described here), not the newest when it loads.
    ONNX Runtime's threads do not spin: the copies share their nodes with Ray's own processes.
    """
    import functools

    from d2persist.predict.load import load_predictor

    return functools.partial(load_predictor, args.artifacts, device=args.device,
                             backend=backend, precision=args.precision, spin=False,
                             sha256=sha256)


def _ray_engine(args, backend, sha256=None):
    """
    The Ray engine of ``predict --ray``: each actor's threads as many as its CPUs (given, or
    the cluster's share).
    """
    from d2persist.scale.batch import RayEngine

    return RayEngine(_loader(args, backend, sha256), None if args.ray == "local" else args.ray,
                     args.workers, args.cpus_per_worker, args.gpus_per_worker)


def predict(args):
    from d2persist.predict.load import check_device, describe_predictor, load_predictor
    from d2persist.scale.batch import check_destination, predict_source
    from d2persist.scale.ray_nodes import require_ray

    check_destination(args.output)  # before the model loads
    engine = None
    if args.ray:  # the actors load the model; here, what it is (the job's identity)
        require_ray(f"{PROG} predict --ray", "ray.data")
        here = args.ray == "local"  # this machine runs the actors
        predictor = describe_predictor(args.artifacts, backend=args.backend,
                                       precision=args.precision, here=here)
        if here:
            check_device(predictor.backend, args.device)
        engine = _ray_engine(args, predictor.backend, predictor.sha256)
    else:
        predictor = load_predictor(args.artifacts, device=args.device, backend=args.backend,
                                   precision=args.precision)
    print(f"weights: {predictor.weights}")
    record = predict_source(predictor, args.src, args.output,
                            min_score=args.confidence_threshold, pictures=args.pictures,
                            progress=sys.stderr.isatty(), ray=engine)
    counts, engine = record["counts"], record["engine"]
    on = f" on Ray ({engine['workers']} worker(s) x {engine['cpus_per_worker']:g} CPU(s))" \
        if engine.get("cpus_per_worker") else ""
    print(f"{counts['inputs']} image(s): {counts['done']} predicted{on}, {counts['skipped']} "
          f"done before, {counts['failed']} could not be read; outputs: {args.output}")
    return 1 if counts["failed"] else 0


def serve(args):
    from d2persist.predict.load import describe_predictor, load_predictor
    from d2persist.scale.ray_nodes import require_ray
    from d2persist.scale.serve import run_server

    require_ray(f"{PROG} serve", "ray.serve")
    address = None if args.ray in (None, "local") else args.ray
    # bad artifacts or options: one sentence here, before Ray starts; where this machine runs
    # the replicas, its device and the model are checked by loading it once
    if address is None:
        loaded = load_predictor(args.artifacts, device=args.device, backend=args.backend,
                                precision=args.precision)
    else:
        loaded = describe_predictor(args.artifacts, backend=args.backend,
                                    precision=args.precision, here=False)
    backend, sha256 = loaded.backend, loaded.sha256
    del loaded  # (the replicas hold the model; this process serves none)
    # every replica serves these weights: one Serve restarts after the artifacts changed
    # (a new export at the URL, a new checkpoint in the run) does not start
    run_server(_loader(args, backend, sha256), args.host, args.port, args.replicas,
               args.cpus_per_replica, address, args.max_bytes, args.max_batch_size, sha256)
    return 0


def get_parser():
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.strip().split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ls", help="checkpoints, export and mirror of a run (newest first)")
    p.add_argument("path", help="a run folder (OUTPUT_DIR), an export bundle, or a URL of one")
    p.add_argument("--verify", action="store_true", help="also hash every checkpoint")
    p.add_argument("--json", action="store_true", help="print JSON, for scripts")
    p.set_defaults(fn=ls)
    p = sub.add_parser("verify", help="check every file against its sha256 or by safe loading")
    p.add_argument("path", help="a run folder (OUTPUT_DIR), an export bundle, or a URL of one")
    p.add_argument("--json", action="store_true",
                   help="print JSON (each problem's path, kind and sentence), for scripts")
    p.set_defaults(fn=verify)
    p = sub.add_parser("diff", help="config keys, options, classes and results of two runs, "
                       "bundles or config files")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true", help="print JSON, for scripts")
    p.set_defaults(fn=diff)
    p = sub.add_parser("plot", help="losses, learning rate and evaluations of a run, as a PNG")
    p.add_argument("path", help="a run folder (OUTPUT_DIR) or its mirror's URL")
    p.add_argument("-o", "--output", help="the PNG (default: training.png here; a run "
                   "trained with PersistHook keeps its own RUN/training.png)")
    p.set_defaults(fn=plot)
    from d2persist.cli import (
        add_predictor_arguments,
        add_threshold_argument,
        non_negative_number,
        port_number,
        positive_int,
        positive_number,
    )

    p = sub.add_parser("predict", help="predict every image of a folder, glob, list or URL "
                       "into a folder or URL, each once; rerun to finish an interrupted job")
    p.add_argument("src", help="a folder (recursively), a glob, a text file listing image "
                   "paths, or an fsspec URL of one (s3://bucket/images/)")
    p.add_argument("--artifacts", required=True,
                   help="an export bundle, a training OUTPUT_DIR, or a bundle's URL")
    p.add_argument("--output", required=True, help="folder or fsspec URL of the outputs: "
                   "REL.json per image (as infer_single writes it), job.json at the end")
    p.add_argument("--pictures", action="store_true", help="also REL.png, the drawing")
    add_threshold_argument(p)
    add_predictor_arguments(p)
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="predict on Ray (pip install 'd2persist[ray]'): alone, a local cluster "
                   "for the job; 'auto', the running cluster this machine belongs to; or its "
                   "address")
    p.add_argument("--workers", type=positive_int, default=1, help="--ray: actors (default 1)")
    p.add_argument("--cpus-per-worker", type=positive_number, default=None,
                   help="--ray: CPUs each actor reserves and its threads (default: the most "
                   "whole CPUs for which the Ray cluster's nodes hold all the workers, a "
                   "fraction of one where they outnumber the CPUs)")
    p.add_argument("--gpus-per-worker", type=non_negative_number, default=0.0,
                   help="--ray: GPUs each actor reserves (PyTorch on GPUs)")
    p.set_defaults(fn=predict)
    p = sub.add_parser("serve", help="serve predictions over HTTP on Ray Serve: POST /predict "
                       "with an image, GET /healthz")
    p.add_argument("artifacts", help="an export bundle, a training OUTPUT_DIR, or a bundle's URL")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=8000)
    add_predictor_arguments(p)
    p.add_argument("--replicas", type=positive_int, default=1,
                   help="copies of the model (default 1)")
    p.add_argument("--cpus-per-replica", type=positive_number, default=None,
                   help="CPUs each replica reserves and its threads (default: the most whole "
                   "CPUs for which the Ray cluster's nodes hold all the replicas, a fraction of "
                   "one where they outnumber the CPUs)")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="a running Ray cluster ('auto' or its address); default: a local one")
    p.add_argument("--max-bytes", type=positive_int, default=32 * 1024 * 1024,
                   help="the largest image a request may send (default 32 MiB)")
    p.add_argument("--max-batch-size", type=positive_int, default=8,
                   help="concurrent requests a replica takes in one call (@serve.batch; "
                   "default 8; 1: none)")
    p.set_defaults(fn=serve)
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    from d2persist.cli import exit_on_known_errors

    return exit_on_known_errors(PROG)(args.fn)(args)


if __name__ == "__main__":
    sys.exit(main())
