"""A throw-away certificate authority for the TLS servers the tests start."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class TestPki:
    __test__ = False  # a fixture's value, not a test class

    ca_file: Path
    cert_file: Path
    key_file: Path
    ca: trustme.CA

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


def make_pki(directory: Path, *hosts: str) -> TestPki:
    """A CA and one server certificate for ``hosts`` (127.0.0.1 by default)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    issued = ca.issue_cert(*(hosts or ("127.0.0.1", "localhost")))
    ca_file = directory / "ca.pem"
    cert_file = directory / "server.pem"
    key_file = directory / "server.key"
    ca.cert_pem.write_to_path(str(ca_file))
    issued.private_key_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    return TestPki(ca_file, cert_file, key_file, ca)
