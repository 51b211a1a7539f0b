#!/usr/bin/env python
"""
``d2persist ls`` and ``d2persist verify`` on a large run folder: ``ls`` of a run with 200
checkpoints (goal under 1 s, the whole command), and ``verify``'s hashing throughput against
``sha256sum`` on the same files (goal >= 0.9x, or hash in parallel and beat it); ``openssl
dgst`` alongside, as coreutils' ``sha256sum`` may not use the CPU's SHA instructions.

The run folder is synthetic but laid out as PersistHook writes it: ``--checkpoints`` periodic
checkpoints of ``--mb`` MB each (random bytes: ``ls`` and sha256 do not look inside) with their
``.sha256`` sidecars, ``model_final.pth`` and ``model_best.pth`` as hard links, ``best.json``,
``last_checkpoint``, ``config.yaml`` and a ``metrics.json`` of 20 rows per checkpoint with an
evaluation at each one. The files are read once before timing, so both sides hash from the page
cache (what a second ``sha256sum -c`` sees too).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import REPO, alternate, machine, median, parse_args, table


def make_run(folder, checkpoints, mb, period=100):
    os.makedirs(folder, exist_ok=True)
    block = os.urandom(1 << 20)
    rows = []
    for i in range(checkpoints):
        it = (i + 1) * period - 1
        name = f"model_{it:07d}.pth"
        path = os.path.join(folder, name)
        h = hashlib.sha256()
        with open(path, "wb") as f:
            for k in range(mb):  # each file different: a byte of its own in every block
                chunk = bytes([i % 256, k % 256]) + block[2:]
                f.write(chunk)
                h.update(chunk)
        with open(path + ".sha256", "w") as f:
            f.write(f"{h.hexdigest()}  {name}\n")
        for j in range(20):
            rows.append({"iteration": it - 19 + j, "total_loss": 1.0 / (it + j + 1), "lr": 0.02})
        rows.append({"iteration": it, "bbox/AP": 50 + i % 40, "segm/AP": 49 + i % 40})
    last = f"model_{checkpoints * period - 1:07d}.pth"
    for alias in ("model_final.pth", "model_best.pth"):
        os.link(os.path.join(folder, last), os.path.join(folder, alias))
        shutil.copy(os.path.join(folder, last + ".sha256"), os.path.join(folder, alias + ".sha256"))
    with open(os.path.join(folder, "best.json"), "w") as f:
        json.dump({"metric": "segm/AP", "mode": "max", "value": 1.0,
                   "iteration": checkpoints * period - 1}, f)
    with open(os.path.join(folder, "last_checkpoint"), "w") as f:
        f.write("model_final.pth")
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        f.write("MODEL:\n  META_ARCHITECTURE: GeneralizedRCNN\nSOLVER:\n  MAX_ITER: 100\n")
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def timed(cmd):
    def go():
        start = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if res.returncode != 0:
            raise SystemExit(f"{cmd} failed: {res.stdout[-1000:]}{res.stderr[-1000:]}")
        return wall
    return go


def main():
    args = parse_args(__doc__, repeats=5)
    n = 200
    mb = 2 if args.quick else 8
    tmp = tempfile.mkdtemp(prefix="d2persist-bench-runview-")
    try:
        run = os.path.join(tmp, "run")
        make_run(run, n, mb)
        files = sorted(f for f in os.listdir(run) if f.endswith(".pth"))
        total = sum(os.path.getsize(os.path.join(run, f)) for f in files
                    if f.startswith("model_0")) / 1e6  # the unique bytes both sides hash
        for f in files:  # into the page cache
            with open(os.path.join(run, f), "rb") as fh:
                while fh.read(1 << 24):
                    pass
        d2p = [sys.executable, "-m", "d2persist"]
        ls_times = alternate({"ls": timed([*d2p, "ls", run]),
                              "ls --json": timed([*d2p, "ls", run, "--json"])}, args.repeats)
        sums = [os.path.join(run, f + ".sha256") for f in files]
        check = ["sha256sum", "--quiet", "-c", *[os.path.basename(s) for s in sums]]

        def sha256sum():
            start = time.perf_counter()
            subprocess.run(check, cwd=run, check=True, capture_output=True)
            return time.perf_counter() - start

        def openssl():  # the same hash with SHA-NI, one process: what one core can do
            start = time.perf_counter()
            subprocess.run(["openssl", "dgst", "-sha256", *files], cwd=run, check=True,
                           capture_output=True)
            return time.perf_counter() - start

        def verify_with(workers):
            def go():
                from d2persist.artifacts.view import open_view

                start = time.perf_counter()
                problems, _ = open_view(run).verify(workers=workers)
                assert not problems, problems[:3]
                return time.perf_counter() - start
            return go

        hashing = alternate({"sha256sum -c": sha256sum, "openssl dgst -sha256": openssl,
                             "verify, 1 thread": verify_with(1),
                             "verify, default threads": verify_with(None)}, args.repeats)
        cli = alternate({"d2persist verify": timed([*d2p, "verify", run])}, args.repeats)
        env = os.environ.copy()
        env["PYTHONPATH"] = REPO
        imports = subprocess.run(
            [sys.executable, "-c", "import sys, d2persist.__main__, d2persist.artifacts.view; "
             "print(sorted(m for m in ('torch', 'detectron2', 'matplotlib') if m in sys.modules))"],
            capture_output=True, text=True, env=env).stdout.strip()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    base = median(hashing["sha256sum -c"])
    print(f"{machine()}; {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"run: {n} checkpoints of {mb} MB (+ model_final, model_best as hard links), "
          f"{total:.0f} MB to hash; median of {args.repeats} alternating repeats")
    table("d2persist ls (the whole command: interpreter, imports, listing, metrics.json)", [
        (k, f"{median(v):.3f} s", f"{min(v):.3f}-{max(v):.3f} s") for k, v in ls_times.items()
    ] + [("heavy modules the CLI imports", imports, "")], ("command", "median", "range"))
    table("hashing every checkpoint (page cache warm)", [
        (k, f"{median(v):.3f} s", f"{total / median(v):.0f} MB/s",
         f"{base / median(v):.2f}x sha256sum") for k, v in hashing.items()
    ] + [("d2persist verify (whole command)", f"{median(cli['d2persist verify']):.3f} s",
          f"{total / median(cli['d2persist verify']):.0f} MB/s",
          f"{base / median(cli['d2persist verify']):.2f}x sha256sum")],
        ("side", "median", "throughput", "speed vs sha256sum"))


if __name__ == "__main__":
    main()
