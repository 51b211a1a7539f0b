"""
``d2persist serve``: a bundle's predictions over HTTP, on Ray Serve.

- ``POST /predict`` with an image (the raw bytes, ``image/*`` or ``application/octet-stream``;
  or ``multipart/form-data`` with one file) answers the JSON ``infer_single`` writes for it
  (``image`` is the file name sent, else "upload"); ``?min_score=`` as
  ``--confidence-threshold`` (default 0.5);
- ``GET /healthz`` answers the weights (sha256, in words), backend, precision and the bundle's
  self-evaluation (the manifest's ``evaluation``), with a warning where that recorded the
  backend as failed;
- bad input (not an image, too large, another content type, another path or method) gets a 4xx
  with one sentence, and the server goes on serving.

Concurrent requests are batched (``@serve.batch``) and predicted one after another in one call:
the exported graphs take one image; batching saves the per-request scheduling. A batch does not
wait for more requests: it takes those that arrived while the one before was predicted (the
prediction holds the replica's event loop, so they queue meanwhile), and a lone request is
answered at once.
"""

import email.parser
import email.policy
import logging
import re
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from ..errors import D2PersistError, InputImageError
from ..layout import DEFAULT_MIN_SCORE
from ..predict.images import check_image_bytes
from ..predict.outputs import min_score_of
from .ray_nodes import (
    REFUSED_ON_NODE,
    check_ray_nodes,
    check_same_weights,
    cpus_per_copy,
    refusal_on_node,
)

__all__ = ["Endpoint", "multipart_file", "MAX_IMAGE_BYTES", "deployment", "check_port_free",
           "run_server", "health_of"]

logger = logging.getLogger(__name__)

#: the Ray Serve application's name
APP_NAME = "d2persist"

#: the largest image a request may send (bytes)
MAX_IMAGE_BYTES = 32 * 1024 * 1024


def multipart_file(body: bytes, content_type: str) -> Tuple[bytes, Optional[str]]:
    """
    The first file of a ``multipart/form-data`` body: ``(bytes, file name)``.

    Raises:
        InputImageError: the body holds no file.
    """
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    for part in message.iter_parts() if message.is_multipart() else ():
        payload = part.get_payload(decode=True)
        if part.get_filename() is not None or part.get_param(
                "name", header="content-disposition") in ("image", "file"):
            return payload if isinstance(payload, bytes) else b"", part.get_filename()
    raise InputImageError("The multipart/form-data request holds no file (send the image as "
                          "a file field, e.g. curl -F image=@photo.jpg).")


class Endpoint:
    """
    What a Ray Serve replica runs (wrapped by :func:`deployment`): one predictor, loaded once
    by ``load`` (called with ``threads``, the replica's share of the cores), and its answers.

    Raises:
        ArtifactError: the weights loaded are not those of ``sha256`` (the server's, as its
            driver read them): the artifacts changed since, and replicas would serve two models.
    """

    def __init__(self, load: Callable[..., Any], max_bytes: int = MAX_IMAGE_BYTES,
                 threads: int = 1, sha256: Optional[str] = None) -> None:
        self.predictor = load(threads=threads)
        check_same_weights(self.predictor, sha256, "start serve again to serve the new ones")
        self.max_bytes = max_bytes
        self.health = health_of(self.predictor)

    def predict_many(self, items: List[Tuple[bytes, str, float]]) -> List[Tuple[int, dict]]:
        """``(status, JSON)`` of each ``(image bytes, name, min_score)``, one after another."""
        out = []
        for data, name, min_score in items:
            try:  # decoded as evaluation reads the file that holds these bytes
                check_image_bytes(data, name)
                pred = self.predictor(data)
                out.append((200, pred.to_json(image_name=name, min_score=min_score)))
            except InputImageError as e:  # its reason: not an image, truncated, too thin
                out.append((400, {"error": f"The request's body ({len(data)} bytes) is not an "
                                           f"image this server can predict: {e}"}))
            except Exception as e:  # this request's answer; the batch's others stand
                logger.exception("Predicting %s failed:", name)
                out.append((500, {"error": f"Predicting this image failed "
                                           f"({type(e).__name__}: {e})."}))
        return out

    def parse(self, method: str, path: str, content_type: str, body: bytes,
              query: Dict[str, str]) -> Tuple[int, Optional[dict], Optional[tuple]]:
        """
        ``(status, answer, None)`` for what is answered at once, or ``(0, None, item)`` for an
        image to predict (see :meth:`predict_many`).
        """
        if path.rstrip("/") == "/healthz":
            if method != "GET":
                return 405, {"error": f"{method} /healthz: ask with GET."}, None
            return 200, self.health, None
        if path.rstrip("/") != "/predict":
            return 404, {"error": f"No {path}: POST /predict, GET /healthz."}, None
        if method != "POST":
            return 405, {"error": f"{method} /predict: send the image with POST."}, None
        try:
            min_score = min_score_of(query.get("min_score", DEFAULT_MIN_SCORE))
        except D2PersistError:
            return 400, {"error": "min_score must be a number from 0 to 1, not "
                                  f"{query['min_score']!r}."}, None
        if len(body) > self.max_bytes:
            return 413, {"error": f"The image is {len(body)} bytes; this server takes up to "
                                  f"{self.max_bytes}."}, None
        kind = content_type.split(";")[0].strip().lower()
        name = "upload"
        if kind == "multipart/form-data":
            try:
                body, filename = multipart_file(body, content_type)
            except InputImageError as e:
                return 400, {"error": str(e)}, None
            name = filename or name
        elif not (kind.startswith("image/") or kind == "application/octet-stream"):
            return 415, {"error": f"Content type {kind or '(none)'} is not an image: send the "
                                  "image's bytes (image/*, application/octet-stream) or "
                                  "multipart/form-data."}, None
        if not body:
            return 400, {"error": "The request has no body: send the image."}, None
        return 0, None, (body, name, min_score)


def health_of(predictor: Any) -> Dict[str, Any]:
    """What ``GET /healthz`` answers for ``predictor``."""
    health = {"status": "ok", "weights": predictor.weights, "sha256": predictor.sha256,
              "backend": predictor.backend, "precision": predictor.precision,
              "evaluation": predictor.evaluation}
    if predictor.problem:
        health["warning"] = predictor.problem
    return health


def deployment(load: Callable[..., Any], replicas: int = 1, cpus_per_replica: float = 1.0,
               max_batch_size: int = 8, max_bytes: int = MAX_IMAGE_BYTES,
               sha256: Optional[str] = None) -> Any:
    """
    The Ray Serve application: :class:`Endpoint` behind ``@serve.deployment`` with requests
    batched by ``@serve.batch`` (up to ``max_batch_size`` of those waiting; none waits for more);
    each replica reserves ``cpus_per_replica``, loads with as many threads, and refuses to
    start with weights other than ``sha256``'s (a replica Serve restarts after the artifacts
    changed).
    """
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    # a replica holds at most max_ongoing_requests (Serve's default 5): at least a batch's worth
    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica},
                      max_ongoing_requests=max(5, max_batch_size))
    class D2PersistEndpoint:
        def __init__(self, load, max_bytes, threads, sha256):
            try:
                self.endpoint = Endpoint(load, max_bytes, threads, sha256)
            except (D2PersistError, ImportError) as e:  # said by run_server (Serve's status)
                raise D2PersistError(refusal_on_node(e)) from None

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=0.0)
        async def predict(self, items: List[tuple]) -> List[Tuple[int, dict]]:
            # not in a thread: Serve forms the next batch as soon as one starts, so a batch
            # that let the loop run would leave the requests behind it batches of one
            return self.endpoint.predict_many(items)

        async def __call__(self, request: Request) -> JSONResponse:
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.endpoint.max_bytes:  # not read
                return JSONResponse(
                    {"error": f"The image is {declared} bytes; this server takes up to "
                              f"{self.endpoint.max_bytes}."}, status_code=413)
            body = await request.body() if request.method == "POST" else b""
            status, answer, item = self.endpoint.parse(
                request.method, request.url.path, request.headers.get("content-type", ""),
                body, dict(request.query_params))
            if item is not None:
                status, answer = await self.predict(item)
            return JSONResponse(answer, status_code=status)

    return D2PersistEndpoint.bind(  # type: ignore[attr-defined]
        load, max_bytes, max(1, int(cpus_per_replica)), sha256)


def check_port_free(host: str, port: int) -> None:
    """
    Refuse, in one sentence, a ``host:port`` this machine cannot listen on (another process
    listens there, or the address is not this machine's).

    Args:
        host (str): the address to listen on.
        port (int): the TCP port.

    Raises:
        D2PersistError: the port cannot be bound.
    """
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as servers bind)
            probe.bind((host, port))
    except OSError as e:
        raise D2PersistError(f"Cannot listen on {host}:{port} ({e.strerror or e}): another "
                             "process may be using it, or the address is not this machine's; "
                             "choose another --port or --host.") from None


def run_server(load: Callable[..., Any], host: str = "127.0.0.1", port: int = 8000,
               replicas: int = 1, cpus_per_replica: Optional[float] = None,
               address: Optional[str] = None, max_bytes: int = MAX_IMAGE_BYTES,
               max_batch_size: int = 8, sha256: Optional[str] = None) -> None:
    """
    Serve until SIGINT or SIGTERM: Ray (a local cluster, or the one at ``address``), Ray
    Serve's HTTP proxy on ``host:port``, the application of :func:`deployment`; all stopped
    on the way out. A signal while the application is still starting stops the start (the
    proxy may answer before ``serve.run`` returns). ``cpus_per_replica`` None: the cluster's
    share (:func:`~d2persist.scale.ray_nodes.cpus_per_copy`). ``load`` is called in each
    replica with ``threads``, as many as its CPUs; with ``sha256`` (the weights as this
    process read them), a replica that loads other weights does not start.
    """
    import signal
    import threading

    if address is None:  # this machine's proxy: its port is asked for before Ray starts
        check_port_free(host, port)
    import ray
    from ray import serve

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if not stop.is_set():
            stop.set()
            if not serving:  # interrupt the start where it is; the finally stops what ran
                raise KeyboardInterrupt

    serving = False
    # "local": a Ray of its own, not the one RAY_ADDRESS or the last `ray start` names
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    ended_before = _ended_ray_processes()
    try:
        try:
            cpus = cpus_per_replica or cpus_per_copy(ray, replicas)
            check_ray_nodes(ray, "A replica", cpus, started=address is None, copies=replicas)
            # ours from here: ray.init installed its own (a C++ handler that aborts the process)
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, on_signal)
            try:
                serve.start(http_options={"host": host, "port": port})
            except Exception as e:  # (Ray raises it as a RayTaskError of its proxy)
                if "Failed to bind" not in str(e):
                    raise
                raise D2PersistError(f"Ray Serve cannot listen on {host}:{port}: another "
                                     "process may be using it; choose another --port.") from None
            try:
                serve.run(deployment(load, replicas, cpus, max_batch_size, max_bytes, sha256),
                          name=APP_NAME, route_prefix="/")
            except RuntimeError:  # Serve gave up starting the replicas: why, in one sentence
                refusal = _replica_refusal()
                if refusal is None:
                    raise
                raise D2PersistError(refusal) from None
            serving = True
            if not stop.is_set():
                print(f"serving on http://{host}:{port} (POST /predict, GET /healthz), "
                      f"{replicas} replica(s) x {cpus:g} CPU(s); Ctrl-C stops", flush=True)
        except KeyboardInterrupt:
            if not stop.is_set():  # Python's own: a Ctrl-C before ours was in place
                raise
        stop.wait()
    finally:
        try:
            if address is not None or not _local_ray_lost_a_process(ended_before):
                serve.shutdown()
        finally:
            ray.shutdown()


def _replica_refusal() -> Optional[str]:
    """
    The sentence of a replica that could not load the predictor (no GPU, no onnxruntime-gpu
    on its node, ...), read from Serve's status of the application, if that is why it failed.
    """
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    for state in app.deployments.values() if app else ():
        line = rf"^d2persist\.errors\.D2PersistError: ({re.escape(REFUSED_ON_NODE)}.+)$"
        found = re.findall(line, state.message or "", re.M)
        if found:
            return found[-1]
    return None


def _ended_ray_processes() -> Set[int]:
    """
    The pids of the processes ``ray.init`` started in this process that have ended (Ray's own
    record of them, a private one: empty where a Ray version keeps none).
    """
    import ray._private.worker

    node = getattr(ray._private.worker, "_global_node", None)
    dead = getattr(node, "dead_processes", None)
    return {proc.pid for _, proc in dead()} if callable(dead) else set()


def _local_ray_lost_a_process(ended_before: Set[int], wait_s: float = 1.0) -> bool:
    """
    Whether the local Ray this process started lost a process (one not in ``ended_before``)
    within ``wait_s``: the stop signal reached them too (systemd's stop signals every process
    of the unit; ``kill -- -PGID`` and ``timeout`` the process group), so Serve's controller
    cannot answer ``serve.shutdown()``, which would wait 30 s for it; ``ray.shutdown()`` stops
    the rest.
    """
    import time

    deadline = time.monotonic() + wait_s
    while not _ended_ray_processes() - ended_before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
