"""The server's image URL fetches against a real HTTP server on loopback: which hosts, which
addresses, no redirects, one deadline and a byte limit per download."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cockatoo_lib.serving.image_urls import FetchRefused, HostPolicy, fetch_image
from cockatoo_lib.serving.server import parse_v1
from cockatoo_lib.serving.settings import ServeSettings

BODY = b"\x89PNG fake image bytes"


@pytest.fixture(scope="module")
def origin():
    """/image: 200; /redirect: 302 to /internal; /big: 2 MB; /slow: a byte every 0.2 s for 5 s;
    /liar: a Content-Length of 1 GB. `hits` records every path asked for."""
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/internal")
                self.end_headers()
                return
            if self.path == "/slow":
                self.send_response(200)
                self.end_headers()
                for _ in range(25):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
                return
            body = {"/image": BODY, "/internal": b"secret", "/big": b"x" * 2_000_000}.get(self.path)
            self.send_response(200 if body is not None or self.path == "/liar" else 404)
            self.send_header("Content-Length", str(10**9 if self.path == "/liar" else len(body or b"")))
            self.end_headers()
            try:
                self.wfile.write(body or b"")
            except BrokenPipeError:  # the /big body: the client stops reading at its byte cap
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"port": server.server_address[1], "hits": hits}
    server.shutdown()


def _fetch(url, hosts, timeout_s=5.0, max_bytes=1_000_000):
    return fetch_image(url, HostPolicy(hosts), timeout_s, max_bytes)


def test_a_host_named_exactly_is_fetched_even_at_a_loopback_address(origin):
    assert _fetch(f"http://127.0.0.1:{origin['port']}/image", "127.0.0.1") == BODY
    assert _fetch(f"http://localhost:{origin['port']}/image", "cdn.example.com, localhost") == BODY


@pytest.mark.parametrize("url, hosts, why", [
    ("http://127.0.0.1:{port}/image", "", "is not in --image-url-hosts"),
    ("http://127.0.0.1:{port}/image", "localhost", "is not in --image-url-hosts"),
    # "*" is any public host: loopback, the cloud metadata server and private ranges are not.
    ("http://127.0.0.1:{port}/image", "*", "resolves to 127.0.0.1, not a public address"),
    ("http://localhost:{port}/image", "*", "not a public address"),
    ("http://169.254.169.254/computeMetadata/v1/", "*", "resolves to 169.254.169.254, not a public address"),
    ("http://10.0.0.7/image", "*", "not a public address"),
    ("http://[::1]:{port}/image", "*", "not a public address"),
    ("http://127.0.0.1.nip.io.example.com.evil.test/x", "*.example.com", "is not in --image-url-hosts"),
    ("http://evilexample.com/x", "*.example.com", "is not in --image-url-hosts"),
    ("ftp://127.0.0.1/image", "*", "not an http(s) URL"),
    ("http://user:pw@127.0.0.1:{port}/image", "127.0.0.1", "credentials in the URL"),
])
def test_a_host_or_address_not_allowed_is_never_asked(origin, url, hosts, why):
    before = len(origin["hits"])
    with pytest.raises(FetchRefused, match=why.replace("(", r"\(").replace(")", r"\)")):
        _fetch(url.format(port=origin["port"]), hosts)
    assert len(origin["hits"]) == before


def test_a_domain_pattern_allows_its_hosts_at_public_addresses_only():
    policy = HostPolicy("*.example.com")
    assert policy.enabled and policy.public_only("img.example.com")
    assert not HostPolicy("").enabled


def test_a_redirect_is_not_followed(origin):
    with pytest.raises(FetchRefused, match="HTTP 302"):
        _fetch(f"http://127.0.0.1:{origin['port']}/redirect", "127.0.0.1")
    assert "/internal" not in origin["hits"]


@pytest.mark.parametrize("path, why", [("/big", "over 1000000 bytes"),
                                       ("/liar", "Content-Length 1000000000 is over 1000000 bytes"),
                                       ("/missing", "HTTP 404")])
def test_a_download_over_the_byte_limit_or_not_200_is_refused(origin, path, why):
    with pytest.raises(FetchRefused, match=why):
        _fetch(f"http://127.0.0.1:{origin['port']}{path}", "127.0.0.1")


def test_a_download_that_trickles_stops_at_its_deadline(origin):
    start = time.monotonic()
    with pytest.raises(FetchRefused, match="ran past its deadline|timed out"):
        _fetch(f"http://127.0.0.1:{origin['port']}/slow", "127.0.0.1", timeout_s=1.0)
    assert time.monotonic() - start < 2.0  # each byte came within the per-read timeout


def test_image_urls_are_off_unless_the_server_names_hosts():
    body = {"instances": [{"text": "look", "image": "http://images.example.com/a.jpg"}]}
    with pytest.raises(Exception, match=r"instances\[0\].image: image URLs are off on this server"):
        parse_v1(body, ServeSettings(), reads_images=True)
    allowed = ServeSettings(image_url_hosts="images.example.com")
    assert parse_v1(body, allowed, reads_images=True)[0].image == "http://images.example.com/a.jpg"
    with pytest.raises(Exception, match="this model reads text only"):
        parse_v1(body, ServeSettings(), reads_images=False)
