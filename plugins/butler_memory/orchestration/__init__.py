"""The Airflow glue: the batch wait's trigger, the task callables the DAG files wire (compression, erasure,
rollback/re-fold, qualify) and how they fail or read their XCom rows (``task_outcome``), Airflow connections
and hooks turned into an ``Engine``, the Celery config, the scheduler-side erasure scrub, and ``params``: each
operation's params, declared once for the DAG's trigger form and the CLI's options.

May import every layer below. The DAG files, the UI plugin and the CLI import it; nothing below does.
"""
