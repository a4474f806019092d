"""Authorization: may this message, from this peer, do what it asks?

The transport says who a sender *is* (:class:`~devit_mq.transport.Peer`: the CURVE key's name, the
MPI rank's node, or nobody when ZeroMQ runs without CURVE); the message says who it *claims* to be
(``source``). The rules, applied by every node to every message before any handler runs:

1. **Identity.** When the transport authenticates, the claimed ``source`` must be the authenticated
   name: an edge key cannot speak for another edge, a client key only for itself.
2. **Role.** Each kind is accepted only from the role that sends it: FEATURES, HEARTBEAT and
   ``ready`` for part *p* only from the edge that owns *p*; ERROR at the aggregator only from an
   edge; IMAGE at an edge only from a client, with ``reply_to`` naming that client; RESULT, ERROR
   and ``status_reply`` at a client only from the aggregator.
3. **Admin.** ``shutdown`` only from an admin: an admin key (CURVE's ``admin``; under MPI the
   job's own client rank), or, where nobody is authenticated, with the per-launch token the
   launcher handed to the nodes it started (a remote peer never sees it). A node without a token
   takes no remote shutdown at all; signals still stop it.

Without CURVE the network is trusted for rules 1-2 (claimed names are believed), but rule 3 and the
aggregator's client binding (:class:`ClientTable`: answers go over the connection that said hello,
never to whoever claims a name) still hold.
"""

from __future__ import annotations

import hmac
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from devit_mq.protocol import FeaturesMeta, HeartbeatMeta, Kind, Ready, Shutdown
from devit_mq.transport import Peer
from devit_mq.transport.security import may_claim
from devit_mq.wire import Message


@dataclass(frozen=True)
class Roster:
    """Who is who: the topology's servers, as every node needs them for authorization."""

    aggregator: str
    owners: Mapping[int, str]  # part -> the edge that runs it
    admin_keys: frozenset[str] = frozenset()
    admin_token: str | None = None

    @property
    def edges(self) -> frozenset[str]:
        return frozenset(self.owners.values())

    def is_server(self, name: str) -> bool:
        return name == self.aggregator or name in self.owners.values()


class Authorizer:
    """``check(msg, peer)`` -> ``None`` (allowed) or the reason it is refused, for a node of ``role``
    that handles the kinds in ``accepts`` (anything else is refused as unexpected)."""

    def __init__(self, roster: Roster, role: str, accepts: Collection[Kind]) -> None:
        self.roster = roster
        self.role = role
        self.accepts = frozenset(accepts)
        self._edges = roster.edges

    def check(self, msg: Message, peer: Peer) -> str | None:
        source = msg.source
        if peer.key is not None and not may_claim(peer.key, source):
            return f"claims to be {source!r} but is authenticated as {peer.key!r}"
        kind = msg.kind
        if kind not in self.accepts:
            return f"{kind.name} is not accepted here"
        r = self.roster
        meta = msg.meta
        if kind in (Kind.FEATURES, Kind.HEARTBEAT):
            assert isinstance(meta, (FeaturesMeta, HeartbeatMeta))
            return self._owner(meta.part, source, kind.name)
        if kind == Kind.IMAGE:
            if r.is_server(source):
                return f"images come from clients, not from node {source!r}"
            if msg.reply_to != source:
                return f"a client may only ask for answers to itself (reply_to {msg.reply_to!r})"
            return None
        if self.role == "client":  # answers, errors and status replies only from the aggregator
            return None if source == r.aggregator else f"{kind.name} only from the aggregator"
        if kind == Kind.ERROR:  # at the aggregator: an edge reporting on requests it was sent
            return None if source in self._edges else "ERROR about requests only from an edge"
        if kind == Kind.CONTROL:
            if isinstance(meta, Ready):
                return self._owner(meta.part, source, "ready")
            if isinstance(meta, Shutdown):
                return None if self.is_admin(meta, peer) else "shutdown needs the admin key or the launch's token"
        return None

    def _owner(self, part: int, source: str, what: str) -> str | None:
        owner = self.roster.owners.get(part)
        if owner is None:
            return f"{what} names part {part}, which this topology does not have"
        return None if owner == source else f"{what} for part {part} from {source!r} (part {part} runs on {owner!r})"

    def is_admin(self, meta: Shutdown, peer: Peer) -> bool:
        if peer.key is not None:
            return peer.key in self.roster.admin_keys
        token = self.roster.admin_token
        return bool(token) and hmac.compare_digest(meta.token.encode(), token.encode())


class ClientTable:
    """The aggregator's binding of client names to the connection each said hello on.

    Answers for ``reply_to = X`` go only to X's bound connection. A hello for a bound name from
    another connection rebinds only if it is authenticated as that very name (CURVE, a personal key
    named X), or if the old connection is gone (``alive(old)`` is false: the aggregator probes it);
    otherwise it is refused, so no connection can take another's answers. A connection holds one
    name at a time (a new hello on it releases its previous name), so evicting a live client takes
    ``capacity`` connections, not ``capacity`` hellos; names in use are refreshed on every answer,
    and the least recently used binding goes first."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._routes: OrderedDict[str, Peer] = OrderedDict()
        self._names: dict[object, str] = {}  # route -> the name bound to it

    def bind(self, name: str, peer: Peer, alive) -> bool:
        old = self._routes.get(name)
        if old is not None and old.route != peer.route:
            personal_key = peer.key is not None and peer.key == name == old.key
            if not personal_key and alive(old):
                return False
            self._names.pop(old.route, None)
        previous = self._names.get(peer.route)
        if previous is not None and previous != name:
            self._routes.pop(previous, None)
        self._routes[name] = peer
        self._routes.move_to_end(name)
        self._names[peer.route] = name
        while len(self._routes) > self.capacity:
            _, evicted = self._routes.popitem(last=False)
            self._names.pop(evicted.route, None)
        return True

    def route(self, name: str) -> Peer | None:
        peer = self._routes.get(name)
        if peer is not None:
            self._routes.move_to_end(name)
        return peer

    def forget(self, name: str) -> None:
        peer = self._routes.pop(name, None)
        if peer is not None:
            self._names.pop(peer.route, None)

    def __len__(self) -> int:
        return len(self._routes)
