"""Policy delegation load generator: N persistent connections, RCPT requests, for D seconds.

Each connection sends one request, waits for the reply, and sends the next
(as smtpd does).  Prints one JSON line: requests/s, p50/p99 latency (ms),
and the replies seen, so the caller can check every answer.

    python bench/policyload.py HOST PORT CONNECTIONS SECONDS ADDRESS...
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import time

REQUEST = ("request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\nclient_address=192.0.2.7\n"
           "client_name=unknown\nclient_port=49250\nreverse_client_name=unknown\nserver_address=127.0.0.1\n"
           "server_port=25\nhelo_name=client.example\nsender=sender@elsewhere.example\nrecipient={recipient}\n"
           "recipient_count=0\nqueue_id=\ninstance=2b72.6b0af633.39b96.0\nsize=100\netrn_domain=\nstress=\n"
           "sasl_method=\nsasl_username=\nsasl_sender=\nccert_subject=\nccert_issuer=\nccert_fingerprint=\n"
           "ccert_pubkey_fingerprint=\nencryption_protocol=\nencryption_cipher=\nencryption_keysize=0\n"
           "policy_context=\n\n")


async def client(host: str, port: int, deadline: float, addresses: list[str], offset: int,
                 latencies: list[float], replies: collections.Counter[tuple[str, bytes]]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    requests = [(a, REQUEST.format(recipient=a).encode()) for a in addresses]
    index = offset
    while time.perf_counter() < deadline:
        address, request = requests[index % len(requests)]
        index += 1
        started = time.perf_counter()
        writer.write(request)
        reply = await reader.readuntil(b"\n\n")
        latencies.append(time.perf_counter() - started)
        replies[(address, reply)] += 1
    writer.close()


async def main() -> None:
    host, port, connections, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    addresses = sys.argv[5:]
    latencies: list[float] = []
    replies: collections.Counter[tuple[str, bytes]] = collections.Counter()
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(client(host, port, deadline, addresses, n * 7, latencies, replies)
                           for n in range(connections)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    print(json.dumps({
        "requests_per_second": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "requests": len(latencies),
        "replies": {f"{a}\t{r.decode(errors='replace').strip()}": n for (a, r), n in replies.items()},
    }))


if __name__ == "__main__":
    try:
        import uvloop
        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
