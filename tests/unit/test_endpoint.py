"""
``Endpoint``, what a Ray Serve replica runs: it loads its predictor with its share of the cores,
and PyTorch's threads (the process's, which the loader does not set) follow that share.
"""

import types

import torch

from d2persist.scale.serve import Endpoint


def test_a_replica_predicts_with_its_share_of_the_cores():
    loaded = []

    def load(threads):
        loaded.append(threads)
        return types.SimpleNamespace(weights="w", sha256="0" * 64, backend="pytorch",
                                     precision="float", evaluation=None, problem="")

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        endpoint = Endpoint(load, threads=1)
        assert loaded == [1] and torch.get_num_threads() == 1
        assert endpoint.health["backend"] == "pytorch"
    finally:
        torch.set_num_threads(before)
