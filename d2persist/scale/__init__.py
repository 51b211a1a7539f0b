"""
``scale``: prediction at scale, over :mod:`d2persist.predict`'s predictors. ``d2persist
predict``: every image of a source (a folder, a glob, a list, an fsspec URL) predicted into a
destination exactly once, resumable, on this machine or on Ray Data (:mod:`.batch`);
``d2persist serve``: predictions over HTTP on Ray Serve (:mod:`.serve`); what a Ray cluster's
nodes can hold, asked before its actors and replicas are (:mod:`.ray_nodes`).

Ray is imported only where a job or a server runs on it (``pip install 'd2persist[ray]'``);
nothing here imports torch.
"""

from .batch import (
    RayEngine,
    Source,
    check_destination,
    job_identity,
    list_source,
    predict_source,
)
from .ray_nodes import check_ray_nodes, cpus_per_copy, refusal_on_node
from .serve import (
    Endpoint,
    check_port_free,
    deployment,
    health_of,
    multipart_file,
    run_server,
)

__all__ = [
    "RayEngine",
    "Source",
    "check_destination",
    "job_identity",
    "list_source",
    "predict_source",
    "check_ray_nodes",
    "cpus_per_copy",
    "refusal_on_node",
    "Endpoint",
    "check_port_free",
    "deployment",
    "health_of",
    "multipart_file",
    "run_server",
]
