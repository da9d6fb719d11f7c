"""Schemathesis against the gateway's own OpenAPI document, on a real stack: no operation
answers a 5xx, whatever it is sent, and every control-plane answer has the declared shape.

Every operation of the document runs, except the proxy route ``/{vendor}/{path}``: it
forwards to vendors, and its documented 503 ``vendor_not_configured`` (a vendor without
an upstream key in the test stack) is a 5xx by design. Each operation gets positive
cases (valid by the schema) and negative ones (violating it), with the admin token, or
with a vault key for ``/v1/reservations``; once with generated path parameters and once
with ids that exist (a key, a budget, a run, open reservations), so the successful paths
run too. Examples are few per operation and shrinking is off, so the run stays short.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance

from tests.harness import Stack

pytestmark = pytest.mark.e2e

EXAMPLES_PER_OPERATION = 25
_SETTINGS = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    database=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


def _seed(stack: Stack) -> tuple[str, dict[str, str]]:
    """A vault key with room for the reservation routes, and ids that exist for the others:
    another key (the fuzzing may revoke it), a budget, a run, an open reservation."""
    admin = {"authorization": f"Bearer {stack.admin_token}"}
    with httpx.Client(base_url=stack.gateway_url, headers=admin, timeout=10) as client:
        issued = [
            client.post("/v1/keys", json={"label": "fuzz/run-1", "cap_usd": "1000"})
            for _ in range(2)
        ]
        assert all(response.status_code == 201 for response in issued), issued
        budget = client.post(
            "/v1/budgets",
            json={"budget_id": "fuzz", "scope": "fleet", "match": "fuzz/", "cap_usd": "1000"},
        )
        assert budget.status_code == 201, budget.text
    vault_key = issued[0].json()["key"]
    with httpx.Client(
        base_url=stack.gateway_url,
        headers={"authorization": f"Bearer {vault_key}"},
        timeout=10,
    ) as client:
        reserved = client.post(
            "/v1/reservations", json={"amount_usd": "0.01", "vendor": "openai", "operation": "x"}
        )
        assert reserved.status_code == 201, reserved.text
    ids = {
        "key_id": issued[1].json()["key_id"],
        "budget_id": "fuzz",
        "label": "fuzz/run-1",
        "reservation_id": reserved.json()["reservation_id"],
    }
    return vault_key, ids


def _headers(case: Any, stack: Stack, vault_key: str) -> dict[str, str]:
    token = vault_key if case.path.startswith("/v1/reservations") else stack.admin_token
    return {"authorization": f"Bearer {token}"}


def _run(
    operation: Any,
    mode: GenerationMode,
    path_parameters: Mapping[str, str],
    stack: Stack,
    vault_key: str,
) -> None:
    control_plane = operation.path.startswith(
        ("/v1/keys", "/v1/budgets", "/v1/runs", "/v1/reservations")
    )
    # The document describes what the control plane answers; check that too.
    checks = [not_a_server_error, *([response_schema_conformance] if control_plane else [])]
    known = {
        name: value for name, value in path_parameters.items() if f"{{{name}}}" in operation.path
    }

    fixed = {"path_parameters": known} if known else {}
    strategy = operation.as_strategy(generation_mode=mode, **fixed)
    if mode is GenerationMode.POSITIVE:
        # The documented examples first: valid requests, so the successful paths run too.
        strategy = st.one_of(*operation.get_strategies_from_examples(**fixed), strategy)

    @_SETTINGS
    @given(case=strategy)
    def run(case: Any) -> None:
        case.call_and_validate(headers=_headers(case, stack, vault_key), checks=checks, timeout=30)

    try:
        run()
    except Unsatisfiable:
        # Nothing to make invalid: e.g. only a string path parameter, which any text fits.
        if mode is not GenerationMode.NEGATIVE:
            raise
    except Exception as error:
        error.add_note(f"operation: {operation.label} ({mode.value}, path {known or 'generated'})")
        raise


def test_no_operation_answers_a_server_error(spendgate_stack: Stack) -> None:
    stack = spendgate_stack
    vault_key, ids = _seed(stack)
    schema = schemathesis.openapi.from_url(f"{stack.gateway_url}/openapi.json").exclude(
        path_regex=r"^/\{vendor\}/"
    )
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 18, [operation.label for operation in operations]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _run(operation, mode, {}, stack, vault_key)
            if any(f"{{{name}}}" in operation.path for name in ids):
                _run(operation, mode, ids, stack, vault_key)
