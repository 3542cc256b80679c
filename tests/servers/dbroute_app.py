"""A small Flask registry stand-in behind regmw + dbroute, for tests that run it under gunicorn.

``create_app()`` reads the regmw configuration (JSON) from ``REGMW_TEST_CONFIG``.
``PUT /v2/<name>/manifests/<ref>`` stores the body (an integer) for ``name``;
``GET`` reads it back through the interface named by ``?via=``
(``execute`` | ``connect`` | ``session`` | ``flask``), optionally after
``pg_sleep(?sleep=)`` in the same statement and, with ``?after=1``, after a
first statement whose result the view holds. Every read answers the
``inet_server_port()`` that served it and the worker's pid. ``/status`` is
the worker's ``router.status()``.
"""
from __future__ import annotations

import json
import os

from flask import Flask, jsonify, request
from regmw_dbroute.flask import db_session
from regmw_dbroute.flask import init_app as dbroute_init_app
from sqlalchemy import text

from regmw.middleware import RegistryMiddleware

READ = text("SELECT pg_sleep(:s), (SELECT value FROM kv WHERE repo = :r), inet_server_port()")
FIRST = text("SELECT 1")


def make_flask() -> Flask:
    app = Flask("dbroute-gunicorn-test")
    dbroute_init_app(app)

    @app.route("/v2/<path:name>/manifests/<reference>", methods=["GET", "PUT"])
    def manifest(name, reference):
        handle = request.environ["regmw.db"]
        if request.method == "PUT":
            handle.execute(text("INSERT INTO kv (repo, value) VALUES (:r, :v) "
                                "ON CONFLICT (repo) DO UPDATE SET value = EXCLUDED.value"),
                           {"r": name, "v": int(request.get_data())})
            return "", 201
        via = request.args.get("via", "execute")
        params = {"s": float(request.args.get("sleep", 0)), "r": name}
        after = request.args.get("after") == "1"
        if via == "execute":
            row = handle.execute(READ, params)[0]
        elif via == "connect":
            conn = handle.connect()
            if after:
                held = conn.execute(FIRST).all()  # noqa: F841 - the view now holds results
            row = conn.execute(READ, params).one()
        else:
            session = handle.session() if via == "session" else db_session()
            if after:
                held = session.execute(FIRST).all()  # noqa: F841
            row = session.execute(READ, params).one()
        return jsonify(value=row[1], port=row[2], role=handle.role, reason=handle.reason, pid=os.getpid())

    return app


def create_app() -> RegistryMiddleware:
    middleware = RegistryMiddleware(make_flask(), json.loads(os.environ["REGMW_TEST_CONFIG"]), environ={})
    router = middleware.services.db_router

    def application(environ, start_response):
        if environ.get("PATH_INFO") == "/status":
            router.ensure_running()
            body = json.dumps(router.status()).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        return middleware(environ, start_response)

    return application
