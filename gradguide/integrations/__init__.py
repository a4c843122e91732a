"""Adapters to other libraries. Each submodule imports its library only when it is imported."""
