"""Packaging. The C++/CUDA extension is built here when torch is importable at build time
(`pip install --no-build-isolation .`); otherwise the package installs pure-Python and compiles it on first use."""
from setuptools import setup

setup()
