"""Who is due and when: the daily and catch-up scans, the doorbell the Butler rings (and its Airflow
trigger), the per-user back-off of failing users.

May import ``core``, ``storage`` and ``fold``.
"""
