#!/usr/bin/env python3
"""Drives a tokenserver on 127.0.0.1:PORT for bench/instructions/count: fills access tokens, then
sends N requests of one kind, one keep-alive connection each (64 threads for pcreate, 16 session
chains for rotate), so that calls queue up and share batches the way they do under load."""
import http.client
import json
import random
import sys
import threading

port, kind, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
HEADERS = {"authorization": "Bearer k", "content-type": "application/json"}


def call(conn, method, path, body=None):
    conn.request(method, path, body=body, headers=HEADERS)
    r = conn.getresponse()
    data = r.read()
    if r.status >= 300:
        sys.exit(f"{method} {path}: {r.status} {data[:200]!r}")
    return data


def threads(count, work):
    ts = [threading.Thread(target=work, args=(w,)) for w in range(count)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


conn = http.client.HTTPConnection("127.0.0.1", port)
if kind == "fill":
    for i in range(n):
        body = json.dumps({"token": f"big-{i:09d}", "app_id": "big", "ttl": 7200})
        call(conn, "POST", "/v1/services/s/tokens", body)
elif kind == "list":
    for _ in range(n):
        call(conn, "GET", "/v1/services/s/applications/big/tokens?limit=100")
elif kind == "authorize":
    for _ in range(n):
        body = json.dumps({"access_token": f"big-{random.randrange(1000):09d}"})
        call(conn, "POST", "/v1/services/s/authorize", body)
elif kind == "pcreate":
    def create(w):
        c = http.client.HTTPConnection("127.0.0.1", port)
        for _ in range(n // 64):
            call(c, "POST", "/v1/services/s/tokens", json.dumps({"app_id": f"new-{w}", "ttl": 7200}))
    threads(64, create)
elif kind == "rotate":
    def chain(w):
        c = http.client.HTTPConnection("127.0.0.1", port)
        token = json.loads(call(c, "POST", "/v1/sessions", json.dumps({"meta": {"user": w}})))["token"]
        for _ in range(n // 16):
            token = json.loads(call(c, "POST", "/v1/sessions/rotate", json.dumps({"token": token})))["token"]
    threads(16, chain)
else:
    sys.exit(f"unknown kind {kind}")
