"""Checks on a proposed summary before it may be committed: the guards (``guards``: facts, language,
injection; reading the facts in ``facts``, measuring the language in ``language``), the
prompt-injection patterns (``injection``), the validation of replies.

May import ``core`` and ``llm``.
"""
