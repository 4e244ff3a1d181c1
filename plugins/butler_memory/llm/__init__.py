"""The LLM side: the ``Summarizer`` protocol, the prompt, token counting and budgets, the OpenAI-compatible client
and the offline summariser.

May import ``core``. Knows nothing of MongoDB, Redis or Airflow.
"""
