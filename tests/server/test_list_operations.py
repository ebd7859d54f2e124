"""ListOperations: newest first, filtered by model and state, paginated, role-checked."""

from __future__ import annotations

from typing import Any

import pytest

from expunge.client import Client, InvalidArgumentError, NotFoundError
from expunge.client.types import OPERATION_STATES, SELECTIONS


def test_lists_operations_newest_first_across_pages(server: Any, client: Client) -> None:
    owners = _owners(server)[:3]
    names = [
        client.forget("digits", owner_ids=[owner], request_id=f"list-{i}", wait=True).name
        for i, owner in enumerate(owners)
    ]
    listed = client.list_operations("digits", page_size=2)
    assert [op.name for op in listed] == list(reversed(names))
    assert all(op.state == "SUCCEEDED" and op.create_time for op in listed)
    assert [op.name for op in client.list_operations(limit=1)] == [names[-1]]


def test_filters_by_state(server: Any, client: Client) -> None:
    owner = _owners(server)[0]
    done = client.forget("digits", owner_ids=[owner], request_id="list-done", wait=True)
    assert [op.name for op in client.list_operations(states=["SUCCEEDED"])] == [done.name]
    assert client.list_operations(states=["PENDING", "RUNNING"]) == []


def test_bad_requests_are_named(client: Client) -> None:
    with pytest.raises(NotFoundError, match="nosuch"):
        client.list_operations("nosuch")
    with pytest.raises(ValueError, match="unknown operation states"):
        client.list_operations(states=["DONE"])  # type: ignore[list-item]
    from expunge.v1 import expunge_pb2 as pb

    with pytest.raises(InvalidArgumentError, match="page_token"):
        client._call(  # the raw RPC, as another client would send it
            client._stub.ListOperations, pb.ListOperationsRequest(page_token="x"), None
        )
    with pytest.raises(InvalidArgumentError, match="unknown state 42"):
        client._call(client._stub.ListOperations, pb.ListOperationsRequest(states=[42]), None)


def test_client_options_match_the_server() -> None:
    from expunge.client.types import ESTIMATORS
    from expunge.server.edge.converters import _STATES
    from expunge.server.forget.computation import OPTION_SELECTIONS
    from expunge.server.scan.settings import ESTIMATORS as SERVER_ESTIMATORS
    from expunge.v1 import expunge_pb2 as pb

    assert set(OPERATION_STATES) == {pb.Operation.State.Name(v) for v in _STATES.values()}
    assert set(SELECTIONS) == {"", *OPTION_SELECTIONS}
    assert ESTIMATORS == SERVER_ESTIMATORS


def _owners(server: Any) -> list[str]:
    return sorted({str(o) for o in server.engine.training_data("digits").owner_ids})
