"""An http(s) image URL to its bytes, under the operator's fetch policy.

Invariant: a fetch connects only to an address that it resolved itself and that the policy
allows, on every hop (redirects included), and tells the client nothing about the network behind
the server.

Each hop must be http(s), name a host in `allowed_domains` (when set), and resolve to addresses
that `networks` allows (pyllama4.multimodal.addresses), all of them: one refused address refuses
the hop. The name is resolved once, here (anyio.getaddrinfo, in a worker thread), and the
connection goes to a checked address by IP, with the original Host header and, for https, the
original name as the TLS server name (httpx's `sni_hostname`), so the certificate is still
verified against the name. Nothing resolves the name again between the check and the connect, so
DNS rebinding cannot swap in another address. No connection is kept alive for a later hop:
connections are pooled by IP, and one verified for a name must not serve another. Proxy settings
and .netrc credentials from the environment are not used (a proxy would connect to addresses
this check never saw); SSL_CERT_FILE and SSL_CERT_DIR are, as httpx uses them.

What the client may learn is what the server's own configuration decides: that a URL is
malformed, that its host is not in `--allowed-media-domains`, that a body is over the size cap
(and, from the decoder, that a fetched image does not decode). Every other failure (the address
policy, a DNS error, a refused or timed-out connection, an HTTP error status, a body not
declared an image, a bad redirect) is the one message "could not fetch the image from <URL>";
the reason goes to the "pyllama4.multimodal" log at INFO.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import ssl
from dataclasses import dataclass
from ipaddress import ip_address

import anyio
import anyio.to_thread
import certifi
import httpx

from pyllama4.multimodal.addresses import IPAddress, Networks, refusal

MAX_REDIRECTS = 5
# Accept-Encoding identity: Content-Length and the streamed byte count are then the image's own
# size, and no compressed body can inflate past the limit in one chunk.
_HEADERS = {"User-Agent": "pyllama4", "Accept-Encoding": "identity"}
_DEFAULT_PORTS = {"http": 80, "https": 443}
# No keep-alive: connections are pooled by IP, and one verified for a name must not serve another.
_ONE_CONNECTION_PER_HOP = httpx.Limits(max_keepalive_connections=0)

log = logging.getLogger("pyllama4.multimodal")


class FetchError(ValueError):
    """The image cannot be fetched; str(e) is a message fit for a 400 response."""


class BodyTooLarge(Exception):
    """The response body is over the byte limit."""


class _Failed(Exception):
    """A failure the client is not told the reason for; str(e) is the reason, for the log."""


@dataclass(frozen=True)
class FetchPolicy:
    timeout: float  # seconds for the whole fetch: every hop's resolve, connect and body
    max_bytes: int  # the most body bytes read
    allowed_domains: frozenset[str] | None  # None: any host; else these hosts only (exact)
    networks: Networks  # the addresses a connection may go to


def short(text: str, limit: int = 100) -> str:
    """`text`, cut to `limit` characters (with "...") for an error message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def fetch(url: str, policy: FetchPolicy) -> bytes:
    """The body of the image at `url`; FetchError or BodyTooLarge when there is none to use."""
    shown = short(url)
    try:
        target = httpx.URL(url)
    except httpx.InvalidURL:
        raise FetchError(f"the image URL {shown} is not a valid URL") from None
    problem = _hop_problem(target, policy.allowed_domains)
    if problem is not None:
        raise FetchError(f"the image URL {shown} {problem}")
    try:
        with anyio.fail_after(policy.timeout):
            return await _follow(target, policy)
    except (_Failed, httpx.HTTPError, httpx.InvalidURL, OSError) as e:
        reason = f"timed out after {policy.timeout:g} s" if isinstance(e, TimeoutError) else e
        log.info("could not fetch the image from %s: %s", short(url, 300), reason)
        raise FetchError(f"could not fetch the image from {shown}") from None


def _hop_problem(url: httpx.URL, allowed_domains: frozenset[str] | None) -> str | None:
    """What is wrong with fetching `url` before any network access, or None."""
    if url.scheme not in _DEFAULT_PORTS or not url.raw_host:
        return "is not an http(s) URL with a host"
    if allowed_domains is not None and _host_key(url.raw_host.decode("ascii")) not in {
        _host_key(host) for host in allowed_domains
    }:
        return "names a host this server does not fetch from (--allowed-media-domains)"
    return None


def _host_key(host: str) -> str:
    """`host` spelled as a URL's raw host is: lowercase, IDNA, no brackets or final dot."""
    host = host.strip().strip("[]").rstrip(".").lower()
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:  # not a valid name: it matches no URL's host
        return host


@functools.cache
def _tls_context(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    """The CAs httpx would trust: SSL_CERT_FILE, else SSL_CERT_DIR, else certifi's bundle."""
    if cafile or capath:
        return ssl.create_default_context(cafile=cafile or None, capath=None if cafile else capath)
    return ssl.create_default_context(cafile=certifi.where())


async def _follow(url: httpx.URL, policy: FetchPolicy) -> bytes:
    ca = (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    tls = await anyio.to_thread.run_sync(_tls_context, *ca)  # loads a CA bundle the first time
    async with httpx.AsyncClient(
        headers=_HEADERS,
        timeout=None,
        verify=tls,
        trust_env=False,
        limits=_ONE_CONNECTION_PER_HOP,
    ) as client:
        for hop in range(MAX_REDIRECTS + 1):
            problem = _hop_problem(url, policy.allowed_domains) if hop else None
            if problem is not None:
                raise _Failed(f"redirected to {short(str(url))}, which {problem}")
            addresses = await _resolve(url, policy.networks)
            response = await _connect(client, url, addresses)
            try:
                if not response.is_redirect:
                    return await _read_body(response, policy.max_bytes)
                url = url.join(response.headers["location"])
            finally:
                await response.aclose()
    raise _Failed(f"redirected more than {MAX_REDIRECTS} times")


async def _resolve(url: httpx.URL, networks: Networks) -> list[IPAddress]:
    """Every address `url`'s host resolves to; _Failed when `networks` refuses any of them."""
    host = url.raw_host.decode("ascii")
    port = url.port or _DEFAULT_PORTS[url.scheme]
    try:
        found = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise _Failed(f"cannot resolve {host}: {e}") from None
    addresses = list(dict.fromkeys(ip_address(str(info[4][0]).split("%")[0]) for info in found))
    if not addresses:
        raise _Failed(f"{host} resolves to no address")
    for address in addresses:
        why = refusal(address, networks)
        if why is not None:
            raise _Failed(f"{host} resolves to {address}, refused ({why}; --image-fetch-networks)")
    return addresses


async def _connect(
    client: httpx.AsyncClient, url: httpx.URL, addresses: list[IPAddress]
) -> httpx.Response:
    """The streamed response to GET `url` from the first of `addresses` that takes a connection."""
    host = url.raw_host.decode("ascii")
    headers = {"Host": url.netloc.decode("ascii")}
    extensions = {} if _is_ip(host) else {"sni_hostname": host}

    def request(address: IPAddress) -> httpx.Request:
        at = url.copy_with(host=str(address))
        return client.build_request("GET", at, headers=headers, extensions=extensions)

    for address in addresses[:-1]:
        try:
            return await client.send(request(address), stream=True)
        except httpx.ConnectError as e:
            log.debug("image fetch: no connection to %s at %s: %s", host, address, e)
    return await client.send(request(addresses[-1]), stream=True)


def _is_ip(host: str) -> bool:
    try:
        ip_address(host)
    except ValueError:
        return False
    return True


async def _read_body(response: httpx.Response, max_bytes: int) -> bytes:
    if not response.is_success:
        raise _Failed(f"HTTP {response.status_code}")
    content_type = response.headers.get("content-type", "")
    if not content_type.split(";")[0].strip().lower().startswith("image/"):
        raise _Failed(f"not an image (Content-Type: {short(content_type, 60) or 'none'})")
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise BodyTooLarge
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise BodyTooLarge
    return bytes(body)
