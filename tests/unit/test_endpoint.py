"""
``Endpoint``, what a Ray Serve replica runs: it loads its predictor once, with its share of the
cores (``load_predictor`` gives them to ONNX Runtime's session or to PyTorch: the test of
replicas' threads in test_predict_batch.py).
"""

import types

from d2persist.scale.serve import Endpoint


def test_a_replica_loads_with_its_share_of_the_cores():
    loaded = []

    def load(threads):
        loaded.append(threads)
        return types.SimpleNamespace(weights="w", sha256="0" * 64, backend="pytorch",
                                     precision="float", evaluation=None, problem="")

    endpoint = Endpoint(load, threads=3)
    assert loaded == [3]
    assert endpoint.health["backend"] == "pytorch"


def test_a_replica_that_loads_other_weights_than_the_servers_does_not_start():
    import pytest

    from d2persist.errors import ArtifactError

    def load(threads):  # the artifacts replaced since the server read them
        return types.SimpleNamespace(weights="w", sha256="b" * 64, backend="onnxruntime",
                                     precision="float", evaluation=None, problem="")

    with pytest.raises(ArtifactError, match=r"^The artifacts changed after the driver read "
                                            r"them: this copy loaded weights with sha256 "
                                            r"b{12}\.\.\., not a{12}\.\.\.; start serve again"):
        Endpoint(load, threads=1, sha256="a" * 64)
    assert Endpoint(load, threads=1, sha256="b" * 64).health["sha256"] == "b" * 64


def test_a_threshold_outside_0_to_1_is_answered_400():
    def load(threads):
        return types.SimpleNamespace(weights="w", sha256="0" * 64, backend="onnxruntime",
                                     precision="float", evaluation=None, problem="")

    endpoint = Endpoint(load, threads=1)
    for value in ("high", "7", "-0.1", "nan"):
        status, answer, item = endpoint.parse("POST", "/predict", "image/png", b"x",
                                              {"min_score": value})
        assert (status, item) == (400, None)
        assert answer["error"] == f"min_score must be a number from 0 to 1, not {value!r}."
    status, _, item = endpoint.parse("POST", "/predict", "image/png", b"x", {"min_score": "1"})
    assert status == 0 and item[2] == 1.0


def test_a_port_another_process_listens_on_is_refused_before_ray_starts():
    import socket

    import pytest

    from d2persist.errors import D2PersistError
    from d2persist.scale.serve import check_port_free, run_server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(D2PersistError, match=f"Cannot listen on 127.0.0.1:{port} .*another "
                                                 "process may be using it, .*choose another"):
            run_server(None, "127.0.0.1", port)  # (refused before the loader is needed)
    check_port_free("127.0.0.1", port)  # free again
