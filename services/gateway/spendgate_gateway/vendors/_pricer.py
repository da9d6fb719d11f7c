"""The gateway's estimate step: each vendor's estimator as the settings configure it, then
the operator's fixed costs for the calls no estimator prices (see ``_fixed.py``)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from spendgate_gateway.vendors import VENDORS
from spendgate_gateway.vendors._base import Call, Estimate, UnpricedCallError, Vendor
from spendgate_gateway.vendors.twilio import Twilio

if TYPE_CHECKING:
    from spendgate_gateway._settings import GatewaySettings


class Pricer:
    """Built once per gateway from its settings; :meth:`estimate` is pure (no I/O)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self._fixed_costs = settings.fixed_costs
        # Twilio's estimator needs the account SID (upstream paths) and the call limit.
        self._twilio = Twilio(settings.twilio)
        self._estimators: dict[str, Vendor] = {**VENDORS, "twilio": self._twilio}

    def estimate(self, vendor: Vendor, call: Call) -> Estimate:
        """The vendor's estimate of ``call``, else its fixed cost; raises as estimators do."""
        estimator = self._estimators.get(vendor.name, vendor)
        try:
            return estimator.estimate(call)
        except UnpricedCallError:
            fixed = self._fixed_costs.estimate(vendor.name, call)
            if fixed is None:
                raise
        if vendor.name == "twilio":
            fixed = dataclasses.replace(fixed, upstream_path=self._twilio.upstream_path(call.path))
        return fixed
