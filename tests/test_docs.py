"""The examples in the README and docs run as printed."""
import re
import types
from pathlib import Path
from wsgiref.validate import validator

import pytest
from werkzeug.test import Client

from regmw import RegistryMiddleware

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(doc: str) -> list[str]:
    text = (ROOT / doc).read_text()
    return [block for block in re.findall(r"```python\n(.*?)```", text, re.DOTALL) if "@hookimpl" in block]


def as_module(source: str, name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(compile(source, name, "exec"), module.__dict__)
    return module


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def test_readme_plugin_example_works_when_pasted():
    (source,) = python_blocks("README.md")
    plugin = as_module(source, "my_plugin")
    client = Client(validator(RegistryMiddleware(app, {}, plugins=[plugin], environ={})))
    assert client.get("/v2/", buffered=True).status_code == 200  # no repository: the example must cope
    assert client.post("/v2/_catalog", buffered=True).status_code == 200
    refused = client.put("/v2/archive/old/manifests/v1", data=b"{}", buffered=True)
    assert refused.status_code == 403
    assert refused.json["errors"][0]["code"] == "DENIED"
    served = client.get("/v2/archive/old/manifests/v1", buffered=True)
    assert served.status_code == 200 and served.headers["X-Served-Repository"] == "archive/old"


@pytest.mark.parametrize("doc", ["docs/hooks.md", "docs/writing-plugins.md"])
def test_every_hook_example_registers_and_serves(doc, capsys):
    blocks = python_blocks(doc)
    assert blocks
    for index, source in enumerate(blocks):
        plugin = as_module(source, f"example_{index}")
        config = {"quota": {"full": ["big/monorepo"]}} if "quota" in source else {}
        client = Client(validator(RegistryMiddleware(app, config, plugins=[plugin], environ={})))
        for method in ("get", "put"):
            response = getattr(client, method)("/v2/big/monorepo/manifests/latest", data=b"{}", buffered=True)
            assert response.status_code in (200, 403, 429), (doc, index, response.data)
        # repository-less API requests reach the hooks too (context.repository is None)
        assert client.get("/v2/", buffered=True).status_code == 200, (doc, index)
        assert client.post("/v2/_catalog", buffered=True).status_code in (200, 429), (doc, index)
        if "quota" in source:
            assert client.put("/v2/big/monorepo/manifests/latest", buffered=True).status_code == 403
