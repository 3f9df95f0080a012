"""A team's own certificate authority (an MLflow server, a bucket endpoint or an image host behind
a private CA): `COCKATOO_EXTRA_CA_CERTS` names a PEM file of its certificates, or
`COCKATOO_EXTRA_CA_PEM` holds them (on a cluster, from a secret: it reaches every step and a
TrainJob's nodes as the step's environment), and every client the project uses trusts them
beside the public CAs.

The clients read different settings: requests (MLflow, image URLs) REQUESTS_CA_BUNDLE, botocore
(s3fs) AWS_CA_BUNDLE, Python's default SSL context (aiohttp, so gcsfs; urllib) SSL_CERT_FILE,
and each of those replaces the public CAs rather than adding to them. So one bundle, certifi's
CAs and the team's, is written per process and named in all of them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from cockatoo_lib.errors import CockatooError

EXTRA_CA_ENV, EXTRA_CA_PEM_ENV = "COCKATOO_EXTRA_CA_CERTS", "COCKATOO_EXTRA_CA_PEM"
CA_KEY = "ca.crt"  # the key of the certificate in a `--ca-secret`
BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "AWS_CA_BUNDLE", "CURL_CA_BUNDLE")


def trust_extra_ca_certs() -> Path | None:
    """With either variable set, the bundle every client now uses; else None (nothing set)."""
    import certifi

    named, extra = os.environ.get(EXTRA_CA_ENV), os.environ.get(EXTRA_CA_PEM_ENV)
    if not (named or extra):
        return None
    where = f"{EXTRA_CA_PEM_ENV} (from the CA secret)"
    if named:
        where = f"{EXTRA_CA_ENV}={named}"
        try:
            extra = Path(named).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise CockatooError(f"{where}: cannot read it ({type(exc).__name__}); mount the CA certificate "
                                "file there") from None
    if "-----BEGIN CERTIFICATE-----" not in extra:
        raise CockatooError(f"{where}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    body = Path(certifi.where()).read_text().rstrip("\n") + "\n" + extra
    bundle = Path(tempfile.gettempdir()) / f"cockatoo-ca-{hashlib.sha256(body.encode()).hexdigest()[:16]}.pem"
    if not bundle.is_file():
        partial = bundle.with_suffix(f".tmp-{os.getpid()}")
        partial.write_text(body)
        partial.replace(bundle)  # in one step: another process may be reading it
    for variable in BUNDLE_VARIABLES:
        os.environ[variable] = str(bundle)
    return bundle
