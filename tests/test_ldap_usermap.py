"""The LDAP user map against a real slapd: found, not found, and every cause of a temporary failure.

No test here uses an ldap3 MOCK strategy: a real slapd answers, or is
stopped, killed or paused (SIGSTOP) to make it fail.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from axpolicy import config
from axpolicy.result import NOTFOUND, LookupResult, Status
from axpolicy.router import Router
from tests.conftest import ldap_map, run
from tests.slapd import BIND_PW, SUFFIX, Slapd

NO_CACHE = {"ttl": 0, "negative_ttl": 0, "stale_if_error": 0, "max_entries": 0}


def make_router(*servers: Slapd, cache: dict[str, Any] | None = None, **overrides: Any) -> Router:
    raw = {"usermaps": {"people": ldap_map(*servers, **overrides)}, "recipient_delimiter": "+",
           "cache": cache if cache is not None else NO_CACHE}
    return Router.open(config.parse(raw, "/tmp/axpolicy-test.yml"))


def resolve_all(router: Router, *addresses: str) -> list[LookupResult]:
    async def go() -> list[LookupResult]:
        try:
            return [await router.resolve(a) for a in addresses]
        finally:
            await router.close()
    return run(go())


def resolve_one(router: Router, address: str) -> LookupResult:
    return resolve_all(router, address)[0]


@pytest.mark.parametrize(("address", "host"), [
    ("alice@example.com", "127.0.0.2"),
    ("ALICE@Example.COM", "127.0.0.2"),
    ("alice+lists@example.com", "127.0.0.2"),          # extension stripped, Postfix order
    ("Alice+Lists@EXAMPLE.com", "127.0.0.2"),
    ("alice.smith@example.com", "127.0.0.2"),          # mailAlternateAddress
    ("asmith@example.net", "127.0.0.2"),
    ("bob@example.com", "127.0.0.3"),
    ("frank.miller@example.com", "127.0.0.2"),         # stored in mixed case
    ("jose@bücher.example", "127.0.0.3"),              # U-label query, A-label entry
    ("jose@xn--bcher-kva.example", "127.0.0.3"),
    ("plus+tag@example.com", "127.0.0.3"),             # the full key wins first
    ("st*r@example.com", "127.0.0.2"),                 # metacharacter in a real address
    ("shared@example.com", "127.0.0.2"),               # two entries that agree
    ("7@example.com", "127.0.0.2"),                    # numeric alias
    ("six@example.com", "::1"),                        # an IPv6 back-end
])
def test_mapped_users_are_found(slapd: Slapd, address: str, host: str) -> None:
    assert resolve_one(make_router(slapd), address) == LookupResult(Status.FOUND, host)


@pytest.mark.parametrize("address", [
    "nobody@example.com",
    "nobody+ext@example.com",
    "alice@example.org",            # a user of another domain, no catch-all asked
    "a*@example.com",               # would match alice if '*' were not escaped
    "*@example.com",
    "st**@example.com",
    "alice@example.co*",
    "*",
    "alice%example.com@example.com",
    "alice@example.com.",
    "fran\u212a.miller@example.com",  # KELVIN SIGN: str.lower() would make it frank.miller
    "a\u017fmith@example.net",       # LONG S: slapd's caseIgnoreMatch would fold it onto asmith
])
def test_unmapped_and_impossible_addresses_are_not_found(slapd: Slapd, address: str) -> None:
    assert resolve_one(make_router(slapd), address).status is Status.NOTFOUND


def test_non_ascii_local_parts_never_reach_the_directory(slapd: Slapd) -> None:
    """slapd's caseIgnoreMatch (uid, cn) folds U+017F LONG S onto "s": the key would find shared1."""
    router = make_router(slapd, filter="(|(mail=%s)(uid=%u))")
    assert resolve_all(router, "SHARED1@example.com", "\u017fhared1@example.com") == [
        LookupResult(Status.FOUND, "127.0.0.2"), NOTFOUND]


def test_entry_without_the_host_attribute_is_not_found_with_a_warning(
        slapd: Slapd, caplog: pytest.LogCaptureFixture) -> None:
    assert resolve_one(make_router(slapd), "dave@example.com").status is Status.NOTFOUND
    assert "uid=dave,ou=people,dc=example,dc=com has no mailHost" in caplog.text


def test_catch_all_entries_are_used_only_when_configured(slapd: Slapd) -> None:
    assert resolve_one(make_router(slapd), "anyone@example.org").status is Status.NOTFOUND
    with_catchall = make_router(slapd, catchall=True)
    assert resolve_all(with_catchall, "anyone@example.org", "oscar@example.org") == [
        LookupResult(Status.FOUND, "127.0.0.3"), LookupResult(Status.FOUND, "127.0.0.2")]


@pytest.mark.parametrize(("address", "overrides", "reason"), [
    ("twin@example.com", {}, "user map entry is ambiguous"),
    ("erin@example.com", {"host_attribute": "description"}, "user map entry is ambiguous"),
    ("badhost@example.com", {}, "user map entry has a bad host"),
    ("zonebreak@example.com", {}, "user map entry has a bad host"),   # IPv6 zone id hiding a line break
    ("zonehop@example.com", {}, "user map entry has a bad host"),     # ... and a second next hop
    ("alice@example.com", {"base": "ou=missing,dc=example,dc=com"}, "user map search failed"),
    ("alice@example.com", {"base": SUFFIX}, "user map returned a referral"),
    ("alice@example.com", {"base": "ou=partners,dc=example,dc=com"}, "user map search incomplete"),
    ("alice@example.com", {"filter": "(|(mail=%s)(objectClass=inetOrgPerson))"}, "user map search incomplete"),
    ("alice@example.com", {"bind_password": "wrong-password"}, "user map unavailable"),
])
def test_directory_problems_are_temporary_failures(
        slapd: Slapd, address: str, overrides: dict[str, Any], reason: str) -> None:
    assert resolve_one(make_router(slapd, **overrides), address) == LookupResult(Status.TEMP, reason=reason)


def test_bind_failure_never_logs_the_password(slapd: Slapd, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    resolve_one(make_router(slapd, bind_password="wrong-password-xyzzy"), "alice@example.com")
    assert "invalidCredentials" in caplog.text or "LDAPBindError" in caplog.text
    assert "xyzzy" not in caplog.text
    resolve_one(make_router(slapd), "alice@example.com")
    assert BIND_PW not in caplog.text


def test_anonymous_bind_works(slapd: Slapd) -> None:
    router = make_router(slapd, bind_dn=None, bind_password=None)
    assert resolve_one(router, "bob@example.com").value == "127.0.0.3"


def test_stopped_server_is_a_temporary_failure(slapd: Slapd) -> None:
    slapd.stop()
    assert resolve_one(make_router(slapd), "alice@example.com") == LookupResult(
        Status.TEMP, reason="user map unavailable")


def test_killed_server_mid_session_is_a_temporary_failure_then_recovers(slapd: Slapd) -> None:
    async def go() -> list[Status]:
        router = make_router(slapd)
        try:
            statuses = [(await router.resolve("alice@example.com")).status]
            slapd.kill()
            statuses.append((await router.resolve("alice@example.com")).status)
            slapd.start()
            statuses.append((await router.resolve("alice@example.com")).status)
        finally:
            await router.close()
        return statuses
    assert run(go()) == [Status.FOUND, Status.TEMP, Status.FOUND]


def test_hung_server_gives_a_timeout_not_a_hang(slapd: Slapd) -> None:
    async def go() -> tuple[LookupResult, LookupResult]:
        router = make_router(slapd, timeout=0.5)
        try:
            await router.resolve("bob@example.com")   # connection established
            slapd.pause()
            return await router.resolve("alice@example.com"), await router.resolve("carol@example.net")
        finally:
            slapd.resume()
            await router.close()
    first, second = run(go())
    assert first == LookupResult(Status.TEMP, reason="user map timeout")
    assert second.status is Status.TEMP


def test_restarted_server_is_transparent(slapd: Slapd) -> None:
    """A reused connection that broke is retried once on a fresh one."""
    async def go() -> list[LookupResult]:
        router = make_router(slapd)
        try:
            results = [await router.resolve("alice@example.com")]
            slapd.stop()
            slapd.start()
            results.append(await router.resolve("alice@example.com"))
            return results
        finally:
            await router.close()
    assert run(go()) == [LookupResult(Status.FOUND, "127.0.0.2")] * 2


def test_failover_to_the_second_server_and_back(slapd: Slapd, slapd2: Slapd) -> None:
    """``whoami@example.com`` has host .2 on the first server and .3 on the second."""
    async def go() -> list[str]:
        router = make_router(slapd, slapd2, failback_interval=0.5)
        seen = []
        try:
            seen.append((await router.resolve("whoami@example.com")).value)
            slapd.stop()
            seen.append((await router.resolve("whoami@example.com")).value)
            seen.append((await router.resolve("alice@example.com")).value)
            slapd.start()
            await asyncio.sleep(0.6)   # failback_interval has passed
            seen.append((await router.resolve("whoami@example.com")).value)
        finally:
            await router.close()
        return seen
    assert run(go()) == ["127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.2"]


def test_first_server_down_from_the_start(slapd: Slapd, slapd2: Slapd) -> None:
    slapd.stop()
    assert resolve_all(make_router(slapd, slapd2), "whoami@example.com", "bob@example.com") == [
        LookupResult(Status.FOUND, "127.0.0.3"), LookupResult(Status.FOUND, "127.0.0.3")]


def test_hung_first_server_fails_over_without_ever_saying_not_found(slapd: Slapd, slapd2: Slapd) -> None:
    async def go() -> list[LookupResult]:
        router = make_router(slapd, slapd2, timeout=0.5, failback_interval=30)
        results = []
        try:
            await router.resolve("whoami@example.com")
            slapd.pause()
            for _ in range(20):
                result = await router.resolve("whoami@example.com")
                results.append(result)
                if result.status is Status.FOUND:
                    break
                await asyncio.sleep(0.1)
        finally:
            slapd.resume()
            await router.close()
        return results
    results = run(go())
    assert results[-1] == LookupResult(Status.FOUND, "127.0.0.3")
    assert all(r.status is not Status.NOTFOUND for r in results)


def test_a_hung_first_server_is_answered_by_the_second_within_one_lookup(slapd: Slapd, slapd2: Slapd) -> None:
    """The deadline is shared: the first server gets half of it, the second the rest (no "timeout")."""
    async def go() -> LookupResult:
        router = make_router(slapd, slapd2, timeout=1, failback_interval=30)
        try:
            await router.resolve("whoami@example.com")          # connected to the first
            slapd.pause()
            return await router.resolve("whoami@example.com")
        finally:
            slapd.resume()
            await router.close()
    assert run(go()) == LookupResult(Status.FOUND, "127.0.0.3")


def test_a_reset_connection_is_answered_by_the_second_server(slapd: Slapd, slapd2: Slapd) -> None:
    async def go() -> LookupResult:
        router = make_router(slapd, slapd2, failback_interval=30)
        try:
            await router.resolve("whoami@example.com")
            slapd.kill()                                         # established connections reset
            return await router.resolve("whoami@example.com")
        finally:
            await router.close()
    assert run(go()) == LookupResult(Status.FOUND, "127.0.0.3")


def expected_answer(address: str) -> LookupResult:
    number = address.split("@")[0].removeprefix("user")
    if address.startswith("user") and number.isdigit() and 1 <= int(number) <= 20:
        return LookupResult(Status.FOUND, "127.0.0.2" if int(number) % 2 else "127.0.0.3")
    return NOTFOUND


CROWD = [f"user{n}@example.com" for n in range(1, 21)] + [f"nobody{n}+x@example.com" for n in range(280)]


def test_every_lookup_in_flight_when_the_first_server_hangs_is_answered_by_the_second(
        slapd: Slapd, slapd2: Slapd) -> None:
    """300 concurrent unique lookups, the primary hung under them: none fails, none is "not found" wrongly."""
    async def go() -> list[LookupResult]:
        router = make_router(slapd, slapd2, timeout=2, failback_interval=30)
        try:
            await router.resolve("bob@example.com")
            lookups = asyncio.gather(*(router.resolve(a) for a in CROWD))
            await asyncio.sleep(0)                               # sent to the first server...
            slapd.pause()                                        # ...which hangs under them
            return list(await lookups)
        finally:
            slapd.resume()
            await router.close()
    results = run(go())
    wrong = [(a, r) for a, r in zip(CROWD, results, strict=True) if r != expected_answer(a)]
    assert wrong == []


def test_the_defaults_absorb_a_burst_of_unique_lookups(slapd: Slapd) -> None:
    """Two or three keys per address (extension, catch-all): no "overloaded" with the default queue."""
    raw = {"usermaps": {"people": {k: v for k, v in ldap_map(slapd, catchall=True).items()
                                   if k not in ("pool_size", "timeout")}},
           "recipient_delimiter": "+", "cache": NO_CACHE}

    async def go() -> list[LookupResult]:
        router = Router.open(config.parse(raw, "/tmp/axpolicy-test.yml"))
        try:
            return list(await asyncio.gather(*(router.resolve(a) for a in CROWD)))
        finally:
            await router.close()
    results = run(go())
    assert [r for r in results if r.status is Status.TEMP] == []
    assert results == [expected_answer(a) for a in CROWD]


def test_the_connect_timeout_bounds_a_server_that_never_completes_the_handshake(slapd: Slapd) -> None:
    """A hung server that accepts TCP but never answers the bind: the connect step gives up on its own
    ("unavailable"), long before the lookup's deadline would ("timeout")."""
    async def go() -> LookupResult:
        router = make_router(slapd, timeout=5, connect_timeout=0.3)
        slapd.pause()
        try:
            return await router.resolve("alice@example.com")
        finally:
            slapd.resume()
            await router.close()
    assert run(go()) == LookupResult(Status.TEMP, reason="user map unavailable")


def test_both_servers_down_is_a_temporary_failure(slapd: Slapd, slapd2: Slapd) -> None:
    slapd.stop()
    slapd2.stop()
    assert resolve_one(make_router(slapd, slapd2), "alice@example.com").status is Status.TEMP


def test_searches_do_not_block_the_event_loop(slapd: Slapd, tmp_path: Any) -> None:
    async def go() -> tuple[bool, bool]:
        router = make_router(slapd, timeout=1)
        try:
            await router.resolve("bob@example.com")
            slapd.pause()
            slow = asyncio.ensure_future(router.resolve("alice@example.com"))
            await asyncio.sleep(0.05)   # the loop keeps running while the search hangs
            still_waiting = not slow.done()
            await slow
            return still_waiting, slow.result().status is Status.TEMP
        finally:
            slapd.resume()
            await router.close()
    assert run(go()) == (True, True)


def test_overload_gives_fast_temporary_failures(slapd: Slapd) -> None:
    async def go() -> list[str]:
        router = make_router(slapd, timeout=1, pool_size=1, queue_size=2)
        try:
            await router.resolve("bob@example.com")
            slapd.pause()
            results = await asyncio.gather(*(router.resolve(f"user{n}@example.com") for n in range(1, 6)))
            return [r.reason for r in results]
        finally:
            slapd.resume()
            await router.close()
    reasons = run(go())
    assert reasons.count("user map overloaded") == 3   # queue_size (2) wait for the directory, the rest refused
    assert all(r in ("user map overloaded", "user map timeout") for r in reasons)


class CountingMap:
    """Counts lookups that reach the real LDAP map (instrumentation, not a mock)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, 0
        self.name, self.catchall, self.cached = inner.name, inner.catchall, inner.cached

    def lookup_now(self, key: str) -> LookupResult | None:
        return self.inner.lookup_now(key)  # type: ignore[no-any-return]

    def start(self) -> None:
        self.inner.start()

    def answers_version(self) -> int | None:
        return self.inner.answers_version()  # type: ignore[no-any-return]

    async def lookup(self, key: str) -> LookupResult:
        self.calls += 1
        return await self.inner.lookup(key)

    async def close(self) -> None:
        await self.inner.close()


def test_concurrent_lookups_of_one_key_share_one_search(slapd: Slapd) -> None:
    async def go() -> tuple[int, set[str]]:
        router = make_router(slapd)
        counting = CountingMap(router.usermaps["people"])
        router.usermaps["people"] = counting
        try:
            results = await asyncio.gather(*(router.resolve("alice@example.com") for _ in range(50)))
            return counting.calls, {r.value for r in results}
        finally:
            await router.close()
    assert run(go()) == (1, {"127.0.0.2"})


def test_stale_answers_are_served_while_the_directory_is_down(
        slapd: Slapd, caplog: pytest.LogCaptureFixture) -> None:
    cache = {"ttl": 0, "negative_ttl": 0, "stale_if_error": 3600, "max_entries": 1000}

    async def go() -> list[LookupResult]:
        router = make_router(slapd, cache=cache)
        try:
            await router.resolve("alice@example.com")
            await router.resolve("nobody@example.com")
            slapd.stop()
            return [await router.resolve(a) for a in ("alice@example.com", "nobody@example.com", "bob@example.com")]
        finally:
            await router.close()
    assert run(go()) == [LookupResult(Status.FOUND, "127.0.0.2"), LookupResult(Status.NOTFOUND),
                         LookupResult(Status.TEMP, reason="user map unavailable")]
    assert "serving cached answer for alice@example.com" in caplog.text


def test_fresh_cache_answers_without_asking_the_directory(slapd: Slapd) -> None:
    async def go() -> tuple[int, LookupResult]:
        router = make_router(slapd, cache={"ttl": 300, "negative_ttl": 60, "stale_if_error": 0,
                                           "max_entries": 100})
        counting = CountingMap(router.usermaps["people"])
        router.usermaps["people"] = counting
        try:
            for _ in range(3):
                result = await router.resolve("Bob@Example.com")
            return counting.calls, result
        finally:
            await router.close()
    assert run(go()) == (1, LookupResult(Status.FOUND, "127.0.0.3"))


KNOWN_MAILS = {"alice@example.com", "st*r@example.com", "bob@example.com"}
LOCAL_ALPHABET = st.sampled_from(list("ab*()\\\x00=&|!~<>st") + ["r", "ice", "alice", "st*r"])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(LOCAL_ALPHABET, min_size=1, max_size=6).map("".join))
def test_no_local_part_matches_an_entry_that_is_not_its_own(slapd: Slapd, local: str) -> None:
    address = f"{local}@example.com"
    result = resolve_one(make_router(slapd), address)
    if address in KNOWN_MAILS:
        assert result.status is Status.FOUND
    else:
        assert result.status is Status.NOTFOUND, address


@pytest.mark.parametrize("key", [
    "alice@example.com)(mail=*",
    "*)(objectClass=*",
    "x)(|(mail=*)",
    "alice\\2a@example.com",
    "alice@example.com\x00",
    "*@example.com",
    "@*",
])
def test_the_ldap_map_escapes_every_key_itself(slapd: Slapd, key: str) -> None:
    """Defence in depth: even a key the router would refuse cannot inject."""
    async def go() -> LookupResult:
        router = make_router(slapd)
        try:
            return await router.usermaps["people"].lookup(key)
        finally:
            await router.close()
    assert run(go()).status is Status.NOTFOUND


def test_ldaps_with_the_right_ca(slapd_tls: Slapd) -> None:
    router = make_router(slapd_tls, servers=[slapd_tls.ldaps_url], ca_file=str(slapd_tls.ca_file))
    assert resolve_one(router, "alice@example.com") == LookupResult(Status.FOUND, "127.0.0.2")


def test_start_tls_with_the_right_ca(slapd_tls: Slapd) -> None:
    router = make_router(slapd_tls, start_tls=True, ca_file=str(slapd_tls.ca_file))
    assert resolve_one(router, "bob@example.com") == LookupResult(Status.FOUND, "127.0.0.3")


def test_an_untrusted_certificate_is_a_temporary_failure(slapd_tls: Slapd) -> None:
    """Without the private CA the certificate does not verify: never a silent plain-text fallback."""
    assert resolve_one(make_router(slapd_tls, servers=[slapd_tls.ldaps_url]), "alice@example.com") == \
        LookupResult(Status.TEMP, reason="user map unavailable")
    assert resolve_one(make_router(slapd_tls, start_tls=True), "alice@example.com") == \
        LookupResult(Status.TEMP, reason="user map unavailable")
