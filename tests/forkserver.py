"""
Tool runs without paying Python's start-up each time: a fork server for the tests.

Every tool process imports torch and detectron2 before it does anything (about 5.5 s on the
project's 2-core machine, torchvision's ``roi_align`` pulling in ``torch._dynamo``). Most tool
runs in the tests are about what the tool does as a process of its own (its exit code, its
output, its files, the children it starts, being killed), not about interpreter start-up. Those
are forked from one server process that imported the stack once, as multiprocessing's
"forkserver" start method does: the child gets the tool's argv, working folder, environment and
output files, runs the tool's file (or the ``-m`` module) as ``__main__``, and exits as an
interpreter would (non-daemon threads joined, ``atexit`` handlers run, the exit code of
``SystemExit`` or 1 with a traceback). A ``launch()`` in it spawns fresh worker interpreters,
as it does from a shell. What torch reads from the environment at start-up, its thread count
(``OMP_NUM_THREADS``), is applied to each child; a child without it gets the server's own
count, as a shell would start the tool (``make test`` sets ``OMP_NUM_THREADS=1`` for the whole
session, so there every process has one thread).

Runs about start-up itself (what a tool or ``python -m d2persist`` imports, torchrun) keep a
fresh interpreter (:func:`helpers.run_tool`'s ``fresh``, or ``launcher``); plain ``python
tools/X.py`` and ``python -m d2persist ...`` runs come here.
"""

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

__all__ = ["ForkServer", "ForkedProcess"]

#: what the server runs: import the stack once, then fork one child per request, in order
_SERVER = r'''
import atexit, json, os, runpy, select, signal, sys, threading, traceback, warnings

import cv2, numpy, torch, torchvision.ops  # noqa: F401
import detectron2.data, detectron2.engine, detectron2.evaluation, detectron2.modeling  # noqa
import d2persist.export, d2persist.predict.predictor, d2persist.training  # noqa: F401

default_threads = torch.get_num_threads()  # what a process without OMP_NUM_THREADS gets
channel = os.fdopen(os.dup(1), "w")  # replies to the test, one JSON line each
null = os.open(os.devnull, os.O_WRONLY)
os.dup2(null, 1)  # nothing else writes to that pipe
os.close(null)
# no Python thread may run at a fork; the BLAS pools numpy and OpenCV start at import (one
# thread each here) are made fork-safe by their libraries, as DataLoader's forked workers need
threads = threading.active_count()
# read their environment when imported: each child imports them itself (helpers._FORKABLE_ENV)
late = [m for m in ("fsspec", "botocore", "s3fs") if m in sys.modules]
print(json.dumps({"ready": os.getpid(), "threads": threads, "imported": late}), file=channel,
      flush=True)


def redirect(path, fd, flags):
    new = os.open(path, flags, 0o644)
    os.dup2(new, fd)
    os.close(new)


def finalize():
    """What the interpreter's exit does first: join non-daemon threads, run atexit."""
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush(), sys.stderr.flush()


def child(req):
    os.setsid()  # its own process group, as run_tool's Popen(start_new_session=True)
    channel.close()
    os.close(requests)
    redirect(os.devnull, 0, os.O_RDONLY)
    redirect(req["stdout"], 1, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    redirect(req["stderr"], 2, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    # torch read its thread count when the server imported it: apply the child's, as a fresh
    # interpreter would read it (torchrun and the tests set OMP_NUM_THREADS)
    threads = req["env"].get("OMP_NUM_THREADS") or req["env"].get("MKL_NUM_THREADS")
    torch.set_num_threads(int(threads) if threads else default_threads)
    warnings.resetwarnings()
    for option in filter(None, req["env"].get("PYTHONWARNINGS", "").split(",")):
        warnings.filterwarnings(option)  # "ignore" (what tool_env sets) and the like
    script = req["argv"][0]
    module = req["argv"][1] if script == "-m" else None
    sys.argv = [script, *req["argv"][2:]] if module else list(req["argv"])
    # as the interpreter's sys.path[0]: the folder of the script, or with -m the working one
    sys.path[0] = os.getcwd() if module else os.path.dirname(os.path.abspath(script))
    code = 0
    try:
        if module:  # ``python -m MODULE ARGS`` (sys.argv[0] becomes its file, as -m makes it)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:  # as CPython: finalize, then exit by SIGINT
        traceback.print_exc()
        finalize()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        code = 1
    finalize()
    os._exit(code)


requests, buffer, children = os.dup(0), b"", set()
while True:
    ready = select.select([requests], [], [], 0.05 if children else None)[0]
    if ready:
        chunk = os.read(requests, 65536)
        if not chunk:  # the test session ended (or died): nothing it started outlives it
            for pid in children:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
            break
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            pid = os.fork()
            if pid == 0:
                try:
                    child(json.loads(line))
                except BaseException:  # before the tool ran (its folder, its files)
                    traceback.print_exc()
                finally:
                    os._exit(70)
            children.add(pid)
            print(json.dumps({"pid": pid}), file=channel, flush=True)
    while children:  # report every child that ended
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            break
        children.discard(pid)
        print(json.dumps({"pid": pid, "exit": os.waitstatus_to_exitcode(status)}),
              file=channel, flush=True)
'''


class ForkServer:
    """
    The server process, started on first use; it forks a child per request and reports each
    child's exit, so several may run at once (two "machines").

    Args:
        env (dict): the server's environment (the tools' import path among it).
        cwd (str): its working folder.
    """

    def __init__(self, env, cwd):
        self.env, self.cwd = dict(env), cwd
        self.proc = None
        self._buffer = b""
        self.exits = {}  # pid -> exit code of the children that ended

    def _message(self, wanted, timeout):
        """
        The server's next message for which ``wanted(message)`` holds, or None after
        ``timeout`` seconds; children's exits read on the way are kept in ``self.exits``.
        """
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                message = json.loads(line)
                if "exit" in message:
                    self.exits[message["pid"]] = message["exit"]
                if wanted(message):
                    return message
            left = max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"the fork server exited ({self.proc.wait()})")
            self._buffer += chunk

    def _start(self):
        self._buffer, self.exits = b"", {}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, env=self.env, cwd=self.cwd, start_new_session=True)
        ready = self._message(lambda m: "ready" in m, 180)
        if ready is None or ready.get("threads") != 1 or ready.get("imported"):
            self.close()
            raise RuntimeError(f"the fork server did not start cleanly: {ready}")

    def popen(self, argv, env, cwd):
        """
        Start ``argv`` (a tool's file, or ``-m`` and a module, and its arguments) in a forked
        child, like
        ``subprocess.Popen(..., start_new_session=True)``.

        Returns:
            ForkedProcess
        """
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        tmp = tempfile.mkdtemp(prefix="d2persist-forkserver-")
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        request = {"argv": [str(a) for a in argv], "env": env, "cwd": str(cwd),
                   "stdout": out, "stderr": err}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        started = self._message(lambda m: "exit" not in m, 60)
        if started is None:
            self.close()
            raise RuntimeError("the fork server did not start the tool within 60 s")
        self.exits.pop(started["pid"], None)  # a pid an earlier child had: not its exit
        return ForkedProcess(self, started["pid"], argv, tmp)

    def run(self, argv, env, cwd, timeout, kill):
        """
        Run ``argv`` in a forked child to its end.

        Args:
            kill: called with the child's pid to kill it and everything it started.

        Returns:
            subprocess.CompletedProcess, or raises AssertionError after ``timeout`` seconds.
        """
        child = self.popen(argv, env, cwd)
        try:
            if child.wait(timeout) is None:
                kill(child.pid)
                child.wait(60)
                raise AssertionError(
                    f"{os.path.basename(argv[0])} did not finish in {timeout} s (a hang?):\n"
                    f"{child.output()[1][-3000:]}")
        finally:
            kill(child.pid)  # workers left behind by a failed run
        out, err = child.output()
        return subprocess.CompletedProcess([sys.executable, *map(str, argv)], child.returncode,
                                           out, err)

    def close(self):
        """Stop the server: at the end of its requests it kills the children still running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class ForkedProcess:
    """A tool run forked by the server: the parts of ``subprocess.Popen`` the tests use."""

    def __init__(self, server, pid, argv, tmp):
        self.server, self.pid, self.argv, self._tmp = server, pid, argv, tmp
        self.returncode = None
        self._output = None  # (stdout, stderr), read once it has ended

    def poll(self):
        """The exit code (negative: killed by that signal), or None while it runs."""
        return self.wait(0)

    def wait(self, timeout=None):
        """Wait up to ``timeout`` seconds (None: for good); the exit code, or None."""
        if self.returncode is None:
            pid = self.pid
            if pid not in self.server.exits:
                self.server._message(lambda m: m.get("pid") == pid and "exit" in m,
                                     1e9 if timeout is None else timeout)
            self.returncode = self.server.exits.pop(pid, None)
            if self.returncode is not None:  # its output is kept; its folder goes
                self._output = (_read(os.path.join(self._tmp, "stdout")),
                                _read(os.path.join(self._tmp, "stderr")))
                shutil.rmtree(self._tmp, ignore_errors=True)
        return self.returncode

    def send_signal(self, sig):
        if self.returncode is None:
            os.kill(self.pid, sig)

    def output(self):
        """``(stdout, stderr)``: all of it once it has ended, else what it wrote so far."""
        if self._output is not None:
            return self._output
        return (_read(os.path.join(self._tmp, "stdout")),
                _read(os.path.join(self._tmp, "stderr")))

    def communicate(self, timeout=None):
        """Wait for the end (``subprocess.TimeoutExpired`` after ``timeout``); its output."""
        if self.wait(timeout) is None:
            raise subprocess.TimeoutExpired(self.argv, timeout)
        return self.output()


def _read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""
