"""TLS, client certificates and bearer tokens: a vitals of this test's own,
with mTLS and an auth file, on the embedded store in a temporary directory.

Certificates are made here with the openssl command line tool; nothing is
kept after the test.
"""

import hashlib
import os
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from vitals_client import Client, VitalsError

TOKEN = "py-client-token"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> None:
    """A CA; a server certificate for localhost; a client certificate."""
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=test CA", "-days", "1", cwd=d)
    for name, ext in [
        ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
        ("client", "subjectAltName=URI:spiffe://test/python\nextendedKeyUsage=clientAuth"),
    ]:
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext", cwd=d)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def secure_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    make_pki(d)
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    (d / "auth.toml").write_text(
        f'[[principal]]\nname = "python"\ntoken_sha256 = "{digest}"\nscopes = ["health.read", "health.write", "locks"]\n'
    )
    port = free_port()
    log = open(d / "vitals.log", "wb")
    proc = subprocess.Popen(
        [
            os.environ["VITALS_BIN"],
            "--listen-addr", f"127.0.0.1:{port}",
            "--data-dir", str(d / "data"),
            "--tls-cert-file", str(d / "server.crt"),
            "--tls-key-file", str(d / "server.key"),
            "--tls-client-ca-file", str(d / "ca.crt"),
            "--auth-file", str(d / "auth.toml"),
            "--shutdown-grace-ms", "500",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PGHOST")},
    )
    tls = {
        "root_certificates": (d / "ca.crt").read_bytes(),
        "private_key": (d / "client.key").read_bytes(),
        "certificate_chain": (d / "client.crt").read_bytes(),
        "server_name": "localhost",
    }
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, (d / "vitals.log").read_text()
        try:
            with Client(target, token=TOKEN, timeout=2, **tls) as c:
                c.evaluate_health(["healthy"])
            break
        except VitalsError:
            assert time.monotonic() < deadline, (d / "vitals.log").read_text()
            time.sleep(0.1)
    yield target, tls
    proc.terminate()
    proc.wait(timeout=15)
    log.close()


def test_tls_with_a_client_certificate_and_a_token_is_served(secure_server, system_id):
    target, tls = secure_server
    with Client(target, token=TOKEN, **tls) as c:
        result = c.submit_run(system_id, "http", "unhealthy")
        assert result.run.system_id == system_id
        with c.lock(system_id + "/lock", wait_timeout=5) as grant:
            assert grant.fencing_token > 0


def test_no_token_is_unauthenticated_and_a_missing_scope_permission_denied(secure_server, system_id):
    target, tls = secure_server
    with Client(target, **tls) as c:
        with pytest.raises(VitalsError) as err:
            c.submit_run(system_id, "http", "healthy")
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert err.value.reason == "UNAUTHENTICATED"
    with Client(target, token=TOKEN, **tls) as c:
        with pytest.raises(VitalsError) as err:
            c.configure_check(system_id, "http", enabled=False)
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert err.value.metadata["scope"] == "health.admin"


def test_plaintext_or_no_client_certificate_is_refused(secure_server):
    target, tls = secure_server
    for kwargs in [{}, {"root_certificates": tls["root_certificates"], "server_name": "localhost"}]:
        with Client(target, token=TOKEN, timeout=2, **kwargs) as c:
            with pytest.raises(VitalsError) as err:
                c.evaluate_health(["healthy"])
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
