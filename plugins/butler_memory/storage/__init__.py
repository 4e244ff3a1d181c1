"""MongoDB and Redis access: ``MemoryStore`` (events, profiles, archive, quarantine, runs), the summary history,
and the per-user locks shared with the Butler's inline path.

May import ``core`` and ``llm`` (the language codes). The one place that writes our collections.
"""
