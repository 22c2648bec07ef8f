"""Cluster drift: compare every peer's running configuration digest with the local one.

Each front-end's metrics endpoint exports ``axpolicy_config_info{digest,
version} 1``; the digest covers the effective configuration, secrets
included (config.digest), so two front-ends with equal digests and
versions answer every lookup alike.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request

from axpolicy import __version__
from axpolicy.doctor.findings import Finding, error, unreachable

TIMEOUT_SECONDS = 10.0
MAX_BYTES = 4 * 1024 * 1024
_INFO = re.compile(r"^axpolicy_config_info\{([^}]*)\}\s+1(?:\.0)?\s*$", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def info(text: str) -> dict[str, str] | None:
    """The labels of ``axpolicy_config_info`` in a Prometheus text exposition, if present."""
    match = _INFO.search(text)
    return dict(_LABEL.findall(match[1])) if match else None


def check(peers: list[str], digest: str) -> list[Finding]:
    """One finding per peer whose configuration or version differs, or that cannot be asked."""
    findings: list[Finding] = []
    for url in peers:
        if not url.startswith(("http://", "https://")):
            findings.append(error("cluster.peer-url", url, "a peer is its metrics URL",
                                  "e.g. --peers http://mx2.example:9100/metrics"))
            continue
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:  # noqa: S310 (http/https only)
                text = response.read(MAX_BYTES).decode("utf-8", "replace")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            findings.append(unreachable("cluster.peer-unreachable", url, f"cannot read the peer's metrics: {exc}",
                                        "check that the peer runs axpolicy with metrics.listen, and any firewall"))
            continue
        labels = info(text)
        if labels is None:
            findings.append(error("cluster.peer-unknown", url, "the page has no axpolicy_config_info",
                                  "point --peers at the peer's axpolicy metrics URL (…/metrics)"))
            continue
        theirs, version = labels.get("digest", ""), labels.get("version", "")
        if theirs != digest or version != __version__:
            what = []
            if theirs != digest:
                what.append(f"configuration digest {theirs[:12]}… differs from the local {digest[:12]}…")
            if version != __version__:
                what.append(f"it runs axpolicy {version or 'of unknown version'}, this one {__version__}")
            findings.append(error("cluster.drift", url, f"peer {url}: " + "; ".join(what),
                                  "copy the same axpolicy.yml (and secrets, and the same release) to every "
                                  "front-end, then reload it (SIGHUP)"))
    return findings
