"""Read one user's memory in a tight loop (the consistency test's other process).

Usage: ``python tests/engine/client_reader.py '<json>'`` with keys ``mongo_uri``, ``db``, ``user_id``,
``settings`` (a Settings mapping), ``out`` (a file: one JSON line a read), ``stop``, ``arrived`` and
``forgot`` (marker files). Each line: ``arrived`` and ``forgot`` (whether that marker existed *before*
the read began),
``version``, ``summary`` (the summary's words: a ``chain_responder`` ledger of event ids), ``raw``
(the raw events' ``_id``s), ``erasing``, or ``error`` (the exception type) when a read failed.
Runs until the ``stop`` file exists. Needs ``plugins/`` on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import sys

import pymongo

from butler_memory.client import MemoryClient
from butler_memory.core.errors import CompressionError
from butler_memory.core.settings import Settings


def main(argv: list[str]) -> int:
    """Read until told to stop; write one line a read."""
    config = json.loads(argv[1])
    client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(config["mongo_uri"])
    reader = MemoryClient(client[config["db"]], settings=Settings.from_mapping(config["settings"]))
    with open(config["out"], "a", encoding="utf-8") as out:
        while not os.path.exists(config["stop"]):
            forgot, arrived = os.path.exists(config["forgot"]), os.path.exists(config["arrived"])
            try:
                memory = reader.memory(config["user_id"])
            except CompressionError as exc:
                line: dict[str, object] = {"forgot": forgot, "arrived": arrived, "error": type(exc).__name__}
            else:
                line = {
                    "forgot": forgot,
                    "arrived": arrived,
                    "version": memory.version,
                    "summary": memory.summary.split(),
                    "raw": [str(ev.id) for ev in memory.events],
                    "erasing": memory.erasing,
                }
            out.write(json.dumps(line) + "\n")
            out.flush()
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
