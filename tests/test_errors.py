"""One way to build an OCI error body: regmw.errors.error_body, for refusals, the gateway and the reference registry."""
import ast
import json
from pathlib import Path

from werkzeug.test import Client

from regmw.errors import Refusal, error_body

ROOT = Path(__file__).resolve().parent.parent


def test_error_body_is_the_oci_shape_with_optional_detail():
    assert json.loads(error_body("DENIED", "no")) == {"errors": [{"code": "DENIED", "message": "no"}]}
    assert json.loads(error_body("NAME_INVALID", "bad", {"name": "x"})) == {
        "errors": [{"code": "NAME_INVALID", "message": "bad", "detail": {"name": "x"}}]}


def test_refusals_the_gateway_and_the_reference_registry_send_the_same_bytes(tmp_path):
    from regmw.demo.registry import create_app, oci_error
    from regmw.gateway import Gateway

    assert Refusal(400, "NAME_INVALID", "bad", detail={"name": "x"}).body() == error_body("NAME_INVALID", "bad", {"name": "x"})
    with create_app(str(tmp_path)).test_request_context():
        assert oci_error("NAME_INVALID", "bad", {"name": "x"}).get_data() == error_body("NAME_INVALID", "bad", {"name": "x"})
    registry = Client(create_app(str(tmp_path)))
    unknown = registry.get("/v2/group/app/manifests/latest")
    assert unknown.status_code == 404 and unknown.get_data() == error_body(
        *[json.loads(unknown.get_data())["errors"][0][key] for key in ("code", "message", "detail")])
    import socket

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens here: the gateway's 502
    gateway = Client(Gateway(f"http://127.0.0.1:{port}", timeout=1.0))
    down = gateway.get("/v2/")
    assert down.status_code == 502 and down.get_data() == error_body("UNAVAILABLE", "upstream registry is unreachable")


def test_no_module_builds_an_error_body_by_hand():
    """Only regmw/errors.py writes an {"errors": [...]} literal; everything else calls error_body or a Refusal."""
    offenders = []
    for path in [*ROOT.joinpath("regmw").rglob("*.py"), *ROOT.joinpath("plugins").rglob("*.py")]:
        if path == ROOT / "regmw" / "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict) and any(isinstance(k, ast.Constant) and k.value == "errors" for k in node.keys):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
