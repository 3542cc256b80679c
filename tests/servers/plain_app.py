"""The smallest registry stand-in for ``regmw serve --app tests.servers.plain_app:app``: 200 and a JSON body."""


def app(environ, start_response):
    body = b'{"schemaVersion": 2}'
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def scheme_app(environ, start_response):
    """Answers the scheme and the SCRIPT_NAME the server put in the environ (what an app builds its URLs from)."""
    body = f"{environ['wsgi.url_scheme']} {environ.get('SCRIPT_NAME', '')!r}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
