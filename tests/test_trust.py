"""A team's own CA (COCKATOO_EXTRA_CA_CERTS): requests (MLflow), aiohttp (gcsfs) and botocore
(s3fs) all trust a TLS server on loopback whose certificate that CA signed, and trust nothing
new without it. Each check runs in a fresh process, as a step or `cockatoo` does: aiohttp reads
the CAs when it is imported."""

import datetime
import ipaddress
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import error_line, run_cli

from cockatoo_lib.storage.trust import EXTRA_CA_ENV, EXTRA_CA_PEM_ENV

XML = b'<?xml version="1.0"?><ListAllMyBucketsResult><Buckets></Buckets></ListAllMyBucketsResult>'


def _certificate(subject: str, key, issuer_name, issuer_key, ca: bool):
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def private_tls(tmp_path_factory):
    """An HTTPS server on loopback whose certificate a CA of this test's own signed; the CA's PEM."""
    folder = tmp_path_factory.mktemp("tls")
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("Cockatoo test CA", ca_key, None, ca_key, ca=True)
    server_cert = _certificate("localhost", key, ca.subject, ca_key, ca=False)
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "server.pem").write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    (folder / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(XML)))
            self.end_headers()
            self.wfile.write(XML)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "server.pem", folder / "server.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"url": f"https://localhost:{server.server_address[1]}", "ca": folder / "ca.pem"}
    server.shutdown()


CLIENTS = {
    "requests (MLflow)": "import requests; assert requests.get(URL + '/api', timeout=10).status_code == 200",
    "aiohttp (gcsfs)": """
import asyncio, aiohttp
async def get():
    async with aiohttp.ClientSession() as s, s.get(URL) as r:
        assert r.status == 200
asyncio.run(get())""",
    "botocore (s3fs)": """
import botocore.config, botocore.session
client = botocore.session.get_session().create_client(
    's3', endpoint_url=URL, region_name='us-east-1', aws_access_key_id='a', aws_secret_access_key='b',
    config=botocore.config.Config(retries={'total_max_attempts': 1}))  # refused at once, not after backoff
assert client.list_buckets()['Buckets'] == []""",
}


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_every_client_trusts_the_teams_ca_and_nothing_more_without_it(private_tls, client, tmp_path):
    code = ("from cockatoo_lib.storage.trust import trust_extra_ca_certs; trust_extra_ca_certs()\n"
            f"URL = {private_tls['url']!r}\n" + CLIENTS[client])
    clean = {k: v for k, v in __import__("os").environ.items()
             if k not in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "AWS_CA_BUNDLE", "CURL_CA_BUNDLE",
                          EXTRA_CA_ENV, EXTRA_CA_PEM_ENV)}
    refused = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode != 0 and "certificate verify failed" in refused.stderr.lower() + \
        refused.stdout.lower(), refused.stderr[-2000:]
    for given in ({EXTRA_CA_ENV: str(private_tls["ca"])},  # a file, or its text from a secret
                  {EXTRA_CA_PEM_ENV: private_tls["ca"].read_text()}):
        trusted = subprocess.run([sys.executable, "-c", code], env={**clean, **given}, capture_output=True,
                                 text=True, timeout=120)
        assert trusted.returncode == 0, trusted.stderr[-3000:]


def test_a_ca_file_that_is_missing_or_not_pem_is_one_line(tmp_path, capsys, monkeypatch):
    for variable in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "AWS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(variable, raising=False)  # restored after: the call sets them
    monkeypatch.setenv(EXTRA_CA_ENV, str(tmp_path / "missing.pem"))
    code, _, err = run_cli(["plan", "-m", "minilm"], capsys, monkeypatch)
    assert code == 2 and f"{EXTRA_CA_ENV}={tmp_path / 'missing.pem'}: cannot read it" in error_line(err)
    (tmp_path / "ca.txt").write_text("not a certificate")
    monkeypatch.setenv(EXTRA_CA_ENV, str(tmp_path / "ca.txt"))
    code, _, err = run_cli(["plan", "-m", "minilm"], capsys, monkeypatch)
    assert code == 2 and "holds no PEM certificate" in error_line(err)
