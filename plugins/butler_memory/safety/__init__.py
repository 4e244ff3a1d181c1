"""Checks on a proposed summary before it may be committed: the facts, language and size guards, the
prompt-injection guard, the validation of replies.

May import ``core`` and ``llm``.
"""
