"""Per-user operations built on the fold: ``Engine`` (the parts one task needs), rollback, re-fold, forget,
erasure, ``batch`` (the daily run through the Batch API: prepare, submit, collect, commit), and ``qualify`` (a model
measured on synthetic users, writing nothing).

May import every layer below (``core`` .. ``fold``, and ``freshness``: the engine scans as the daily run does).
Nothing here imports Airflow.
"""
