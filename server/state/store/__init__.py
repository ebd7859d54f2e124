"""The state store: the only owner of SQL (SQLite, WAL, synchronous=FULL) plus blobs.

Every write of the database is a ``Transaction`` method, and every commit a forget, a
retrain or a rollback makes is one ``Store`` method (``commit_forget``, ...), so a
reader sees what a commit writes in one place.
"""

from expunge.server.state.store.commits import ForgetCommit, JournalEntry, RetrainCommit
from expunge.server.state.store.rows import (
    ArtefactRow,
    AuditRow,
    ModelRow,
    RequestRow,
    VersionRow,
    utc_now,
)
from expunge.server.state.store.schema import FINAL_REQUEST_STATES, SCHEMA_VERSION
from expunge.server.state.store.store import Store
from expunge.server.state.store.transaction import RequestIdTaken, Transaction, VersionMoved

__all__ = [
    "FINAL_REQUEST_STATES",
    "SCHEMA_VERSION",
    "ArtefactRow",
    "AuditRow",
    "ForgetCommit",
    "JournalEntry",
    "ModelRow",
    "RequestIdTaken",
    "RequestRow",
    "RetrainCommit",
    "Store",
    "Transaction",
    "VersionMoved",
    "VersionRow",
    "utc_now",
]
