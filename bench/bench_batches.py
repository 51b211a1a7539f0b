#!/usr/bin/env python
"""
``d2persist serve``: how many requests a batch holds. One replica of the Ray Serve application
(:func:`d2persist.scale.serve.deployment`, ``--max-batch-size`` 8) on a local Ray, ONNX
Runtime, its ``Endpoint.predict_many`` wrapped in the replica to log each batch's size; 64
requests from 1, 8 and 16 concurrent clients on 127.0.0.1.

Needs a finished run of the built-in model with ONNX (``--run``).
"""

import os
import socket
import tempfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from common import machine, parse_args, table, val_images


def _logging_loader(bundle, log):
    """A loader for the replica: the predictor, with each batch's size appended to ``log``."""

    def load(threads=2):
        from d2persist.predict.load import load_predictor
        from d2persist.scale import serve

        predict_many = serve.Endpoint.predict_many

        def logged(self, items):
            with open(log, "a") as f:
                f.write(f"{len(items)}\n")
            return predict_many(self, items)

        serve.Endpoint.predict_many = logged
        return load_predictor(bundle, backend="onnxruntime", threads=threads, spin=False)

    return load


def main():
    args = parse_args(__doc__, repeats=1, run=True)
    if not args.run:
        raise SystemExit("--run: a finished run of the built-in model with ONNX")
    import ray
    from ray import serve

    from d2persist.scale.serve import deployment

    print(f"machine: {machine()}")
    log = os.path.join(tempfile.mkdtemp(prefix="d2persist-bench-"), "batches.txt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        load = _logging_loader(os.path.join(args.run, "export"), log)
        serve.run(deployment(load, 1, 2.0, 8), name="d2persist", route_prefix="/")
        data = [open(p, "rb").read() for p in val_images(False)]

        def post(i):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/predict",
                                         data=data[i % len(data)],
                                         headers={"Content-Type": "image/png"})
            return urllib.request.urlopen(req, timeout=60).status

        for clients in (1, 8, 16):
            open(log, "w").close()
            with ThreadPoolExecutor(clients) as pool:
                statuses = set(pool.map(post, range(64)))
            sizes = [int(x) for x in open(log).read().split()]
            rows.append((f"{clients} client(s), 64 requests",
                         f"{len(sizes)} batches, mean {sum(sizes) / len(sizes):.2f}, "
                         f"largest {max(sizes)} (statuses {sorted(statuses)})"))
    finally:
        serve.shutdown()
        ray.shutdown()
    table("Requests per batch of one replica, --max-batch-size 8", rows)


if __name__ == "__main__":
    main()
