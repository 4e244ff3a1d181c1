"""Command line tests: python -m butler_memory against real services."""
