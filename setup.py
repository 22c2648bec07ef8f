"""axpolicy: Postfix policy/socketmap/tcp_table and Exim readsocket user-map daemon."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "axpolicy" / "__init__.py").read_text()).group(1)

setup(
    name="axpolicy",
    version=VERSION,
    description="Run a stock Postfix or Exim as the SMTP front-end of a mail cluster, routed by an LDAP user map",
    long_description=(HERE / "README.rst").read_text(encoding="utf-8"),
    long_description_content_type="text/x-rst",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["axpolicy", "axpolicy.*"]),
    package_data={"axpolicy": ["py.typed"]},
    install_requires=[
        "ldap3>=2.9,<3",
        "python-daemon>=3.0",
        "PyYAML>=6.0",
        "lmdb>=1.4",
    ],
    extras_require={
        "fast": ["uvloop>=0.17"],
        "metrics": ["prometheus-client>=0.16"],
        "test": ["pytest>=7.4", "pytest-timeout>=2.1", "hypothesis>=6.80", "mypy>=1.5", "types-PyYAML"],
    },
    entry_points={"console_scripts": ["axpolicy=axpolicy.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Communications :: Email :: Mail Transport Agents",
        "Environment :: No Input/Output (Daemon)",
    ],
)
