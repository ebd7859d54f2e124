"""Invariants of a state directory, checked after crashes (tests, benchmarks, operators).

``check_state(store)`` returns the list of violations; an empty list means: every
referenced blob exists and matches its hash, the data shard and the sample rows agree,
no sample is both present and forgotten, versions form a chain ending at the current
one, and every finished forget is recorded exactly once.
"""

from __future__ import annotations

from expunge.server.state.blobs import sha256_hex
from expunge.server.state.store import Store
from expunge.server.state.weights import arrays_from_bytes


def check_state(store: Store) -> list[str]:
    problems: list[str] = []
    for digest in sorted(store.referenced_blobs()):
        if not store.blobs.exists(digest):
            problems.append(f"blob {digest[:12]} is referenced but missing")
        elif sha256_hex(store.blobs.path(digest).read_bytes()) != digest:
            problems.append(f"blob {digest[:12]} does not match its hash")
    for model in store.models():
        name = model.name
        versions = store.versions(name)
        numbers = [v.version for v in versions]
        if numbers != list(range(1, len(numbers) + 1)):
            problems.append(f"{name}: versions {numbers} are not a chain")
        if numbers and model.current_version not in numbers:
            problems.append(f"{name}: current version {model.current_version} does not exist")
        for v in versions[1:]:
            # After a rollback a new version's parent is the restored one, not the last.
            if not 1 <= v.parent < v.version:
                problems.append(f"{name}: version {v.version} has parent {v.parent}")
        rows = set(store.sample_ids(name))
        forgotten = store.forgotten_sample_ids(name)
        if rows & forgotten:
            problems.append(
                f"{name}: {len(rows & forgotten)} samples are both present and forgotten"
            )
        if model.num_samples != len(rows):
            problems.append(f"{name}: n = {model.num_samples} but {len(rows)} sample rows")
        if store.blobs.exists(model.train_blob):
            shard_ids = set(
                arrays_from_bytes(store.blobs.get(model.train_blob))["sample_ids"].tolist()
            )
            if shard_ids != rows:
                problems.append(
                    f"{name}: data shard and sample rows disagree on {len(shard_ids ^ rows)} ids"
                )
            if shard_ids & forgotten:
                problems.append(f"{name}: forgotten samples are still in the data shard")
        makers = [v.created_by for v in versions if v.created_by != "train"]
        if len(makers) != len(set(makers)):
            problems.append(f"{name}: a request created more than one version")
        for request in store.requests_in_state("SUCCEEDED"):
            if request.model != name or not request.result:
                continue
            # The receipt names its samples by keyed digest only (identifiers.py).
            removed = set(request.result.get("removed_sample_digests", []))
            recorded = {
                store.identifiers.digest("sample", s)
                for s in store.forgotten_sample_ids(name, request.request_id)
            }
            if removed != recorded:
                problems.append(
                    f"{name}: request {request.request_id} removed {len(removed)} but recorded {len(recorded)}"
                )
    return problems
