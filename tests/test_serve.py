"""
``d2persist serve`` on Ray Serve, on 127.0.0.1: concurrent requests answered with the JSON
``infer_single`` writes, bad requests with a 4xx and one sentence while it goes on serving,
``/healthz``; stopped by SIGTERM with everything it started, also while it starts, and when
the signal reaches every process it started (systemd's stop). In a bounded process of its own.
"""

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from detectron2.data import DatasetCatalog
from helpers import free_port, kill_tree, tool_env

from d2persist import load_predictor
from d2persist.data.shapes import register_shapes

pytest.importorskip("ray.serve")


def _request(url, data=None, content_type=None, method=None):
    req = urllib.request.Request(url, data=data, method=method)
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _multipart(data, filename):
    boundary = "d2persist-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"{filename}\"\r\nContent-Type: image/png\r\n\r\n").encode()
    body += data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _start(run, *flags, **env):
    """
    ``d2persist serve RUN FLAGS`` in a session of its own, ``env`` added to its environment:
    ``(process, URL)``.
    """
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "d2persist", "serve", str(run), "--port", str(port), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=tool_env(**env),
        start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def _health(proc, url):
    """``/healthz``'s answer, once the server gives one (150 s at most)."""
    deadline = time.monotonic() + 150
    while True:  # until it serves (Ray, Serve's proxy, the replica loading the model)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the server did not start in 150 s"
        try:
            status, health = _request(url + "/healthz")
            if status == 200:
                return health
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            pass
        time.sleep(1)


def test_serve_answers_as_infer_single_and_refuses_bad_requests(trained_run):
    _, val = register_shapes()
    images = [d["file_name"] for d in DatasetCatalog.get(val)[:4]]
    proc, url = _start(trained_run, "--backend", "pytorch", "--max-bytes", "200000")
    try:
        health = _health(proc, url)
        predictor = load_predictor(str(trained_run), backend="pytorch")
        assert (health["sha256"], health["backend"], health["weights"]) == (
            predictor.sha256, "pytorch", predictor.weights)

        def ask(i):  # raw bytes and multipart, all at once
            data = open(images[i % 4], "rb").read()
            if i % 2:
                body, kind = _multipart(data, f"img{i}.png")
                return _request(url + "/predict?min_score=0", body, kind)
            return _request(url + "/predict?min_score=0", data, "image/png")

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(8)))
        for i, (status, got) in enumerate(answers):
            assert status == 200, got
            name = f"img{i}.png" if i % 2 else "upload"
            assert got == predictor(images[i % 4]).to_json(image_name=name, min_score=0)
        bad = [
            _request(url + "/predict", b"not an image", "image/png"),
            _request(url + "/predict", b"x" * 300_000, "image/png"),
            _request(url + "/predict", b"hello", "text/plain"),
            _request(url + "/predict", method="GET"),
            _request(url + "/nowhere"),
            _request(url + "/predict?min_score=high", b"x", "image/png"),
            _request(url + "/predict", *_multipart(b"", "empty.png")[:1], "multipart/form-data"),
        ]
        assert [s for s, _ in bad] == [400, 413, 415, 405, 404, 400, 400]
        for _, answer in bad:  # one sentence each
            assert answer["error"].endswith(".") and "\n" not in answer["error"]
        assert ask(0)[0] == 200  # and it goes on serving
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
    finally:
        kill_tree(proc.pid)


def test_serve_stopped_while_it_starts_stops_cleanly(trained_run):
    """SIGTERM while Ray Serve deploys (before ``serve.run`` returns): a clean exit 0."""
    proc, _ = _start(trained_run, "--backend", "pytorch")
    lines: queue.Queue = queue.Queue()

    def read():
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        seen = [""]
        while "Started Serve" not in seen[-1]:  # Serve up: the deployment comes next
            try:
                seen.append(lines.get(timeout=120))
            except queue.Empty:
                pytest.fail("no 'Started Serve' in 120 s: " + "".join(seen)[-3000:])
            if seen[-1] is None:
                pytest.fail("serve ended as it started: " + "".join(seen[:-1])[-3000:])
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        reader.join(timeout=10)
        err = "".join(seen + [x for x in lines.queue if x])
        assert proc.returncode == 0, err[-3000:]
        assert "SIGTERM received" not in err  # (Ray's handler, which aborts the process)
    finally:
        kill_tree(proc.pid)


def test_serve_onnxruntime_stopped_with_every_process_it_started(default_run):
    """
    The ONNX Runtime backend answers as its predictor does; SIGTERM to the server's whole
    process group (as systemd's stop signals every process of the unit) stops it with exit 0
    well before the 30 s ``serve.shutdown()`` would wait for the controller the signal ended.
    Without ``--ray`` it serves on a Ray of its own, even where ``RAY_ADDRESS`` names another
    (here one that does not answer, where Ray's default address waited for it).
    """
    _, val = register_shapes()
    image = DatasetCatalog.get(val)[0]["file_name"]
    run = str(default_run[0])
    proc, url = _start(run, "--backend", "onnxruntime", RAY_ADDRESS=f"127.0.0.1:{free_port()}")
    try:
        health = _health(proc, url)
        predictor = load_predictor(run, backend="onnxruntime")
        assert (health["sha256"], health["backend"]) == (predictor.sha256, "onnxruntime")
        status, got = _request(url + "/predict?min_score=0", open(image, "rb").read(),
                               "image/png")
        want = predictor(image).to_json(image_name="upload", min_score=0)
        assert (status, got) == (200, want)
        start = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        assert time.monotonic() - start < 25, err[-3000:]
    finally:
        kill_tree(proc.pid)


def test_a_replica_its_own_ray_cannot_hold_is_refused(default_run):
    """
    ``--cpus-per-replica`` above this machine's cores, on the Ray serve starts here: one
    sentence and exit 2 (Serve waited forever for a replica Ray could not place).
    """
    from helpers import run_tool

    cores = os.cpu_count() or 1
    res = run_tool("-m", "d2persist", "serve", default_run[0], "--backend", "onnxruntime",
                   "--cpus-per-replica", cores + 1, "--port", free_port(), timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    assert re.fullmatch(  # (Ray counts the CPUs a container may use: at most the cores)
        rf"d2persist: error: A replica asks for {cores + 1} CPUs, and the Ray started for it "
        r"on this machine has \d+\.", res.stderr.strip().splitlines()[-1]), res.stderr[-3000:]
