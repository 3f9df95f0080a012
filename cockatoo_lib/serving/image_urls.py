"""Image URLs in requests to `cockatoo serve`: off unless the operator names the hosts.

A URL in a request asks this pod to make a request of its own, from inside the cluster. So:
- only hosts named in `--image-url-hosts` are fetched: exact names, `*.example.com` for a
  domain's hosts, `*` for any public host;
- the name is resolved once, and unless the host is named exactly, every address it resolves
  to must be public: not loopback, private, link-local (the cloud metadata server at
  169.254.169.254), shared, reserved or multicast. The connection goes to that checked address
  (a second DNS answer cannot point elsewhere), with TLS verified against the name;
- redirects are not followed; a download has one deadline in all and a byte limit;
- every refused or failed fetch gets the same message: a caller cannot tell a closed port from
  a 403 and so map the network. The server's log says why.
"""

from __future__ import annotations

import ipaddress
import socket
import time
import urllib.parse

REFUSED = ("image URL not fetched: its host is not allowed here, or it did not answer 200 with an image "
           "within the time and size limits; send the image inline as {\"b64\": DATA} instead")
CHUNK = 64 * 1024


class FetchRefused(Exception):
    """Why a URL was not fetched: for the server's log, never for the caller."""


class HostPolicy:
    """Which hosts may be fetched from: `hosts` as `--image-url-hosts` gives them, comma-separated."""

    def __init__(self, hosts: str):
        names = [h.strip().lower().rstrip(".") for h in hosts.split(",") if h.strip()]
        self.any_public = "*" in names
        self.domains = tuple(h[1:] for h in names if h.startswith("*.") and len(h) > 2)  # ".example.com"
        self.exact = frozenset(h for h in names if not h.startswith("*"))

    @property
    def enabled(self) -> bool:
        return self.any_public or bool(self.domains) or bool(self.exact)

    def public_only(self, host: str) -> bool:
        """Whether `host` may be fetched from at public addresses only (False: at any address);
        FetchRefused if not at all."""
        if host in self.exact:
            return False  # named exactly: an in-cluster image service is the operator's choice
        if self.any_public or host.endswith(self.domains):
            return True
        raise FetchRefused(f"host {host} is not in --image-url-hosts")


def _public_address(host: str, port: int, public_only: bool) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchRefused(f"{host} does not resolve ({exc})") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if public_only and (bad := [a for a in addresses if not a.is_global]):
        raise FetchRefused(f"{host} resolves to {bad[0]}, not a public address")
    return str(addresses[0])


def fetch_image(url: str, policy: HostPolicy, timeout_s: float, max_bytes: int) -> bytes:
    """The body of a 200 answer to GET `url`, within `timeout_s` in all and `max_bytes`."""
    import urllib3

    deadline = time.monotonic() + timeout_s
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchRefused("not an http(s) URL with a host")
    if parts.username or parts.password:
        raise FetchRefused("credentials in the URL")
    host = parts.hostname.lower().rstrip(".")
    public_only = policy.public_only(host)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise FetchRefused("an invalid port") from None
    address = _public_address(host, port, public_only)
    timeout = urllib3.Timeout(connect=timeout_s, read=timeout_s)
    if parts.scheme == "https":
        pool = urllib3.HTTPSConnectionPool(address, port, timeout=timeout, retries=False, maxsize=1,
                                           server_hostname=host, assert_hostname=host,
                                           cert_reqs="CERT_REQUIRED")
    else:
        pool = urllib3.HTTPConnectionPool(address, port, timeout=timeout, retries=False, maxsize=1)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    try:
        with pool:
            response = pool.urlopen("GET", target, headers={"Host": netloc, "Accept": "image/*",
                                                            "User-Agent": "cockatoo-serve"},
                                    redirect=False, retries=False, preload_content=False,
                                    assert_same_host=False)
            try:
                return _read(response, deadline, max_bytes)
            finally:
                response.release_conn()
    except urllib3.exceptions.HTTPError as exc:
        raise FetchRefused(f"{type(exc).__name__}: {exc}") from None
    except OSError as exc:
        raise FetchRefused(f"{type(exc).__name__}: {exc}") from None


def _read(response, deadline: float, max_bytes: int) -> bytes:
    if response.status != 200:
        raise FetchRefused(f"HTTP {response.status}")
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise FetchRefused(f"Content-Length {declared} is over {max_bytes} bytes")
    body = bytearray()
    sock = getattr(response.connection, "sock", None)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise FetchRefused("the download ran past its deadline")
        if sock is not None:
            sock.settimeout(left)  # no single read may outlast the whole download's deadline
        chunk = response.read1(CHUNK)
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > max_bytes:
            raise FetchRefused(f"over {max_bytes} bytes")
