"""docs/sdk.md's examples run: the reserve/commit example and the OpenAI and Anthropic
SDK recipe are executed as written against a real stack with fake OpenAI and Anthropic."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import harness
from tests.harness import ServiceFactory, Stack
from tests.test_sdk import issue_key

pytestmark = pytest.mark.e2e

SDK_DOC = Path(__file__).resolve().parent.parent / "docs" / "sdk.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", SDK_DOC.read_text("utf-8"), flags=re.DOTALL)


@pytest.fixture
def stack(service_factory: ServiceFactory, nats_url: str, database_url: str) -> Stack:
    return harness.build_stack(
        service_factory,
        nats_url=nats_url,
        database_url=database_url,
        vendors=("openai", "anthropic"),
    )


def key_state(stack: Stack, key: str) -> dict[str, Any]:
    response = httpx.get(
        f"{stack.gateway_url}/v1/keys/{key.split('_')[-2]}",
        headers={"authorization": f"Bearer {stack.admin_token}"},
        timeout=10,
    )
    state: dict[str, Any] = response.json()
    return state


def test_sdk_doc_examples_run(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks()
    reserve_example = next(block for block in blocks if "spendgate.commit(hold" in block)
    proxy_example = next(block for block in blocks if "openai.OpenAI(" in block)

    key = issue_key(stack, cap_usd="1.00", label="docs-sdk")
    monkeypatch.setenv("GATEWAY", stack.gateway_url)
    monkeypatch.setenv("KEY", key)
    exec(compile(reserve_example, "docs/sdk.md", "exec"), {})  # noqa: S102
    assert key_state(stack, key)["committed_micros"] == 251_234

    namespace: dict[str, Any] = {}
    exec(compile(proxy_example, "docs/sdk.md", "exec"), namespace)  # noqa: S102
    assert namespace["answer"].choices[0].message.content
    assert namespace["message"].content
    # The proxy settles after answering: wait until no hold is open.
    deadline = time.monotonic() + 20
    while key_state(stack, key)["reserved_micros"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert key_state(stack, key)["reserved_micros"] == 0
    assert key_state(stack, key)["committed_micros"] > 251_234
