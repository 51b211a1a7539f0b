"""
``check_ray_nodes``: whether one node of a Ray cluster can hold an actor's request, and
``cpus_per_copy``: what an actor reserves by default, read from ``ray.nodes()`` records as Ray
gives them (a stand-in module: no Ray started).
"""

import logging

import pytest

from d2persist import D2PersistError
from d2persist.scale.ray_nodes import check_ray_nodes, cpus_per_copy


class _Ray:
    """What ``check_ray_nodes`` reads of the ``ray`` module: ``nodes()``."""

    def __init__(self, *resources, dead=()):
        self._nodes = [{"Alive": True, "Resources": r} for r in resources] + [
            {"Alive": False, "Resources": r} for r in dead]

    def nodes(self):
        return self._nodes


def test_a_node_with_enough_passes_quietly(caplog):
    ray = _Ray({"CPU": 2.0}, {"CPU": 4.0, "GPU": 1.0})
    with caplog.at_level(logging.WARNING):
        check_ray_nodes(ray, "A worker", 4, 1)
        check_ray_nodes(ray, "A worker", 0.5)
    assert not caplog.records


def test_a_ray_started_for_the_job_refuses_what_no_node_has():
    with pytest.raises(D2PersistError, match=r"^A worker asks for 1 GPU, and the Ray started "
                       r"for it on this machine has 0\.$"):
        check_ray_nodes(_Ray({"CPU": 2.0}), "A worker", 1, 1)
    with pytest.raises(D2PersistError, match=r"^A replica asks for 3 CPUs, .* has 2\.$"):
        check_ray_nodes(_Ray({"CPU": 2.0}, dead=[{"CPU": 8.0}]), "A replica", 3)  # (dead)


def test_a_running_cluster_warns_and_needs_both_on_one_node(caplog):
    ray = _Ray({"CPU": 4.0}, {"CPU": 1.0, "GPU": 1.0})
    with caplog.at_level(logging.WARNING):
        check_ray_nodes(ray, "A worker", 2, 1, started=False)  # CPUs on one, the GPU on another
        check_ray_nodes(ray, "A worker", 1, 2, started=False)
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "A worker asks for 2 CPUs and 1 GPU, and no node of the Ray cluster has both now. "
        "It waits until one has.",
        "A worker asks for 2 GPUs, and no node of the Ray cluster has that many now (the "
        "most: 1). It waits until one has."]


def test_each_copy_gets_the_clusters_cpus_shared_at_most_one_nodes():
    """
    The default share is the cluster's, not the driver's: a small head node drives big
    workers with their cores, and a driver bigger than every node asks for no more than one;
    and all the copies fit on the nodes together.
    """
    assert cpus_per_copy(_Ray({"CPU": 2.0}), 1) == 2.0  # a Ray started here: its cores
    assert cpus_per_copy(_Ray({"CPU": 2.0}), 2) == 1.0
    assert cpus_per_copy(_Ray({"CPU": 2.0}), 3) == 0.6666  # a share of one, all three held
    cluster = _Ray({"CPU": 0.0}, {"CPU": 16.0}, {"CPU": 16.0}, dead=[{"CPU": 64.0}])
    assert cpus_per_copy(cluster, 4) == 8.0
    assert cpus_per_copy(cluster, 1) == 16.0  # one node's
    assert cpus_per_copy(_Ray({"CPU": 1.0}, {"CPU": 1.0}), 1) == 1.0
    assert cpus_per_copy(_Ray({"CPU": 4.0}, {"CPU": 32.0}), 2) == 16.0  # both on the big one
    assert cpus_per_copy(_Ray({"CPU": 8.0}, {"CPU": 8.0}), 3) == 4.0  # 2 + 1, not 5.33
    assert cpus_per_copy(_Ray({"CPU": 16.0}), 3) == 5.0  # whole CPUs
    assert cpus_per_copy(_Ray({"CPU": 1.0}, {"CPU": 1.0}), 3) == 0.5  # two on one node
    for cluster, copies in [(_Ray({"CPU": 2.0}), 3), (_Ray({"CPU": 4.0}, {"CPU": 32.0}), 2),
                            (_Ray({"CPU": 1.0}, {"CPU": 1.0}), 3), (_Ray({"CPU": 3.9999}), 2)]:
        check_ray_nodes(cluster, "A worker", cpus_per_copy(cluster, copies), copies=copies)
    assert cpus_per_copy(_Ray({"GPU": 1.0}), 2) == 1.0  # no CPUs yet (an autoscaler's)


def test_copies_the_nodes_cannot_hold_together_are_refused_on_a_ray_started_here(caplog):
    """
    Each fits on a node, not all of them: Serve would wait for the last replica forever, and
    Ray Data ran fewer workers than the job's record says.
    """
    with pytest.raises(D2PersistError, match=r"^3 workers ask for 1 CPU each, and the Ray "
                       r"started for them on this machine holds 2 of them\.$"):
        check_ray_nodes(_Ray({"CPU": 2.0}), "A worker", 1, copies=3)
    with pytest.raises(D2PersistError, match=r"^2 replicas ask for 1 CPU and 1 GPU each, .* "
                       r"holds 1 of them\.$"):
        check_ray_nodes(_Ray({"CPU": 4.0, "GPU": 1.0}), "A replica", 1, 1, copies=2)
    with caplog.at_level(logging.WARNING):  # a running cluster: an autoscaler may add nodes
        check_ray_nodes(_Ray({"CPU": 8.0}, {"CPU": 8.0}), "A worker", 6, started=False,
                        copies=3)
    assert [r.getMessage() for r in caplog.records] == [
        "3 workers ask for 6 CPUs each, and the Ray cluster's nodes hold 2 of them now."]
