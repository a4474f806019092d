"""Topologies: YAML -> validated, typed description of nodes, addresses, bundle and codec.

See :mod:`devit_mq.topology.schema` for the format.
"""

from .load import bundle_manifest, check_against_bundle, load_topology, read_yaml, resolve_bundle
from .schema import (
    ATTENTION_BACKENDS,
    CODECS,
    IMAGE_CODECS,
    MISSING_POLICIES,
    TRANSPORTS,
    Link,
    LinkLimits,
    NodeSpec,
    RoutePlan,
    Security,
    Topology,
    TopologyError,
    UnknownNodeError,
    parse_topology,
)

__all__ = [
    "ATTENTION_BACKENDS", "CODECS", "IMAGE_CODECS", "MISSING_POLICIES", "TRANSPORTS", "Link", "LinkLimits",
    "NodeSpec", "RoutePlan", "Security", "Topology", "TopologyError", "UnknownNodeError", "bundle_manifest", "check_against_bundle",
    "load_topology", "parse_topology", "read_yaml", "resolve_bundle",
]
