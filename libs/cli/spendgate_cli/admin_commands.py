"""``spendgate contracts ...`` and ``spendgate approvals ...``: the gateway's contracts
and approvals API (docs/contracts.md) from a shell, with the admin token.

Every command is one HTTP request to ``--gateway-url`` with ``Authorization: Bearer
$SPENDGATE_ADMIN_TOKEN``. Exit codes: 0 done, 1 the gateway refused (its code and message
on stderr), 2 the gateway could not be reached or the admin token is not set.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from spendgate_common.money import format_usd
from spendgate_common.settings import Env

GATEWAY_URL_DEFAULT = "http://127.0.0.1:8080"
REQUEST_TIMEOUT = timedelta(seconds=30)
APPROVAL_STATUSES = ("pending", "approved", "rejected", "expired", "used")
APPROVALS_LISTED_MAX = 500  # the gateway's bound of one list

_AUTH_HELP = (
    "The admin token is read from SPENDGATE_ADMIN_TOKEN; the gateway from --gateway-url "
    f"(default: {GATEWAY_URL_DEFAULT})."
)


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``contracts`` and ``approvals`` on the ``spendgate`` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--gateway-url", default=GATEWAY_URL_DEFAULT, help=f"default: {GATEWAY_URL_DEFAULT}"
    )
    common.add_argument("--tenant", default="default", help="the tenant (default: default)")

    contracts = commands.add_parser(
        "contracts",
        help="upload or show the tenant's contract rules (stop, require_approval, degrade)",
        description="Contracts: a tenant's rules over every reserve (docs/contracts.md). "
        + _AUTH_HELP,
    )
    contract_commands = contracts.add_subparsers(dest="contracts_command", metavar="ACTION")
    contract_commands.required = True
    upload = contract_commands.add_parser(
        "upload",
        parents=[common],
        help="replace the tenant's rules with a YAML file",
        description=(
            "Upload FILE (YAML: 'rules: [...]') as the tenant's whole contract set. A rule "
            "that does not compile refuses the whole file (exit 1, naming the rule). " + _AUTH_HELP
        ),
    )
    upload.add_argument("file", type=Path, metavar="FILE", help="the contract file (YAML)")
    upload.set_defaults(run=_contracts_upload)
    show = contract_commands.add_parser(
        "show",
        parents=[common],
        help="print the rules in force (JSON)",
        description="Print the tenant's contract set in force, its version and the SHA-256 "
        "of the uploaded file, as JSON. " + _AUTH_HELP,
    )
    show.set_defaults(run=_contracts_show)

    approvals = commands.add_parser(
        "approvals",
        help="list, approve or reject the approvals contracts ask for",
        description="Approvals: reserves a require_approval rule holds until an operator "
        "decides. The agent retries with the same idempotency key once approved. " + _AUTH_HELP,
    )
    approval_commands = approvals.add_subparsers(dest="approvals_command", metavar="ACTION")
    approval_commands.required = True
    listing = approval_commands.add_parser(
        "list",
        parents=[common],
        help="list approvals, newest first",
        description="List the tenant's approvals, newest first (a table, or --json). " + _AUTH_HELP,
    )
    listing.add_argument("--status", choices=APPROVAL_STATUSES, default=None, help="only these")
    listing.add_argument(
        "--limit", type=int, default=100, help=f"at most this many (1 to {APPROVALS_LISTED_MAX})"
    )
    listing.add_argument("--json", action="store_true", help="print the gateway's JSON")
    listing.set_defaults(run=_approvals_list)
    for verb, effect in (
        ("approve", "the agent's retry with the same idempotency key is granted once"),
        ("reject", "the agent's retry is refused with approval_rejected"),
    ):
        decide = approval_commands.add_parser(
            verb,
            parents=[common],
            help=f"{verb} a pending approval",
            description=f"{verb.capitalize()} approval ID: {effect}. Prints the approval "
            "as JSON. " + _AUTH_HELP,
        )
        decide.add_argument("approval_id", metavar="ID", help="the approval id (apr_...)")
        decide.add_argument("--by", required=True, help="who decides (recorded and audited)")
        decide.add_argument("--note", default="", help="why (recorded)")
        decide.set_defaults(run=_approvals_decide, approve=verb == "approve")


def _contracts_upload(args: argparse.Namespace) -> int:
    try:
        source = args.file.read_bytes()
    except OSError as error:
        print(f"spendgate contracts upload: cannot read {args.file}: {error}", file=sys.stderr)
        return 2
    answer = _request(args, "PUT", "/v1/contracts", content=source)
    if answer is None:
        return 1
    print(f"contracts version {answer['version']} in force for tenant {answer['tenant']}:")
    for rule in answer["rules"]:
        print(f"  {rule['name']}: {rule['decision']}")
    return 0


def _contracts_show(args: argparse.Namespace) -> int:
    answer = _request(args, "GET", "/v1/contracts")
    if answer is None:
        return 1
    print(json.dumps(answer, indent=2))
    return 0


def _approvals_list(args: argparse.Namespace) -> int:
    if not 0 < args.limit <= APPROVALS_LISTED_MAX:
        print(f"--limit must be 1 to {APPROVALS_LISTED_MAX}", file=sys.stderr)
        return 2
    params = {"limit": str(args.limit)}
    if args.status is not None:
        params["status"] = args.status
    answer = _request(args, "GET", "/v1/approvals", params=params)
    if answer is None:
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    rows = [("ID", "STATUS", "AMOUNT_USD", "VENDOR", "KEY_LABEL", "CONTRACT", "DECIDED_BY")]
    for item in answer["approvals"]:
        rows.append(
            (
                item["approval_id"],
                item["status"],
                format_usd(item["amount_micros"]),
                item["vendor"],
                item["label"],
                item["contract"],
                item.get("decided_by", ""),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    return 0


def _approvals_decide(args: argparse.Namespace) -> int:
    verb = "approve" if args.approve else "reject"
    body = {"by": args.by, "note": args.note}
    answer = _request(args, "POST", f"/v1/approvals/{args.approval_id}/{verb}", json_body=body)
    if answer is None:
        return 1
    print(json.dumps(answer, indent=2))
    return 0


def _request(
    args: argparse.Namespace,
    method: str,
    path: str,
    *,
    content: bytes | None = None,
    json_body: object = None,
    params: dict[str, str] | None = None,
) -> dict[str, Any] | None:
    """The gateway's JSON answer; ``None`` (after printing why) when it refused.
    Exits 2 when the gateway cannot be reached or the token is not set."""
    import httpx  # here, so that 'spendgate --help' does not load it

    token = Env().optional_text("SPENDGATE_ADMIN_TOKEN")
    if token is None:
        sys.exit("spendgate: set SPENDGATE_ADMIN_TOKEN to the gateway's admin token")
    try:
        response = httpx.request(
            method,
            f"{args.gateway_url.rstrip('/')}{path}",
            params={"tenant": args.tenant, **(params or {})},
            headers={"authorization": f"Bearer {token}"},
            content=content,
            json=json_body,
            timeout=REQUEST_TIMEOUT.total_seconds(),
        )
    except httpx.HTTPError as error:
        sys.exit(f"spendgate: the gateway at {args.gateway_url} did not answer: {error}")
    try:
        answer: dict[str, Any] = response.json()
    except ValueError:
        answer = {"code": f"http_{response.status_code}", "message": response.text[:500]}
    if response.status_code >= 300:
        code, message = answer.get("code", "error"), answer.get("message", "")
        print(f"spendgate: {response.status_code} {code}: {message}", file=sys.stderr)
        return None
    return answer
