"""The "Memory compression" pages inside the Airflow UI: run history, run detail, per-user status.

``data.py`` reads MongoDB and Redis through the library and returns plain, content-free dicts;
``render.py`` turns them into HTML (the page frame, escaping and tables in ``html.py``); ``app.py`` is the FastAPI app the Airflow plugin
(``plugins/butler_memory_ui.py``) mounts behind Airflow's own authentication. Only ``app.py``
imports Airflow, and only the API server imports ``app.py``.
"""
