"""The fuzz target of fuzz/fuzz_protocols.py, driven by hypothesis on every run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_SPEC = importlib.util.spec_from_file_location(
    "fuzz_protocols", Path(__file__).resolve().parent.parent / "fuzz" / "fuzz_protocols.py")
assert _SPEC is not None and _SPEC.loader is not None
fuzz = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fuzz)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_fuzz_target_survives_random_input(data: bytes) -> None:
    fuzz.target(data)


@settings(max_examples=1000, deadline=None)
@given(st.integers(0, 5), st.integers(0, 255),
       st.lists(st.sampled_from([b"get ", b"%", b"%2", b"\n", b"\r", b":", b",", b"=", b"1", b"99999", b"@",
                                 b"request=smtpd_access_policy\n", b"transport ", b"\x00", b"\xff"]), max_size=40))
def test_fuzz_target_survives_protocol_shaped_input(choice: int, chunk: int, parts: list[bytes]) -> None:
    fuzz.target(bytes([choice, chunk]) + b"".join(parts))
