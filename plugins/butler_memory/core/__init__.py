"""The vocabulary every layer shares: settings, errors, units, run keys, what a user id is.

Imports nothing of ours. Everything else may import it.
"""
