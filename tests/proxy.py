"""A TCP relay that stops passing the server's bytes after a budget: a refresh cut short, on cue."""

from __future__ import annotations

import contextlib
import socket
import threading


class StallingProxy:
    """Relays 127.0.0.1:port to an upstream port; each connection gets *budget* bytes from upstream, then nothing."""

    def __init__(self, upstream_port: int, budget: int) -> None:
        self.upstream_port = upstream_port
        self.budget = budget
        self.stalled = threading.Event()       # some connection used up its budget
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._sockets: list[socket.socket] = [self._listener]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, self.budget), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, budget: int | None) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if budget is not None:
                    data = data[:budget]
                    budget -= len(data)
                target.sendall(data)
                if budget == 0:
                    self.stalled.set()
                    return          # hold the connection open, silent
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
