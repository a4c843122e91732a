"""Packaging entry point. Metadata lives in pyproject.toml; this file exists so that the
native (csrc/) extension can be built where a compiler and torch are present."""
from setuptools import setup

setup()
