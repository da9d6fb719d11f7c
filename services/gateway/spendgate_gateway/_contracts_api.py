"""Control-plane routes for contracts and approvals (admin token), see docs/contracts.md.

``PUT /v1/contracts?tenant=`` takes the tenant's whole rule set as YAML (``rules: [...]``)
and replaces the set in one ledger command; the ledger compiles every expression and
refuses the whole set (``400 invalid_contract``, naming the rule and position) if one is
wrong. ``GET /v1/contracts`` answers the set in force. Approvals are listed, read, and
decided (approved once, or rejected) by an operator; the agent then retries its call
with the same idempotency key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import msgspec
import yaml
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from spendgate_common.errors import InvalidRequestError
from spendgate_common.events_v1 import ContractRule
from spendgate_common.ledger_v1 import (
    AnyCommand,
    AnyResult,
    ApprovalInfo,
    ApprovalList,
    Approve,
    ContractsState,
    Done,
    Failed,
    ListApprovals,
    QueryContracts,
    Reject,
    SetContracts,
)
from spendgate_gateway._control import ControlPlane, _tenant_of, decode_body
from spendgate_gateway._failures import failed_status
from spendgate_gateway._ledger_client import LedgerClient
from spendgate_gateway._responses import error_response, json_response, read_body

# A contract file is a few dozen rules of a few lines each.
CONTRACTS_BODY_BYTES_MAX = 262_144
APPROVAL_STATUSES = frozenset({"", "pending", "approved", "rejected", "expired", "used"})
# ListApprovals answers at most this many; GET /v1/approvals/{id} searches them.
APPROVALS_LISTED_MAX = 500  # the ledger's APPROVALS_PAGE_MAX


class ContractFile(msgspec.Struct, forbid_unknown_fields=True):
    """A contract file: ``rules`` in the order they are checked."""

    rules: list[ContractRule]


class DecideApprovalRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /v1/approvals/{id}/approve`` and ``/reject``: who decides, and why."""

    by: str
    note: str = ""


class ContractsView(msgspec.Struct):
    tenant: str
    version: int
    rules: list[ContractRule]
    source_sha256: str
    set_at_ms: int


def parse_contract_file(body: bytes) -> list[ContractRule]:
    """The rules of a YAML (or JSON) contract file; ``invalid_contract`` when it is not one."""
    try:
        document = yaml.safe_load(body.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        message = f"the contract file is not YAML: {error}"
        raise InvalidRequestError("invalid_contract", message) from None
    if document is None:
        document = {"rules": []}
    try:
        return msgspec.convert(document, type=ContractFile).rules
    except msgspec.ValidationError as error:
        raise InvalidRequestError("invalid_contract", f"the contract file: {error}") from None


class ContractsApi:
    def __init__(self, control: ControlPlane, ledger: LedgerClient) -> None:
        self._control = control
        self._ledger = ledger

    async def _execute(self, command: AnyCommand) -> AnyResult | Response:
        result = await self._ledger.execute(command)
        if isinstance(result, Failed):
            return error_response(failed_status(result), result.code, result.message)
        return result

    async def put_contracts(self, request: Request) -> Response:
        self._control.check_admin(request)
        tenant = _tenant_of(request)
        body = await read_body(request, CONTRACTS_BODY_BYTES_MAX)
        rules = parse_contract_file(body)
        source_sha256 = hashlib.sha256(body).hexdigest()
        result = await self._execute(SetContracts(tenant, rules, source_sha256))
        return _contracts_response(result)

    async def get_contracts(self, request: Request) -> Response:
        self._control.check_admin(request)
        return _contracts_response(await self._execute(QueryContracts(_tenant_of(request))))

    async def list_approvals(self, request: Request) -> Response:
        self._control.check_admin(request)
        status = request.query_params.get("status", "")
        if status not in APPROVAL_STATUSES:
            raise InvalidRequestError(
                "invalid_field", f"status must be one of {sorted(APPROVAL_STATUSES - {''})}"
            )
        limit_text = request.query_params.get("limit", "100")
        if not limit_text.isdigit() or not 0 < int(limit_text) <= APPROVALS_LISTED_MAX:
            raise InvalidRequestError("invalid_limit", f"limit must be 1 to {APPROVALS_LISTED_MAX}")
        command = ListApprovals(_tenant_of(request), status=status, limit=int(limit_text))
        result = await self._execute(command)
        if isinstance(result, Response):
            return result
        assert isinstance(result, ApprovalList), result
        return json_response(200, {"approvals": result.approvals})

    async def get_approval(self, request: Request) -> Response:
        self._control.check_admin(request)
        approval = await self._find(_tenant_of(request), request.path_params["approval_id"])
        return approval if isinstance(approval, Response) else json_response(200, approval)

    async def _find(self, tenant: str, approval_id: str) -> ApprovalInfo | Response:
        result = await self._execute(ListApprovals(tenant, limit=APPROVALS_LISTED_MAX))
        if isinstance(result, Response):
            return result
        assert isinstance(result, ApprovalList), result
        for approval in result.approvals:
            if approval.approval_id == approval_id:
                return approval
        return error_response(404, "approval_not_found", "no such approval in this tenant")

    async def decide(self, request: Request, *, approve: bool) -> Response:
        self._control.check_admin(request)
        tenant = _tenant_of(request)
        approval_id = request.path_params["approval_id"]
        spec = await decode_body(request, DecideApprovalRequest)
        command: Approve | Reject = (
            Approve(tenant, approval_id, spec.by, spec.note)
            if approve
            else Reject(tenant, approval_id, spec.by, spec.note)
        )
        result = await self._execute(command)
        if isinstance(result, Response):
            return result
        if isinstance(result, ApprovalInfo):
            return json_response(200, result)
        assert isinstance(result, Done), result
        approval = await self._find(tenant, approval_id)
        return approval if isinstance(approval, Response) else json_response(200, approval)


def _contracts_response(result: AnyResult | Response) -> Response:
    if isinstance(result, Response):
        return result
    assert isinstance(result, ContractsState), result
    view = ContractsView(
        tenant=result.tenant,
        version=result.version,
        rules=result.rules,
        source_sha256=result.source_sha256,
        set_at_ms=result.set_at_ms,
    )
    return json_response(200, view)


def contracts_router(holder: Mapping[str, object]) -> APIRouter:
    """The routes; ``holder["contracts"]`` is the :class:`ContractsApi` once the app started."""
    router = APIRouter(prefix="/v1")

    def api() -> ContractsApi:
        contracts = holder.get("contracts")
        assert isinstance(contracts, ContractsApi), "lifespan has not started"
        return contracts

    @router.put("/contracts", tags=["contracts"])
    async def put_contracts(request: Request) -> Response:
        """Replace the tenant's contract set with the YAML body (``rules: [...]``)."""
        return await api().put_contracts(request)

    @router.get("/contracts", tags=["contracts"])
    async def get_contracts(request: Request) -> Response:
        """The tenant's contract set in force, its version and the uploaded file's SHA-256."""
        return await api().get_contracts(request)

    @router.get("/approvals", tags=["approvals"])
    async def list_approvals(request: Request) -> Response:
        """The tenant's approvals, newest first, optionally only one ``status``."""
        return await api().list_approvals(request)

    @router.get("/approvals/{approval_id}", tags=["approvals"])
    async def get_approval(request: Request) -> Response:
        """One approval and its status."""
        return await api().get_approval(request)

    @router.post("/approvals/{approval_id}/approve", tags=["approvals"])
    async def approve(request: Request) -> Response:
        """Approve a pending approval: the agent's retry with the same idempotency key is
        granted once (if the caps still allow it)."""
        return await api().decide(request, approve=True)

    @router.post("/approvals/{approval_id}/reject", tags=["approvals"])
    async def reject(request: Request) -> Response:
        """Reject a pending approval: the agent's retry is denied ``approval_rejected``."""
        return await api().decide(request, approve=False)

    return router
