"""Hostile inputs shared by the resilience and open-relay tests.

Hosted domains are example.com and example.net; elsewhere.example is a
third party; 127.0.0.1 is the front-end itself.
"""

from __future__ import annotations

# The classic open-relay test vectors (RCPT TO arguments, brackets included).
OPEN_RELAY_RCPTS = [
    "<victim@elsewhere.example>",
    "<victim@ELSEWHERE.EXAMPLE>",
    "<victim@elsewhere.example.>",
    "<victim%elsewhere.example@example.com>",
    "<victim%elsewhere.example@[127.0.0.1]>",
    "<victim%elsewhere.example>",
    '<"victim@elsewhere.example">',
    '<"victim%elsewhere.example">',
    '<"victim@elsewhere.example"@example.com>',
    '<"victim%elsewhere.example"@example.com>',
    "<victim@elsewhere.example@example.com>",
    "<victim@elsewhere.example@[127.0.0.1]>",
    "<@example.com:victim@elsewhere.example>",
    "<@[127.0.0.1]:victim@elsewhere.example>",
    "<@example.com,@elsewhere.example:victim@elsewhere.example>",
    "<elsewhere.example!victim>",
    "<elsewhere.example!victim@example.com>",
    "<elsewhere.example!victim@[127.0.0.1]>",
    "<victim@[192.0.2.99]>",
    "<victim@[IPv6:2001:db8::99]>",
    "<victim@evilexample.com>",                   # suffix-match bug
    "<victim@example.com.elsewhere.example>",     # prefix-match bug
    "<victim@exаmple.com>",                       # Cyrillic 'а' homograph
    "<victim@xn--exmple-4nf.com>",                # ... and its A-label
    "victim@elsewhere.example",                   # no angle brackets
    # Mapped users' addresses wrapped in routing: still third-party relaying.
    "<alice%elsewhere.example@example.com>",
    "<elsewhere.example!alice@example.com>",
    '<"alice@elsewhere.example"@example.com>',
]

# MAIL FROM arguments to try each vector with.
SENDERS = ["<spammer@elsewhere.example>", "<>", "<postmaster@example.com>"]

# Keys that must never be found, on any protocol, whatever the directory
# holds (routing tricks, LDAP filter metacharacters, malformed input).
NEVER_FOUND_KEYS = [
    "*",
    "*@example.com",
    "a*@example.com",
    "alice@example.com)(mail=*",
    "*)(|(mail=*",
    "alice\\2a@example.com",
    "alice\\@example.com",
    "alice@example.com\x00",
    "alice\x00@example.com",
    "alice@example.com\r",
    "alice\r\n@example.com",
    "alice@example.com.",
    "alice@example.com..",
    "alice@[127.0.0.1]",
    "alice@[IPv6:::1]",
    "alice%elsewhere.example@example.com",
    "elsewhere.example!alice@example.com",
    '"alice@elsewhere.example"@example.com',
    '"alice"@example.com',
    "alice@elsewhere.example@example.com",
    "@example.com:alice@example.com",
    "@example.com",
    "alice@",
    "alice",
    "",
    " alice@example.com",
    "alice@example.com ",
    "alice @example.com",
    "a" * 65 + "@example.com",
    "alice@" + "b" * 64 + ".example.com",
    "alice@" + "b." * 130 + "com",
    "alice@exаmple.com",
    "|alice@example.com",
    "/alice@example.com",
    ".alice@example.com",
]

# Raw bytes that are not UTF-8 (socketmap, tcp_table, readsocket keys).
NON_UTF8_KEYS = [b"al\xffce@example.com", b"alice@ex\xc3ample.com", b"\xc0\xae@example.com"]
