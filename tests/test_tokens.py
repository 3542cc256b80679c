"""Token verification settings are checked at start-up, not at the first request."""
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from regmw import ConfigError, build


def test_missing_key_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="auth.key_file: cannot read"):
        build({"auth": {"key_file": str(tmp_path / "absent.pem")}}, environ={})


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
