"""The one exception the wire layer raises."""

from __future__ import annotations


class WireError(ValueError):
    """A message that cannot be encoded or must not be accepted.

    ``field`` names what is wrong: a header field (``"version"``, ``"kind"``, ``"source"``,
    ``"request_ids"``, ``"shape"``, ``"dtype"``, ``"codec"``, ``"block_size"``, ``"meta"``,
    ``"timestamps"``, ``"reply_to"``, ``"array"``, ``"header"`` for the header as a whole) or the
    framing (``"frames"``, ``"payload"``, ``"size"``). Receivers count and drop such messages; the
    string form is ``"<field>: <reason>"`` so a log line says what was wrong.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # picklable across multiprocessing queues
        return (type(self), (self.field, self.reason))
