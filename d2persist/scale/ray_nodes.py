"""
What the nodes of a Ray cluster can hold, asked before a job's actors or a server's replicas
are: whether one node has the CPUs and GPUs one copy of the predictor asks for, how many CPUs a
copy reserves by default (the cluster's, not the driver's), and the sentence of a node that
cannot load the predictor. Imports Ray only where it is called with it.
"""

import logging
from typing import Any

from ..errors import D2PersistError

__all__ = ["check_ray_nodes", "cpus_per_copy", "refusal_on_node", "REFUSED_ON_NODE"]

logger = logging.getLogger(__name__)

#: how :func:`refusal_on_node`'s sentences start
REFUSED_ON_NODE = "On Ray's node "


def refusal_on_node(error: BaseException) -> str:
    """
    The sentence of a Ray actor or replica whose node cannot load the predictor: ``error``'s,
    after the node's address in the cluster (else its id), as ``On Ray's node ADDR: ...``.
    """
    import ray

    here = ray.get_runtime_context().get_node_id()
    node = next((n["NodeManagerAddress"] for n in ray.nodes() if n.get("NodeID") == here), here)
    return f"{REFUSED_ON_NODE}{node}: {error}"


def check_ray_nodes(ray: Any, who: str, cpus: float, gpus: float = 0.0,
                    started: bool = True) -> None:
    """
    Whether one node of the Ray cluster has the CPUs and GPUs that one actor asks for. Where
    Ray was started for the job (this machine, which cannot grow), a request no node can hold
    is refused in one sentence (Ray would wait for it forever); on a running cluster it is a
    warning (an autoscaler may add such a node).

    Args:
        ray: the ``ray`` module, initialized.
        who (str): the actor, in words ("A worker", "A replica").
        cpus (float): the CPUs it asks for.
        gpus (float): the GPUs it asks for.
        started (bool): whether this Ray was started for the job, here.

    Raises:
        D2PersistError: ``started``, and no node has them.
    """
    nodes = _alive(ray)
    wants = {"CPU": float(cpus), "GPU": float(gpus or 0.0)}
    if any(all(n.get(k, 0.0) >= v for k, v in wants.items()) for n in nodes):
        return
    largest = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in wants}
    words = {k: f"{v:g} {k}{'' if v == 1 else 's'}" for k, v in wants.items()}
    short = [k for k, v in wants.items() if v > largest[k]]
    if short and started:
        sentence = (f"{who} asks for {words[short[0]]}, and the Ray started for it on this "
                    f"machine has {largest[short[0]]:g}.")
    elif short:
        sentence = (f"{who} asks for {words[short[0]]}, and no node of the Ray cluster has "
                    f"that many now (the most: {largest[short[0]]:g}).")
    else:
        sentence = (f"{who} asks for {words['CPU']} and {words['GPU']}, and no node of the "
                    "Ray cluster has both now.")
    if started:
        raise D2PersistError(sentence)
    logger.warning("%s It waits until one has.", sentence)


def _alive(ray: Any) -> list:
    """The resources of each alive node of the (initialized) Ray cluster."""
    return [n.get("Resources") or {} for n in ray.nodes() if n.get("Alive")]


def cpus_per_copy(ray: Any, copies: int) -> float:
    """
    The CPUs each of ``copies`` actors or replicas reserves where none were given (and each
    predictor's threads): the most whole CPUs for which the cluster's nodes hold all the copies
    together, at least one. On a Ray started for the job this is this machine's cores /
    ``copies``; on a running cluster, its nodes' (a head node driving bigger workers gives them
    their cores; a driver with more cores than any node asks for no more than one node has; a
    node of 4 CPUs beside one of 32 gives 2 copies 16 each, which the big node holds, not 18).

    Args:
        ray: the ``ray`` module, initialized.
        copies (int): the actors or replicas.

    Returns:
        float
    """
    cpus = [int(n.get("CPU", 0.0)) for n in _alive(ray)]
    for each in range(max(cpus, default=0), 1, -1):
        if sum(c // each for c in cpus) >= copies:
            return float(each)
    return 1.0
