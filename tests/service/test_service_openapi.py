"""The OpenAPI document (resolvable, every status documented), /docs and /redoc offline, and a
schemathesis run over every operation: no 5xx, no answer the document does not describe."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import checks
from service_helpers import settings_for

from service.app import create_app
from service.settings import ServiceSettings

MAX_EXAMPLES = 12


def resolve(spec: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = spec
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def test_every_ref_resolves_and_every_error_is_a_problem(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    refs = set(re.findall(r'"\$ref": ?"([^"]+)"', json.dumps(spec)))
    assert "#/components/schemas/RleMask" in refs
    for ref in refs:
        resolve(spec, ref)  # a KeyError names the dangling one
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status[0] in "45":
                    assert list(response["content"]) == ["application/problem+json"], (method, path, status)


def test_the_feedback_body_and_statuses_are_described(client: TestClient) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/v1/feedback"]["post"]
    content = operation["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}
    assert content["multipart/form-data"]["schema"]["properties"]["mask"]["format"] == "binary"
    assert {"404", "408", "409", "413", "415", "422", "503"} <= set(operation["responses"])


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_their_assets_from_the_service(client: TestClient, page: str) -> None:
    html = client.get(page).text
    # Nothing from another origin: the page works without a network.
    assert not re.findall(r"""(?:src|href)=["']?(?:https?:)?//""", html), html
    assets = re.findall(r"""(?:src|href)=["']([^"']+\.(?:js|css|png))["']""", html)
    assets += re.findall(r"""url: ?['"]([^'"]+\.js)['"]""", html)
    assert any(a.endswith(".js") for a in assets), html
    for asset in assets:
        response = client.get(asset)
        assert response.status_code == 200 and len(response.content) > 1000, asset
    assert client.get("/openapi.json").status_code == 200


# The operations, known at collection from an app that is never started (the document needs no models).
_DOCUMENT = create_app(ServiceSettings()).openapi()


def _has_invalid_inputs(operation: dict[str, Any]) -> bool:
    """Whether some request is outside the document: a body, or a parameter that is not any string."""
    if "requestBody" in operation:
        return True
    for parameter in operation.get("parameters", []):
        schema = json.dumps(parameter.get("schema", {}))
        if any(
            key in schema
            for key in ('"pattern"', '"enum"', '"minimum"', '"maximum"', '"boolean"', '"number"')
        ):
            return True
    return False


OPERATIONS = [
    pytest.param(f"{method.upper()} {path}", mode, id=f"{method.upper()} {path} {mode.value}")
    for path, operations in _DOCUMENT["paths"].items()
    for method, operation in operations.items()
    for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    if mode is schemathesis.GenerationMode.POSITIVE or _has_invalid_inputs(operation)
]


@pytest.fixture(scope="module")
def api(models_dir: Path) -> Iterator[Any]:
    app = create_app(settings_for(models_dir))
    with TestClient(app):  # runs the lifespan: the models load
        yield schemathesis.openapi.from_asgi("/openapi.json", app)


def test_every_operation_is_fuzzed() -> None:
    labels = {p.values[0] for p in OPERATIONS}
    assert len(labels) == sum(len(ops) for ops in _DOCUMENT["paths"].values()) == 15, labels
    assert sum(p.values[1] is schemathesis.GenerationMode.NEGATIVE for p in OPERATIONS) >= 7


@pytest.mark.parametrize(("label", "mode"), OPERATIONS)
def test_no_operation_answers_outside_its_document(api: Any, label: str, mode: Any) -> None:
    operation = next(r.ok() for r in api.get_all_operations() if r.ok().label == label)

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    def fuzz(case: Any) -> None:
        # positive_data_acceptance is left out: a schema cannot say "a decodable PNG" or "an id served
        # in the last 15 minutes", so schema-valid bodies are rightly refused with a documented 4xx.
        case.call_and_validate(excluded_checks=[checks.positive_data_acceptance])

    fuzz()
