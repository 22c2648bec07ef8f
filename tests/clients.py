"""Minimal protocol clients for tests: raw sockets, independent of axpolicy's codecs."""

from __future__ import annotations

import socket

from tests.daemon import connect


def recv_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


class SocketmapClient:
    """A persistent socketmap connection, like Postfix's dict_sockmap."""

    def __init__(self, address: str) -> None:
        self.sock = connect(address)
        self.buffer = b""

    def send(self, name: str | bytes, key: str | bytes) -> None:
        payload = (name.encode() if isinstance(name, str) else name) + b" " + \
            (key.encode() if isinstance(key, str) else key)
        self.sock.sendall(b"%d:%s," % (len(payload), payload))

    def read(self) -> bytes:
        while b":" not in self.buffer:
            self._more()
        head, _, rest = self.buffer.partition(b":")
        length = int(head)
        while len(rest) < length + 1:
            self._more()
            head, _, rest = self.buffer.partition(b":")
        assert rest[length:length + 1] == b",", rest
        self.buffer = rest[length + 1:]
        return rest[:length]

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed by server")
        self.buffer += data

    def query(self, name: str | bytes, key: str | bytes) -> bytes:
        self.send(name, key)
        return self.read()

    def close(self) -> None:
        self.sock.close()


class LineClient:
    """A persistent line-based connection (tcp_table, policy)."""

    def __init__(self, address: str) -> None:
        self.sock = connect(address)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readline(self) -> bytes:
        return self.file.readline()

    def tcp_get(self, key: bytes) -> bytes:
        self.send(b"get " + key + b"\n")
        return self.readline()

    def policy(self, attributes: dict[str, str]) -> bytes:
        """Send one policy request; return the reply up to and including the empty line."""
        self.send(b"".join(f"{k}={v}\n".encode("utf-8", "surrogateescape") for k, v in attributes.items()) + b"\n")
        reply = b""
        while not reply.endswith(b"\n\n"):
            line = self.readline()
            if not line:
                raise ConnectionError(f"closed by server after {reply!r}")
            reply += line
        return reply

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def readsocket(address: str, request: bytes, shutdown: bool = True) -> bytes:
    """What Exim's ${readsocket} does: write, half-close (or not), read until closed."""
    sock = connect(address)
    try:
        sock.sendall(request)
        if shutdown:
            sock.shutdown(socket.SHUT_WR)
        return recv_until_closed(sock)
    finally:
        sock.close()


def rcpt_policy(recipient: str, state: str = "RCPT") -> dict[str, str]:
    """A policy request as Postfix 3.7 sends it (attribute order included)."""
    return {
        "request": "smtpd_access_policy", "protocol_state": state, "protocol_name": "ESMTP",
        "client_address": "192.0.2.7", "client_name": "unknown", "client_port": "49250",
        "reverse_client_name": "unknown", "server_address": "127.0.0.1", "server_port": "25",
        "helo_name": "client.example", "sender": "sender@elsewhere.example", "recipient": recipient,
        "recipient_count": "0", "queue_id": "", "instance": "2b72.6b0af633.39b96.0", "size": "100",
        "etrn_domain": "", "stress": "", "sasl_method": "", "sasl_username": "", "sasl_sender": "",
        "ccert_subject": "", "ccert_issuer": "", "ccert_fingerprint": "", "ccert_pubkey_fingerprint": "",
        "encryption_protocol": "", "encryption_cipher": "", "encryption_keysize": "0", "policy_context": "",
    }
