"""Edge, aggregator and client loops, written once against the transport interface, plus the glue
that builds them from a topology and the launcher that runs them as processes."""

from .aggregator import AggregatorNode
from .client import Answer, ClientError, ClientNode, Prediction
from .edge import EdgeNode

__all__ = ["AggregatorNode", "Answer", "ClientError", "ClientNode", "EdgeNode", "Prediction"]
