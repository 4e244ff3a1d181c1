"""The vocabulary every layer shares: settings, errors, units, run keys.

Imports nothing of ours. Everything else may import it.
"""
