"""One vendor's upstream client: an ``httpx.AsyncClient``, and the proxy's way through it.

The gateway keeps one pooled httpx client per vendor, with its base URL, ``Timeout`` and
(in its transport) ``Limits``. The proxy sends through that client's transport with
:meth:`UpstreamClient.forward`, which takes the agent's call in bytes as the gateway
received it: an ``AsyncClient.send`` would first build a request object (URL parsing and
validation, header normalisation, the client's cookies, auth flow, redirect loop,
response hooks), each of which a proxy has turned off or does itself, and that was a
fifth of the gateway's CPU per call (bench/gateway, py-spy; docs/decisions.md).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from http.cookiejar import CookieJar, DefaultCookiePolicy
from urllib.parse import quote_from_bytes

import httpx

from spendgate_gateway._upstream_transport import UpstreamTransport

# Methods whose request carries a body: an empty one is sent as Content-Length: 0, as
# httpx does.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# A query string of RFC 3986 characters only (percent escapes kept); any other byte is
# escaped before it goes upstream.
_QUERY = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*")
_QUERY_SAFE = "-._~!$&'()*+,;=:@/?%"


class UpstreamClient(httpx.AsyncClient):
    """One vendor's httpx client: no cookies kept (one client serves every tenant, so a
    cookie a vendor sets for one caller must never reach another's call), no redirects
    followed (a payment API's redirect is not ours to follow with the real key), no
    proxies or certificates from the environment."""

    def __init__(
        self, base_url: str, *, transport: UpstreamTransport, timeout: httpx.Timeout
    ) -> None:
        super().__init__(
            base_url=base_url,
            transport=transport,
            timeout=timeout,
            follow_redirects=False,
            trust_env=False,
            cookies=_no_cookies(),
        )
        self._forwarding = transport
        self._timeouts = timeout.as_dict()
        # httpx keeps a base URL's path with a trailing slash.
        self._base_path = self.base_url.raw_path.rstrip(b"/")
        self._host_header = (b"host", self.base_url.netloc)
        # The client's default headers (Accept, Accept-Encoding: what httpx decodes,
        # Connection, User-Agent), as httpx sends them on each request.
        self._default_headers = tuple((name.lower(), value) for name, value in self.headers.raw)

    async def forward(
        self,
        method: str,
        path: str,
        query: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
    ) -> httpx.Response:
        """Send a proxied call under the base URL, with the client's ``Timeout``; its
        response once the head arrived (read or stream the body, then close it).

        ``path`` is a relative path of URL-safe characters (the proxy checked it),
        ``query`` the raw query string (bytes outside RFC 3986 are escaped here),
        ``headers`` lowercase names and values as they go upstream; they replace the
        client's default headers of the same name. Host and Content-Length are added
        here. Raises what httpx raises (``httpx.HTTPError`` subclasses).
        """
        target = self._base_path + b"/" + path.encode("ascii")
        if query:
            if _QUERY.fullmatch(query) is None:
                query = quote_from_bytes(query, safe=_QUERY_SAFE).encode("ascii")
            target += b"?" + query
        given = {name for name, _ in headers}
        sent = [self._host_header]
        sent.extend([header for header in self._default_headers if header[0] not in given])
        sent.extend(headers)
        if body or method in _BODY_METHODS:
            sent.append((b"content-length", b"%d" % len(body)))
        return await self._forwarding.send(
            method.encode("ascii"), target, sent, body, self._timeouts
        )


def _no_cookies() -> CookieJar:
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
