"""The smallest registry stand-in for ``regmw serve --app tests.servers.plain_app:app``: 200 and a JSON body."""


def app(environ, start_response):
    body = b'{"schemaVersion": 2}'
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
