"""``state_dir``: where replicas keep their stores; it belongs to the daemon's user.

``serve`` creates it (mode 0700, owned by ``user`` and ``group``) before it
drops privileges, so the unprivileged daemon can write its stores there;
``check-config`` and ``serve`` refuse a ``state_dir`` (or a store file in
it) that the daemon's user could not write.  Only configurations with a
replicated user map need one.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat

from axpolicy.config import Config, LdapMapConfig


def _stores(config: Config) -> list[str]:
    return [cfg.store_path for cfg in config.usermaps.values() if isinstance(cfg, LdapMapConfig) and cfg.replica]


def _account(config: Config) -> tuple[int, int, set[int]]:
    """(uid, gid, groups) the daemon will run as."""
    if os.geteuid() != 0 or config.user is None:
        return os.geteuid(), os.getegid(), {os.getegid(), *os.getgroups()}
    account = pwd.getpwnam(config.user)
    gid = grp.getgrnam(config.group).gr_gid if config.group is not None else account.pw_gid
    return account.pw_uid, gid, {gid, *os.getgrouplist(config.user, gid)}


def _writable(path: str, uid: int, groups: set[int]) -> bool:
    info = os.stat(path)
    if uid == 0:
        return True
    if info.st_uid == uid:
        return bool(info.st_mode & stat.S_IWUSR)
    if info.st_gid in groups:
        return bool(info.st_mode & stat.S_IWGRP)
    return bool(info.st_mode & stat.S_IWOTH)


def problem(config: Config) -> str | None:
    """Why the daemon's user could not keep its replica stores in state_dir (None: it can)."""
    stores = _stores(config)
    if not stores:
        return None
    uid, _, groups = _account(config)
    who = config.user if os.geteuid() == 0 and config.user is not None else f"uid {uid}"
    path = config.state_dir
    try:
        if not os.path.lexists(path):
            parent = os.path.dirname(path.rstrip("/")) or "/"
            if os.geteuid() != 0 and not os.access(parent, os.W_OK | os.X_OK):
                return f"state_dir: {path} does not exist and {parent} is not writable"
            return None
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return f"state_dir: {path} is not a directory"
        if not _writable(path, uid, groups):
            return f"state_dir: {path} is not writable by {who} (chown it to the daemon's user)"
        for store in stores:
            for name in (store, store + "-lock", store + ".owner"):
                if os.path.lexists(name) and (os.path.islink(name) or not _writable(name, uid, groups)):
                    return f"state_dir: {name} is not writable by {who} (chown it, or remove it)"
    except OSError as exc:
        return f"state_dir: {path}: {exc.strerror or exc}"
    return None


def prepare(config: Config) -> None:
    """Create state_dir for the daemon's user if it is missing (before the privilege drop; OSError)."""
    if not _stores(config) or os.path.lexists(config.state_dir):
        return
    os.makedirs(config.state_dir, mode=0o700)
    uid, gid, _ = _account(config)
    if os.geteuid() == 0:
        os.chown(config.state_dir, uid, gid)
