"""
Fault injection for ``d2persist predict --ray``: a predictor loader for Ray actors whose
predictor SIGKILLs its own worker process at its second image, once per ``marker`` file (which
says the process and the threads it was loaded with), and optionally takes its time over each
image (so that a test can kill the driver mid-job).
"""

import os
import signal
import time


class _Dying:
    def __init__(self, predictor, marker, seconds=0.0, threads=None):
        self._predictor = predictor
        self._marker = marker
        self._seconds = seconds
        self._threads = threads
        self._calls = 0

    def __getattr__(self, name):
        return getattr(self._predictor, name)

    def __call__(self, image):
        self._calls += 1
        if self._calls == 2 and not os.path.exists(self._marker):
            with open(self._marker, "w") as f:
                f.write(f"{os.getpid()} threads={self._threads}")
            os.kill(os.getpid(), signal.SIGKILL)  # a worker lost mid-job
        time.sleep(self._seconds)
        return self._predictor(image)


def load(artifacts, marker, seconds=0.0, **kwargs):
    """
    ``load_predictor(artifacts, **kwargs)``, dying once (see the module), ``seconds`` more
    over each image.
    """
    from d2persist import load_predictor

    return _Dying(load_predictor(artifacts, **kwargs), marker, seconds, kwargs.get("threads"))


def main(argv):
    """
    ``ray_fault.py RUN SRC DST MARKER ADDRESS BACKEND [SECONDS]``: ``d2persist predict SRC
    --artifacts RUN --output DST --ray ADDRESS --workers 2 --cpus-per-worker 1 --backend
    BACKEND``, its engine's loader replaced by :func:`load` (``SECONDS`` more over each image);
    prints the engine's settings and the job record as JSON. ``MARKER.shutdown`` is written
    once the job has shut its Ray down.
    """
    import functools
    import json

    from d2persist.__main__ import _ray_engine, get_parser
    from d2persist.predict.load import describe_predictor
    from d2persist.scale.batch import predict_source

    run, src, dst, marker, address, backend, *seconds = argv
    args = get_parser().parse_args(["predict", src, "--artifacts", run, "--output", dst,
                                    "--ray", address, "--workers", "2", "--cpus-per-worker", "1",
                                    "--backend", backend])
    predictor = describe_predictor(run, backend=backend)  # as the command, the model not built
    engine = _ray_engine(args, predictor.backend)  # the command's engine
    settings = {"address": engine.address, "workers": engine.workers,
                "cpus_per_worker": engine.cpus_per_worker, "spin": engine.load.keywords["spin"]}
    engine.load = functools.partial(load, run, marker, float(seconds[0]) if seconds else 0.0,
                                    **engine.load.keywords)
    import ray

    shutdown = ray.shutdown

    def shutdown_noted(*args, **kwargs):  # MARKER.shutdown: the job shut its Ray down
        shutdown(*args, **kwargs)
        with open(marker + ".shutdown", "w"):
            pass

    ray.shutdown = shutdown_noted
    record = predict_source(predictor, src, dst, ray=engine)
    print(json.dumps({"engine": settings, "record": record}))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
