"""Postfix SMTPD access policy delegation (``check_policy_service``).

PROTOCOL
    SMTPD_POLICY_README, src/smtpd/smtpd_check.c.  A request is
    ``name=value`` lines ending with an empty line; the reply is
    ``action=<text>`` followed by an empty line.  Connections are
    persistent (one per smtpd process).

    At ``protocol_state=RCPT`` the recipient is looked up:

    ===================  =================================================
    mapped (found)       ``policy.mapped`` (default ``OK``; ``%s`` = host)
    unmapped             ``policy.unmapped`` (default ``DUNNO``): Postfix's
                         own restrictions decide
    temporary failure    ``policy.tempfail`` (default ``DEFER_IF_PERMIT
                         4.3.0 User map temporarily unavailable``)
    ===================  =================================================

    Every other state, and a request without recipient, is ``DUNNO``.

LIMITS
    ``POLICY_MAX_LINE_BYTES`` per line, ``POLICY_MAX_ATTRIBUTES`` and
    ``POLICY_MAX_REQUEST_BYTES`` per request.

SECURITY
    Replies always carry an action word with text: Postfix reads an empty
    action or a bare number as OK, which in ``smtpd_relay_restrictions``
    permits relaying.  Addresses with routing tricks are never found, so they
    never get ``OK``.  Replies end in ``\\n`` only (CRLF hangs the client).
    A request that breaks the protocol (a line without ``=``, over a limit,
    a ``request`` other than ``smtpd_access_policy``) is logged and the
    connection is closed without a reply, as the README asks; Postfix then
    retries and finally applies ``default_action``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable

from axpolicy import limits
from axpolicy.config import MapConfig, PolicyConfig, expand_template
from axpolicy.log import printable
from axpolicy.result import LookupResult, Status
from axpolicy.router import Answer, Router
from axpolicy.stats import OUTCOME, STATS
from axpolicy.wire import FrameError, LineTooLong, split_lines, unsafe_value

logger = logging.getLogger(__name__)

Request = dict[str, str]

_DUNNO = b"action=DUNNO\n\n"


def action_reply(action: str) -> bytes:
    """Frame one action; the text was validated at configuration load."""
    return b"action=" + action.encode("utf-8") + b"\n\n"


class _Framer:
    def __init__(self) -> None:
        self._buffer = bytearray()
        self._attributes: Request = {}
        self._count = 0
        self._size = 0

    @property
    def partial(self) -> bool:
        return bool(self._buffer) or bool(self._count)

    def feed(self, data: bytes) -> list[Request]:
        if not self._buffer and not self._count:
            whole = _whole_request(data)
            if whole is not None:
                return [whole]
        requests: list[Request] = []
        try:
            lines = split_lines(self._buffer, data, limits.POLICY_MAX_LINE_BYTES)
        except LineTooLong:
            raise FrameError("policy: line too long") from None
        # LF only, as Postfix sends: a CR stays part of the line, so a value
        # can never lose a character to framing.
        for line in lines:
            request = self._line(line)
            if request is not None:
                requests.append(request)
        return requests

    def _line(self, line: bytes) -> Request | None:
        if not line:
            if not self._count:
                raise FrameError("policy: empty request")
            request, self._attributes, self._count, self._size = self._attributes, {}, 0, 0
            return request
        self._count += 1
        self._size += len(line) + 1
        if self._count > limits.POLICY_MAX_ATTRIBUTES or self._size > limits.POLICY_MAX_REQUEST_BYTES:
            raise FrameError("policy: request too large")
        name, equals, value = line.partition(b"=")
        if not equals or not name:
            raise FrameError(f"policy: not an attribute line: {printable(line)}")
        # Repeated attributes are allowed (README); the last one wins.
        self._attributes[name.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        return None

    def eof(self) -> list[Request]:
        return []


def _whole_request(data: bytes) -> Request | None:
    """*data* parsed at once when it is exactly one valid request, else None.

    smtpd writes each request with one write, so a read usually holds one
    whole request; parsing it in one go costs a fraction of line-by-line
    parsing.  Anything unusual (several requests, a bad line, a limit)
    returns None and goes through the line parser, which says what is
    wrong.  Splitting after decoding is the same as before: no UTF-8
    sequence contains the bytes ``=`` or LF.
    """
    if (len(data) > limits.POLICY_MAX_REQUEST_BYTES or not data.endswith(b"\n\n")
            or data.find(b"\n\n") != len(data) - 2):
        return None
    lines = data[:-2].decode("utf-8", "surrogateescape").split("\n")
    if len(lines) > limits.POLICY_MAX_ATTRIBUTES or max(map(len, lines)) > limits.POLICY_MAX_LINE_BYTES // 4:
        return None   # long lines: let the line parser count their bytes
    try:
        request = dict([line.split("=", 1) for line in lines])
    except ValueError:
        return None   # a line without "="
    if "" in request:
        return None
    return request


class PolicyService:
    """Answers policy delegation requests (see module docstring)."""

    protocol = "policy"
    close_after_reply = False

    def __init__(self, router: Router, policy: PolicyConfig) -> None:
        self._router = router
        self._policy = policy
        self._tempfail = action_reply(policy.tempfail)
        self._unmapped = action_reply(policy.unmapped)
        self.tempfail_reply = self._tempfail
        # The recipient's host, from the policy's user map.
        self._recipients = MapConfig(name="", usermap=policy.usermap or router.config.default_usermap)

    def framer(self) -> _Framer:
        return _Framer()

    @staticmethod
    def _recipient(request: Request) -> str | None:
        """The recipient to look up, or None when the answer is DUNNO without a lookup."""
        if request.get("protocol_state", "").upper() != "RCPT":
            return None
        return request.get("recipient", "") or None

    def _reply(self, result: LookupResult, started: float) -> bytes:
        status = result.status
        reply = self._unmapped if status is Status.NOTFOUND else self._tempfail
        if status is Status.FOUND:
            action = expand_template(self._policy.mapped, result.value)
            if unsafe_value("policy", action):
                status = Status.TEMP
            else:
                reply = action_reply(action)
        STATS.record("policy", "policy", OUTCOME[status], time.perf_counter() - started)
        return reply

    def replay(self, data: bytes) -> bytes | None:
        """Never: every policy request carries its own instance and client attributes."""
        return None

    def greeting(self) -> bytes | None:
        """Postfix speaks first."""
        return None

    def answer(self, request: Request, whole: bytes | None = None) -> bytes | None | Awaitable[bytes]:
        """The reply at once when it needs no I/O (other states, cache hits), else an awaitable reply.

        None closes the connection without a reply (a request that is not
        a policy request), as SMTPD_POLICY_README asks.
        """
        kind = request.get("request")
        if kind != "smtpd_access_policy":
            logger.warning("policy: unsupported request=%s; closing", printable(kind or ""))
            return None
        recipient = self._recipient(request)
        if recipient is None:
            return _DUNNO
        started = time.perf_counter()
        answer = self._router.query(self._recipients, recipient)
        if isinstance(answer, Answer):
            return self._reply(answer.result, started)
        return self._later(recipient, answer, started)

    async def _later(self, recipient: str, pending: Awaitable[Answer], started: float) -> bytes:
        result = (await pending).result
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("policy RCPT %s: %s", printable(recipient), result.status.value)
        return self._reply(result, started)
