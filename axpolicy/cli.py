"""Command line: ``axpolicy serve``, ``axpolicy lookup``, ``axpolicy check-config``, ``axpolicy doctor``.

EXIT STATUS (sysexits.h; doctor: see axpolicy/doctor/__init__.py)
    0   success (lookup: every address found)
    1   lookup: at least one address not found, none failed
    64  EX_USAGE: bad command line
    71  EX_OSERR: serve: a socket cannot be bound, the pidfile is held by
        another instance, or privileges cannot be dropped
    75  EX_TEMPFAIL: lookup: a temporary failure (message on stderr)
    78  EX_CONFIG: the configuration is invalid (message names the key or
        the file), or serve (and check-config, which refuses what serve
        refuses) was started as root without a user to drop to
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import yaml

from axpolicy import __version__
from axpolicy.config import DEFAULT_PATH, Config, ConfigError, digest, effective, load, warnings
from axpolicy.result import Status

EXIT_OK = 0
EXIT_NOTFOUND = 1
EXIT_USAGE = os.EX_USAGE  # 64
EXIT_OSERR = os.EX_OSERR  # 71
EXIT_TEMPFAIL = os.EX_TEMPFAIL  # 75
EXIT_CONFIG = os.EX_CONFIG  # 78


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="axpolicy", description="User-map lookups for Postfix and Exim front-ends.")
    parser.add_argument("--version", action="version", version=f"axpolicy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def with_config(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("-c", "--config", default=DEFAULT_PATH, metavar="CONFIG",
                         help=f"configuration file (default {DEFAULT_PATH})")

    lookup = commands.add_parser("lookup", help="resolve addresses like postmap -q")
    with_config(lookup)
    lookup.add_argument("--usermap", metavar="NAME", help="user map to ask (default: the first one)")
    lookup.add_argument("addresses", nargs="+", metavar="ADDRESS", help="address, or - to read them from stdin")

    check = commands.add_parser("check-config", help="validate and print the effective configuration")
    with_config(check)
    check.add_argument("--digest", action="store_true",
                       help="print only the digest of the effective configuration (secrets included)")

    doctor = commands.add_parser("doctor", help="find open-relay orderings, mis-wired maps and drifted front-ends")
    doctor.add_argument("-c", "--config", metavar="CONFIG",
                        help=f"axpolicy configuration to compare with (default {DEFAULT_PATH}, if it exists)")
    doctor.add_argument("--postfix-config", metavar="DIR",
                        help="Postfix configuration directory (default /etc/postfix, unless --exim-config is given)")
    doctor.add_argument("--exim-config", metavar="FILE", help="Exim configuration file")
    doctor.add_argument("--probe", metavar="HOST:PORT", help="try the open-relay vectors on this SMTP server")
    doctor.add_argument("--probe-recipient", metavar="ADDRESS",
                        help="an address the front-end must accept (probe) and the directory must resolve")
    doctor.add_argument("--peers", nargs="+", default=[], metavar="URL",
                        help="other front-ends' metrics URLs, whose configuration digest must match")
    doctor.add_argument("--json", action="store_true", help="print the findings as a JSON list")

    serve = commands.add_parser("serve", help="run the listeners named in the configuration")
    with_config(serve)
    serve.add_argument("--daemon", action="store_true", help="detach from the terminal (default: foreground)")
    serve.add_argument("--pidfile", metavar="PATH", help="pidfile, overriding the configuration's pidfile")
    return parser


def _load(path: str) -> Config:
    try:
        return load(path)
    except ConfigError as exc:
        raise SystemExit(_fail(EXIT_CONFIG, str(exc))) from None


def _fail(code: int, message: str) -> int:
    print(f"axpolicy: {message}", file=sys.stderr)
    return code


def _cmd_check_config(args: argparse.Namespace) -> int:
    from axpolicy import daemon

    config = _load(args.config)
    try:
        router = daemon.check(config)
    except daemon.StartupError as exc:
        return _fail(exc.code, str(exc))
    asyncio.run(router.close())
    for warning in warnings(config):
        print(f"axpolicy: warning: {warning}", file=sys.stderr)
    if args.digest:
        print(digest(config))
        return EXIT_OK
    yaml.safe_dump(effective(config), sys.stdout, sort_keys=False, default_flow_style=False)
    return EXIT_OK


async def _lookup_all(config: Config, usermap: str | None, addresses: list[str]) -> int:
    from axpolicy.filemap import FileMapError
    from axpolicy.router import Router

    try:
        router = Router.open(config)
    except FileMapError as exc:
        return _fail(EXIT_CONFIG, str(exc))
    code = EXIT_OK
    try:
        for address in addresses:
            result = await router.resolve(address, usermap)
            if result.status is Status.FOUND:
                print(f"{address}\t{result.value}", flush=True)
            elif result.status is Status.NOTFOUND:
                code = max(code, EXIT_NOTFOUND)
            else:
                print(f"axpolicy: {address}: temporary failure: {result.reason}", file=sys.stderr)
                code = EXIT_TEMPFAIL
    finally:
        await router.close()
    return code


def _cmd_lookup(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if args.usermap is not None and args.usermap not in config.usermaps:
        return _fail(EXIT_USAGE, f"--usermap: no user map named {args.usermap!r} "
                                 f"(configured: {', '.join(config.usermaps)})")
    addresses: list[str] = []
    for item in args.addresses:
        if item == "-":
            addresses.extend(line.strip() for line in sys.stdin if line.strip())
        else:
            addresses.append(item)
    return asyncio.run(_lookup_all(config, args.usermap, addresses))


def _cmd_doctor(args: argparse.Namespace) -> int:
    from axpolicy import doctor

    config = None
    if args.config is not None:
        config = _load(args.config)
    elif os.path.exists(DEFAULT_PATH):
        config = _load(DEFAULT_PATH)
    if args.peers and config is None:
        return _fail(EXIT_USAGE, f"--peers: no axpolicy configuration to compare with (-c; {DEFAULT_PATH} "
                                 f"does not exist)")
    postfix_config = args.postfix_config
    if postfix_config is None and args.exim_config is None:
        postfix_config = doctor.default_postfix_config()
    options = doctor.Options(config, postfix_config, args.exim_config, args.probe, args.probe_recipient,
                             tuple(args.peers))
    return doctor.report(doctor.run(options), args.json)


def _cmd_serve(args: argparse.Namespace) -> int:
    from axpolicy import daemon

    return daemon.serve(args.config, daemonize=args.daemon, pidfile_path=args.pidfile)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``axpolicy`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="axpolicy: %(levelname)s: %(message)s", stream=sys.stderr)
    handlers = {"lookup": _cmd_lookup, "check-config": _cmd_check_config, "serve": _cmd_serve,
                "doctor": _cmd_doctor}
    try:
        return handlers[args.command](args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_CONFIG
