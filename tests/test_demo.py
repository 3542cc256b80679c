"""`regmw demo --self-test`: the main job on embedded defaults, end to end over HTTP."""
import subprocess
import sys


def test_demo_self_test_passes_every_check(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "regmw.cli", "demo", "--self-test", "--port", "0", "--root", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "self-test: 10 of 10 checks held" in output
    assert "Traceback" not in output
    # the pushes really landed in the two layouts the classification checks
    assert (tmp_path / "old/docker/registry/v2/repositories/legacy/app/_manifests").is_dir()
    assert (tmp_path / "new/docker/registry/v2/repositories/fresh/app/_manifests").is_dir()
    assert not (tmp_path / "new/docker/registry/v2/repositories/forged").exists()


def test_plugins_command_lists_the_builtins(tmp_path):
    config = tmp_path / "all.toml"
    config.write_text('[regmw]\nplugins = ["migration", "gcs", "redis", "dbroute"]\n'
                      '[migration]\nnew_root = "gitlab/v2"\n[gcs]\nbucket = "b"\nanonymous = true\nendpoint = "http://127.0.0.1:1"\n'
                      '[database]\nprimary = "postgresql://postgres@127.0.0.1:1/none"\n')
    result = subprocess.run([sys.executable, "-m", "regmw.cli", "--config", str(config), "plugins"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for name in ("regmw_migration  (built-in)", "regmw_gcs  (built-in)", "regmw_redis  (built-in)",
                 "regmw_dbroute  (built-in)", "regmw.defaults.memory_cache  (embedded default)"):
        assert name in result.stdout


def test_what_the_demo_server_refuses_itself_gets_an_oci_body_not_html():
    import json
    import socket
    import threading

    from werkzeug.serving import make_server

    from regmw.demo.run import _QuietHandler

    def app(environ, start_response):  # never reached
        start_response("200 OK", [])
        return [b""]

    def ask(raw: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=30) as sock:
            sock.sendall(raw)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        return answer

    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        too_many = ask(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n")
        # a bad version is answered the HTTP/0.9 way (no head); its message quotes the client's NUL
        bad_version = ask(b"GET /v2/ HTTP/1.\x00\r\n\r\n")
    finally:
        server.shutdown()
        server.server_close()
    head, _, body = too_many.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), head
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body)["errors"][0]["code"] == "UNKNOWN"
    assert json.loads(bad_version)["errors"][0]["code"] == "UNKNOWN"


def test_a_config_file_is_laid_over_the_demos_own(tmp_path):
    """`regmw -c FILE demo`: the file is read (a bad key is one configuration error line, exit 2) ..."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[ratelimit]\nbogus = 1\n")
    result = subprocess.run([sys.executable, "-m", "regmw.cli", "-c", str(bad), "demo", "--self-test", "--port", "0",
                             "--root", str(tmp_path / "root")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "configuration error" in result.stderr and "bogus" in result.stderr and "Traceback" not in result.stderr


def test_a_config_files_sections_replace_the_demos_key_by_key(tmp_path):
    """... and its keys win over the demo's: here a read limit of 0 refuses what the demo would serve."""
    from werkzeug.test import Client

    from regmw.demo.run import build_demo

    middleware, _ = build_demo(str(tmp_path), "secret", overrides={
        "ratelimit": {"rules": [{"name": "frozen", "by": "client", "limit": "0/minute"}]}})
    assert Client(middleware).get("/v2/group/project/tags/list").status_code == 429
    assert middleware.runtime.config["migration"]["old_root"].startswith("old/")  # the demo's other keys stay


def test_a_client_that_stalls_on_the_demo_server_is_let_go_after_client_timeout(tmp_path):
    """Half a head: the connection closes; a body short of its Content-Length: the registry's 400 (stalled)."""
    import json
    import socket
    import threading

    from werkzeug.serving import make_server

    from regmw.demo.registry import create_app
    from regmw.demo.run import _handler

    server = make_server("127.0.0.1", 0, create_app(str(tmp_path)), threaded=True, request_handler=_handler(1))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    answers = []
    try:
        for raw in (b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Half: a",
                    b"PUT /v2/a/b/manifests/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"):
            with socket.create_connection(("127.0.0.1", server.server_port), timeout=20) as sock:
                sock.sendall(raw)
                answer = b""
                while chunk := sock.recv(65536):  # a socket.timeout here: the server still holds it
                    answer += chunk
            answers.append(answer)
    finally:
        server.shutdown()
        server.server_close()
    assert answers[0] == b""
    head, _, body = answers[1].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert "stalled" in json.loads(body)["errors"][0]["message"]
