"""Who may do what: the roles, the rule per RPC, and the rule per effect.

Entry points are checked by the interceptor (``METHOD_ROLES``). Effects are checked where
they are caused (``require_effect``): an RPC whose work can delete training data (a scan
that mitigates) needs the role of that effect, whichever entry point it came through.
"""

from __future__ import annotations

from expunge.server.errors import PermissionDenied

ROLES = ("admin", "forget", "scan", "read")
# The actor of a call made with authentication off (loopback development, tests).
UNAUTHENTICATED_ACTOR = "local"

# Which roles may call which method; admin may call everything.
METHOD_ROLES: dict[str, frozenset[str]] = {
    "ListModels": frozenset({"read", "forget", "scan"}),
    "GetModel": frozenset({"read", "forget", "scan"}),
    "ListVersions": frozenset({"read", "forget", "scan"}),
    "Predict": frozenset({"read", "scan"}),
    "ExportModel": frozenset(),
    "RollbackModel": frozenset(),
    "Forget": frozenset({"forget"}),
    "GetOperation": frozenset({"forget"}),
    "WatchOperation": frozenset({"forget"}),
    "CancelOperation": frozenset({"forget"}),
    "ListOperations": frozenset({"forget"}),
    "RetrainModel": frozenset({"forget"}),
    "Scan": frozenset({"scan"}),
    "EstimateScan": frozenset({"scan"}),
    "Neighbors": frozenset({"scan"}),
    "ListAudit": frozenset(),
    "ImportModel": frozenset(),
}

# Which roles may cause which effect, through any RPC; admin may cause everything.
EFFECT_ROLES: dict[str, frozenset[str]] = {
    "forget": frozenset({"forget"}),
    "retrain": frozenset({"forget"}),
}


def actor_name(role: str, token_digest_prefix: str) -> str:
    """How calls are attributed in the audit log: ``role:digest-prefix``."""
    return f"{role}:{token_digest_prefix}"


def role_of(actor: str) -> str | None:
    """The role in an actor name; None for an unauthenticated (local) actor."""
    role, sep, _ = actor.partition(":")
    return role if sep else None


def require_effect(effect: str, actor: str) -> None:
    """Raise ``PermissionDenied`` unless ``actor`` may cause ``effect``.

    With authentication off every caller is local and trusted, as for entry points.
    """
    role = role_of(actor)
    if role is None or role == "admin" or role in EFFECT_ROLES[effect]:
        return
    allowed = sorted(EFFECT_ROLES[effect] | {"admin"})
    raise PermissionDenied(f"role '{role}' may not cause a {effect}; it needs one of {allowed}")
