"""
How ``d2persist predict --ray`` takes SIGINT and SIGTERM from the handlers ``ray.init``
installs: the first signal unwinds the job, later ones while Ray shuts down are only recorded,
the handlers from before come back, and a SIGTERM is delivered to them at the end.
"""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from d2persist.scale.batch import _StopSignals


def _handlers():
    return {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}


def test_the_first_signal_unwinds_the_next_are_recorded_and_handlers_come_back():
    before = _handlers()
    stops = _StopSignals()
    stops.take()
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # (the handler runs at once, in this thread)
        os.kill(os.getpid(), signal.SIGINT)  # while Ray would shut down: recorded only
        time.sleep(0.01)
    finally:
        stops.restore()
    assert stops.came == [signal.SIGINT, signal.SIGINT]
    assert _handlers() == before


def test_an_ignored_signal_stays_ignored_and_other_threads_change_nothing():
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stops = _StopSignals()
        stops.take()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.SIGINT not in stops.before and signal.SIGTERM in stops.before
        stops.restore()
    finally:
        signal.signal(signal.SIGINT, old)
    found = []
    thread = threading.Thread(target=lambda: found.append(_StopSignals().before))
    thread.start()
    thread.join()
    assert found == [{}]


def test_a_sigterm_ends_the_process_by_sigterm_after_the_shutdown():
    script = textwrap.dedent("""
        import os, signal, time
        from d2persist.scale.batch import _StopSignals
        stops = _StopSignals()
        stops.take()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            stops.unwind()
            os.kill(os.getpid(), signal.SIGINT)  # during the shutdown: recorded only
            time.sleep(0.01)
            print("shut down", stops.came, flush=True)
            stops.restore()
        print("not reached")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == -signal.SIGTERM, res.stderr[-2000:]
    assert res.stdout == f"shut down [{int(signal.SIGTERM)}, {int(signal.SIGINT)}]\n"
    assert "Traceback" not in res.stderr
