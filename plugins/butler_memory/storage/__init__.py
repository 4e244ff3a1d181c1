"""MongoDB and Redis access: ``MemoryStore`` (``store``) composed of one module per collection
(``events`` with the quarantine, ``profiles``, ``archive``, ``run_docs``) over the typed base and
helpers of ``mongo``; the summary history; the per-user locks shared with the Butler's inline path;
the doorbell's Redis key names.

May import ``core`` and ``llm`` (the language codes). The one place that writes our collections.
"""
