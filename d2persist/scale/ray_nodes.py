"""
What the nodes of a Ray cluster can hold, asked before a job's actors or a server's replicas
are: whether one node has the CPUs and GPUs one copy of the predictor asks for, how many CPUs a
copy reserves by default (the cluster's, not the driver's), and the sentence of a node that
cannot load the predictor. Imports Ray only where it is called with it.
"""

import logging
import math
from typing import Any, Optional

from ..errors import ArtifactError, D2PersistError

__all__ = ["check_ray_nodes", "cpus_per_copy", "refusal_on_node", "REFUSED_ON_NODE",
           "check_same_weights", "require_ray"]

logger = logging.getLogger(__name__)

#: how :func:`refusal_on_node`'s sentences start
REFUSED_ON_NODE = "On Ray's node "


def require_ray(what: str, module: str) -> None:
    """
    Refuse, in one sentence, a command that runs on Ray where Ray (or the part of it that
    ``module`` is, e.g. ``ray.serve``, with its own dependencies) does not import: before the
    model loads, not after.

    Args:
        what (str): the command, for the sentence (e.g. "d2persist serve").
        module (str): what it imports.
    """
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as e:
        raise D2PersistError(f"{what} runs on Ray, and {module} does not import here ({e}): "
                             "pip install 'd2persist[ray]'.") from None


def refusal_on_node(error: BaseException) -> str:
    """
    The sentence of a Ray actor or replica whose node cannot load the predictor: ``error``'s,
    after the node's address in the cluster (else its id), as ``On Ray's node ADDR: ...``.
    """
    import ray

    here = ray.get_runtime_context().get_node_id()
    node = next((n["NodeManagerAddress"] for n in ray.nodes() if n.get("NodeID") == here), here)
    return f"{REFUSED_ON_NODE}{node}: {error}"


def check_same_weights(predictor: Any, sha256: Optional[str],
                       then: str = "start again to use the new ones") -> None:
    """
    Refuse, in one sentence, a copy of the predictor (an actor, a replica) that loaded other
    weights than the driver described: the artifacts were replaced in between (a new export
    at the bundle's URL, a new checkpoint in a run folder), and the copies would predict with
    two models under one job's or server's identity.

    Args:
        predictor: the copy's loaded predictor.
        sha256 (str or None): the weights file's sha256 the driver read (None: not checked).
        then (str): what to do, the sentence's end.

    Raises:
        ArtifactError: the copy's weights are other ones.
    """
    if sha256 and predictor.sha256 != sha256:
        raise ArtifactError(
            f"The artifacts changed after the driver read them: this copy loaded weights "
            f"with sha256 {str(predictor.sha256)[:12]}..., not {sha256[:12]}...; {then}.")


def check_ray_nodes(ray: Any, who: str, cpus: float, gpus: float = 0.0,
                    started: bool = True, copies: int = 1) -> None:
    """
    Whether the nodes of the Ray cluster hold ``copies`` actors asking for these CPUs and GPUs
    each: one node must have them all for one, and the nodes together room for every copy.
    Where Ray was started for the job (this machine, which cannot grow), a request they cannot
    hold is refused in one sentence (Ray would wait for it forever, or run fewer); on a running
    cluster it is a warning (an autoscaler may add nodes).

    Args:
        ray: the ``ray`` module, initialized.
        who (str): one actor, in words ("A worker", "A replica").
        cpus (float): the CPUs each asks for.
        gpus (float): the GPUs each asks for.
        started (bool): whether this Ray was started for the job, here.
        copies (int): how many.

    Raises:
        D2PersistError: ``started``, and the nodes cannot hold them.
    """
    nodes = _alive(ray)
    wants = {"CPU": float(cpus), "GPU": float(gpus or 0.0)}
    words = {k: f"{v:g} {k}{'' if v == 1 else 's'}" for k, v in wants.items()}
    held = sum(_holds(n, wants) for n in nodes)
    if held >= copies:
        return
    if held:  # one fits, not all
        each = " and ".join(words[k] for k, v in wants.items() if v)
        sentence = (f"{copies} {who.split()[-1]}s ask for {each} each, and the Ray " + (
            f"started for them on this machine holds {held} of them." if started else
            f"cluster's nodes hold {held} of them now."))
        if started:
            raise D2PersistError(sentence)
        logger.warning(sentence)
        return
    largest = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in wants}
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


def _holds(node: dict, wants: dict) -> int:
    """How many actors asking for ``wants`` (resource -> amount) the ``node`` holds."""
    fits = [int(node.get(k, 0.0) / v + 1e-9) for k, v in wants.items() if v > 0]
    return min(fits) if fits else 1 << 30


def _alive(ray: Any) -> list:
    """The resources of each alive node of the (initialized) Ray cluster."""
    return [n.get("Resources") or {} for n in ray.nodes() if n.get("Alive")]


def cpus_per_copy(ray: Any, copies: int) -> float:
    """
    The CPUs each of ``copies`` actors or replicas reserves where none were given (and each
    predictor's threads, at least one): the most whole CPUs for which the cluster's nodes hold
    all the copies together; where the copies outnumber the CPUs, the largest share of one
    that holds them all (Ray's CPUs are fractional). On a Ray started for the job this is this
    machine's cores / ``copies``; on a running cluster, its nodes' (a head node driving bigger
    workers gives them their cores; a driver with more cores than any node asks for no more
    than one node has; a node of 4 CPUs beside one of 32 gives 2 copies 16 each, not 18).

    Args:
        ray: the ``ray`` module, initialized.
        copies (int): the actors or replicas.

    Returns:
        float: 1.0 where the cluster has no CPU yet (an autoscaler's).
    """
    cpus = [float(n.get("CPU", 0.0)) for n in _alive(ray)]

    def holds_all(each: float) -> bool:
        return sum(_holds({"CPU": c}, {"CPU": each}) for c in cpus) >= copies

    for whole in range(int(max(cpus, default=0.0) + 1e-9), 0, -1):
        if holds_all(whole):
            return float(whole)
    shares = {math.floor(c / k * 1e4) / 1e4 for c in cpus for k in range(1, copies + 1)}
    return next((s for s in sorted(shares, reverse=True) if s > 0 and holds_all(s)), 1.0)
