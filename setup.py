"""Build the native layer (vmem/_native, cffi API mode) with the package; metadata is in pyproject.toml."""
from setuptools import setup

setup(cffi_modules=["vmem/_native/build.py:ffibuilder"])
