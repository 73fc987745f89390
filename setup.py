"""portfwd: user-space TCP/UDP port forwarders and an encrypted TCP-over-KCP tunnel, on gevent."""

import glob

from setuptools import find_packages, setup

setup(
    name="portfwd",
    version="0.1.0",
    description="TCP/UDP port forwarders and an encrypted TCP-over-KCP tunnel on gevent",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["portfwd", "portfwd.*"]),
    # Each bin/ script is a few lines calling portfwd.<tool>.main().
    scripts=sorted(glob.glob("bin/*")),
    install_requires=["gevent>=23.9", "cryptography>=41", "docopt-ng>=0.9"],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "pycryptodome>=3.18", "kcp>=0.1.6", "ruff"],
        "bench": ["matplotlib"],
    },
)
