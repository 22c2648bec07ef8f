"""Fuzz targets: every protocol parser and the address parser.

Run with atheris (coverage-guided, libFuzzer options accepted)::

    pip install atheris
    python fuzz/fuzz_protocols.py -max_total_time=60

The same target runs in the test suite through hypothesis
(tests/test_fuzz.py), so it is kept runnable without atheris too.  The
first input byte picks the parser, the second the chunk size, the rest is
fed in chunks; the only exceptions allowed are the parsers' own
FrameError and AddressError.  Anything else is a bug.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from axpolicy.address import AddressError, parse  # noqa: E402
from axpolicy.policy import _Framer as PolicyFramer  # noqa: E402
from axpolicy.readsocket import _Framer as ReadsocketFramer  # noqa: E402
from axpolicy.socketmap import _Framer as SocketmapFramer  # noqa: E402
from axpolicy.tcptable import QuoteError, unquote  # noqa: E402
from axpolicy.tcptable import _Framer as TcpFramer  # noqa: E402
from axpolicy.wire import FrameError  # noqa: E402

FRAMERS = (SocketmapFramer, TcpFramer, PolicyFramer, ReadsocketFramer)


def target(data: bytes) -> None:
    """One fuzz input; raises only on a bug."""
    if len(data) < 2:
        return
    choice, chunk, body = data[0] % (len(FRAMERS) + 2), data[1] % 64 + 1, data[2:]
    if choice == len(FRAMERS):
        try:
            address = parse(body.decode("utf-8", "surrogateescape"))
        except AddressError:
            return
        # Whatever parses is canonical and free of routing characters.
        if address.key.count("@") != 1 or set(address.local) & set("%!\"\\/|"):
            raise AssertionError(f"unsafe address accepted: {address!r}")
        return
    if choice == len(FRAMERS) + 1:
        try:
            unquote(body)
        except QuoteError:
            return
        return
    framer = FRAMERS[choice]()
    try:
        for start in range(0, len(body), chunk):
            framer.feed(body[start:start + chunk])
        framer.eof()
    except FrameError:
        return


def main() -> None:
    import atheris

    atheris.instrument_all()   # coverage feedback for the axpolicy modules imported above
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
