"""The Ray build service's refusals and the plain values its nodes answer with.

No cluster here (tests/integration/test_ray_cluster.py builds on a real
one): what a ray:// address, its options and a node's outcome mean.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.cluster.node import outcome_of, raise_outcome
from stages.cluster.service import RayBuildService, open_ray_build_service
from stages.errors import BuildFailed, RequestError, RuncError, ServiceError, SpecError
from stages.service import open_build_service

STORE = "grpc+http://127.0.0.1:1"


@pytest.mark.parametrize("address", ["ray://", "ray:///path", "ray://host:1/x", "rays://auto"])
def test_malformed_ray_addresses_are_refused(address: str) -> None:
    with pytest.raises(ServiceError, match="ray://auto or ray://HOST:PORT"):
        RayBuildService(address, blob_address=STORE, directory_address=STORE)


def test_a_store_every_node_reaches_is_required() -> None:
    with pytest.raises(ServiceError, match="--blob-service-addr and --directory-service-addr"):
        RayBuildService("ray://auto", blob_address=None, directory_address=STORE)
    with pytest.raises(ServiceError, match="lives in this process"):
        RayBuildService("ray://auto", blob_address="memory://", directory_address=STORE)


def test_ray_addresses_open_through_the_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOB_SERVICE_ADDR", STORE)
    monkeypatch.setenv("DIRECTORY_SERVICE_ADDR", STORE)
    service = open_build_service("ray://auto")
    assert isinstance(service, RayBuildService)
    assert service.ray_address == "auto"
    assert open_ray_build_service("ray://10.0.0.1:10001").ray_address == "ray://10.0.0.1:10001"
    with pytest.raises(ServiceError, match="does not take: jobs"):
        open_build_service("ray://auto", jobs=3)


def test_grpc_clients_refuse_the_servers_options() -> None:
    with pytest.raises(ServiceError, match="set on the server"):
        open_build_service("grpc+http://127.0.0.1:1", jobs=2)


def test_outcomes_round_trip_as_the_same_errors() -> None:
    refusal = BuildFailed("k", "refused", stage="validate")
    refusal.__cause__ = RequestError("inputs[0]", "input-in-store", "not in the store")
    kind, fields = outcome_of(refusal)
    assert kind == "request"
    with pytest.raises(RequestError) as got:
        raise_outcome(kind, fields, "ray node abc")
    assert (got.value.field, got.value.rule) == ("inputs[0]", "input-in-store")
    assert "not in the store (ray node abc)" in str(got.value)

    spec = BuildFailed("k", "bad env", stage="spec")
    spec.__cause__ = SpecError("environment_vars[0]", "env-nul", "NUL in a value")
    assert outcome_of(spec)[0] == "request"

    failed = BuildFailed("key1", "exit code 3", stage="run", run_dir=Path("/x/runs/r1"))
    failed.__cause__ = RuncError("c1", "exit code 3", exit_code=3)
    kind, fields = outcome_of(failed)
    assert (kind, fields["exit_code"], fields["stage"]) == ("build-failed", 3, "run")
    with pytest.raises(BuildFailed) as lost:
        raise_outcome(kind, fields, "ray node abc")
    assert lost.value.stage == "run" and lost.value.key == "key1"
    assert lost.value.message == "exit code 3 (ray node abc)"

    kind, fields = outcome_of(ServiceError("oci:///s", "store down"))
    with pytest.raises(ServiceError, match="store down"):
        raise_outcome(kind, fields, "ray node abc")
