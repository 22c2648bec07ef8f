"""Netstrings (``LEN ":" BYTES ","``): a pure codec, no I/O.

PROTOCOL
    D. J. Bernstein's netstrings as Postfix reads and writes them
    (src/util/netstring.c): decimal length digits, a colon, the payload, a
    comma.  Postfix accepts only digits before the colon.

LIMITS
    The caller gives the largest payload it accepts; the length is refused
    as soon as its digits say it would be larger, before the payload is
    buffered.

DIAGNOSTICS
    :class:`NetstringTooLong` and :class:`NetstringMalformed`.
"""

from __future__ import annotations


class NetstringError(ValueError):
    """The byte stream is not a netstring stream."""


class NetstringTooLong(NetstringError):
    """The announced length exceeds the limit."""


class NetstringMalformed(NetstringError):
    """Bad length digits or a missing comma."""


def encode(payload: bytes) -> bytes:
    """Frame *payload* as one netstring."""
    return b"%d:%s," % (len(payload), payload)


class Decoder:
    """Incremental decoder: feed bytes, get complete payloads."""

    def __init__(self, max_payload: int) -> None:
        self._max = max_payload
        self._max_digits = len(str(max_payload))
        self._buffer = bytearray()

    @property
    def partial(self) -> bool:
        return bool(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Return every payload completed by *data*; raise NetstringError on garbage."""
        if not self._buffer:
            # The common case, one whole netstring in one read: no copy.
            colon = data.find(b":", 0, self._max_digits + 1)
            if colon > 0:
                head = data[:colon]
                if head.isdigit():
                    end = colon + 1 + int(head)
                    if end <= colon + 1 + self._max and len(data) == end + 1 and data[end] == 0x2C:
                        return [data[colon + 1:end]]
        buffer = self._buffer
        buffer += data
        payloads: list[bytes] = []
        while buffer:
            colon = buffer.find(b":", 0, self._max_digits + 1)
            if colon < 0:
                head = bytes(buffer[: self._max_digits + 1])
                if not head.isdigit():
                    raise NetstringMalformed("length is not decimal digits")
                if len(head) > self._max_digits:
                    raise NetstringTooLong("length has too many digits")
                break  # the rest of the length digits is still to come
            head = bytes(buffer[:colon])
            if not head.isdigit():
                raise NetstringMalformed("length is not decimal digits")
            length = int(head)
            if length > self._max:
                raise NetstringTooLong(f"length {length} exceeds {self._max}")
            end = colon + 1 + length
            if len(buffer) <= end:
                break
            if buffer[end] != 0x2C:  # ','
                raise NetstringMalformed("missing ',' after the payload")
            payloads.append(bytes(buffer[colon + 1:end]))
            del buffer[: end + 1]
        return payloads
