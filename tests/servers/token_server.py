"""A registry token service (distribution's token auth) on a free port, owned by the test run.

A registry configured with ``auth: token`` answers ``401`` with ``WWW-Authenticate:
Bearer realm=...,service=...,scope=...``; the client asks the realm for a token with
its credentials and retries with ``Authorization: Bearer``. This service signs each
token (RS256) with a throwaway RSA key whose self-signed certificate is the
registry's ``rootcertbundle`` and travels in the token's ``x5c`` header (how
distribution finds the key); regmw's ``[auth]`` verifies the same token with the
public key. No mock: the registry is the real ``docker-registry``, the client a
real one, and the token a real JWT both check.
"""
from __future__ import annotations

import base64
import datetime
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from werkzeug.wrappers import Request, Response


@dataclass
class TokenServer:
    url: str
    cert_file: Path
    public_key_file: Path
    username: str = "alice"
    password: str = "s3cret"
    issuer: str = "regmw-test-issuer"
    service: str = "regmw-test-registry"
    #: the ``scope`` parameters of every token issued, in order
    issued: list[list[str]] = field(default_factory=list)

    def registry_config(self) -> str:
        """The ``auth:`` section of a docker-registry that trusts this service's tokens."""
        return (f"auth:\n  token:\n    realm: {self.url}/token\n    service: {self.service}\n"
                f"    issuer: {self.issuer}\n    rootcertbundle: {self.cert_file}\n")

    def regmw_config(self) -> str:
        """regmw's ``[auth]``: verify the same tokens (signature, issuer, audience)."""
        return (f'[auth]\nkey_file = "{self.public_key_file}"\nalgorithms = ["RS256"]\n'
                f'issuer = "{self.issuer}"\naudience = "{self.service}"\n')


def _key_and_certificate(directory: Path) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "regmw test token issuer")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (directory / "issuer.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "issuer.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key, cert


@pytest.fixture
def token_server(tmp_path, serve_wsgi) -> TokenServer:
    """A token service for one user (``alice``/``s3cret``, HTTP Basic on the realm); stopped with ``serve_wsgi``.

    A token grants pull, push and delete on each repository its scope names, whatever
    actions were asked: oras-py 0.2 keeps its first token (asked for ``pull`` by the
    HEAD that starts a push) and asks again only after a 403, while distribution
    answers a token short of ``push`` with 401, so a token of exactly the actions asked
    fails that push against the registry alone.
    """
    directory = tmp_path / "token-issuer"
    directory.mkdir()
    key, cert = _key_and_certificate(directory)
    x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
    server = TokenServer("", directory / "issuer.pem", directory / "issuer.pub")

    @Request.application
    def app(request: Request) -> Response:
        auth = request.authorization
        if auth is None or (auth.username, auth.password) != (server.username, server.password):
            return Response('{"details": "bad credentials"}', 401, mimetype="application/json")
        scopes = request.args.getlist("scope")
        server.issued.append(scopes)
        access = [{"type": scope.split(":")[0], "name": scope.split(":")[1], "actions": ["pull", "push", "delete"]}
                  for scope in scopes if scope.count(":") == 2]
        now = int(time.time())
        token = jwt.encode({"iss": server.issuer, "sub": auth.username, "aud": request.args.get("service"),
                            "exp": now + 300, "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex, "access": access},
                           key, algorithm="RS256", headers={"x5c": x5c})
        return Response(json.dumps({"token": token, "access_token": token, "expires_in": 300}),
                        mimetype="application/json")

    server.url = serve_wsgi(app)
    return server
