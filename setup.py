"""Kept for tools that still run ``setup.py``; the package metadata is in pyproject.toml."""

from setuptools import setup

setup()
