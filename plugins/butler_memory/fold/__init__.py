"""The one compression path: read a user's older events, propose a summary through the LLM, guard it, commit
it crash-safely (``rebuild``), then archive and delete; its StatsD metrics and the run report.

May import ``core``, ``llm``, ``safety`` and ``storage``. Never imports the operations built on it.
"""
