"""Token verification settings are checked at start-up, not at the first request; unverified claims never count."""
import base64
import json
import logging
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from werkzeug.test import Client

from regmw import ConfigError, RegistryMiddleware, build


def test_missing_key_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="auth.key_file: cannot read"):
        build({"auth": {"key_file": str(tmp_path / "absent.pem")}}, environ={})


@pytest.mark.parametrize("ending", ["\n", "\r\n"], ids=["lf", "crlf"])
def test_an_hmac_secret_in_a_key_file_verifies_without_its_trailing_line_break(tmp_path, ending):
    """`echo secret > file` ends the file with a newline that is not part of the secret."""
    secret = "s" * 32
    (tmp_path / "secret").write_bytes((secret + ending).encode())

    def app(environ, start_response):
        start_response("200 OK", [])
        return [str(environ["regmw.context"].subject).encode()]

    config = {"auth": {"key_file": str(tmp_path / "secret"), "algorithms": ["HS256"]}}
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, secret, "HS256")
    client = Client(RegistryMiddleware(app, config, environ={}))
    assert client.get("/v2/a/tags/list", headers={"Authorization": f"Bearer {token}"}).data == b"alice"


def test_a_key_no_algorithm_can_use_is_a_config_error():
    with pytest.raises(ConfigError, match="auth.key: not a usable key"):
        build({"auth": {"key": "-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n"}}, environ={})


def test_public_key_refused_for_hmac_algorithms():
    # an RSA public key used as an HMAC secret is the classic algorithm-confusion forgery
    public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    with pytest.raises(ConfigError, match="auth.key"):
        build({"auth": {"key": public, "algorithms": ["HS256"]}}, environ={})
    assert build({"auth": {"key": public, "algorithms": ["RS256"]}}, environ={}).services.token_verifier


def test_unknown_algorithm_is_a_config_error():
    with pytest.raises(ConfigError, match="auth.algorithms"):
        build({"auth": {"key": "k" * 32, "algorithms": ["HS999"]}}, environ={})


def test_only_a_verified_token_has_a_subject_to_rate_limit():
    """docs/rate-limiting.md: a `subject` rule counts the verified token's `sub`; other tokens are not counted."""
    secret = "s" * 32

    def app(environ, start_response):
        start_response("200 OK", [])
        return [str(environ["regmw.context"].subject).encode()]

    config = {"auth": {"key": secret, "algorithms": ["HS256"]},
              "ratelimit": {"rules": [{"name": "per-subject", "by": "subject", "limit": "1/minute"}]}}
    client = Client(RegistryMiddleware(app, config, environ={}))
    claims = {"sub": "alice", "exp": int(time.time()) + 60}

    def b64(value):
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    unverified = {
        "alg-none": b64({"alg": "none", "typ": "JWT"}) + "." + b64(claims) + ".",
        "wrong-key": jwt.encode(claims, "t" * 32, "HS256"),
        "expired": jwt.encode({**claims, "exp": int(time.time()) - 5}, secret, "HS256"),
        "no-exp": jwt.encode({"sub": "alice"}, secret, "HS256"),
        "aud-without-[auth]-audience": jwt.encode({**claims, "aud": "container_registry"}, secret, "HS256"),
        "not-yet-valid": jwt.encode({**claims, "nbf": int(time.time()) + 60}, secret, "HS256"),
        "issued-in-the-future": jwt.encode({**claims, "iat": int(time.time()) + 60}, secret, "HS256"),
    }
    for name, token in unverified.items():
        response = client.get("/v2/a/tags/list", headers={"Authorization": f"Bearer {token}"})
        assert (name, response.status_code, response.data) == (name, 200, b"None")
        assert "RateLimit-Limit" not in response.headers
    good = jwt.encode(claims, secret, "HS256")
    unknown_kid = jwt.encode(claims, secret, "HS256", headers={"kid": "no-such-key"})  # one key: kid is not used
    assert client.get("/v2/a/tags/list", headers={"Authorization": f"Bearer {unknown_kid}"}).data == b"alice"
    assert client.get("/v2/a/tags/list", headers={"Authorization": f"Bearer {good}"}).status_code == 429


def test_a_flood_of_bad_tokens_logs_one_warning(caplog):
    """Any client can send a bad token on every request: the warning is kept to one a second, the rest at DEBUG."""
    def app(environ, start_response):
        start_response("200 OK", [])
        return [b""]

    config = {"auth": {"key": "s" * 32, "algorithms": ["HS256"]},  # a subject rule: every request's token is read
              "ratelimit": {"rules": [{"name": "per-subject", "by": "subject", "limit": "1000/minute"}]}}
    client = Client(RegistryMiddleware(app, config, environ={}))
    caplog.set_level(logging.DEBUG, logger="regmw.tokens")
    for index in range(200):
        assert client.get("/v2/a/tags/list", headers={"Authorization": f"Bearer garbage{index}"}).status_code == 200
    lines = [record for record in caplog.records if "does not verify" in record.getMessage()]
    assert len(lines) == 200
    assert [record.levelno for record in lines].count(logging.WARNING) <= 2  # the 200 requests may span a second
