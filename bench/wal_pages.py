#!/usr/bin/env python3
"""WAL pages per access-token create, by B-tree, on a copy of the SQLite schema
(tokenserver-store/src/sqlite/access.rs): fills FILL batches of 64 creates, restarts the log, runs
50 batches of BATCH creates spread over APPS applications, then reads the page number of every
frame in the WAL and names its B-tree with SQLite's dbstat.

    python3 bench/wal_pages.py [BATCH=32] [APPS=64] [KEY=time|hash] [FILL=300]

KEY=time keys a token by its issue time then its hash (tokens tokenserver generates), hash by
its SHA-256 alone (tokens a caller gives). bench/results/access-sqlite.md has the figures."""
import collections
import hashlib
import os
import sqlite3
import struct
import sys
import tempfile

BATCH, APPS = (int(a) for a in (sys.argv[1:3] + ["32", "64"][len(sys.argv[1:3]):]))
KEY = sys.argv[3] if len(sys.argv) > 3 else "time"
FILL = int(sys.argv[4]) if len(sys.argv) > 4 else 300

path = os.path.join(tempfile.mkdtemp(), "t.db")
db = sqlite3.connect(path, isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA wal_autocheckpoint=0")
db.execute("PRAGMA synchronous=NORMAL")
db.executescript("""
CREATE TABLE tokenserver_access_tokens (
    service TEXT NOT NULL, token_hash BLOB NOT NULL, token TEXT NOT NULL, app_id TEXT NOT NULL,
    user_id TEXT, expires_at INTEGER, created_at INTEGER NOT NULL,
    PRIMARY KEY (service, token_hash)) WITHOUT ROWID;
CREATE INDEX tokenserver_access_app_page_idx ON tokenserver_access_tokens
    (service, app_id, created_at, token_hash, token, user_id, expires_at);
CREATE INDEX tokenserver_access_user_page_idx ON tokenserver_access_tokens
    (service, app_id, user_id, created_at, token_hash, token, expires_at) WHERE user_id IS NOT NULL;
CREATE INDEX tokenserver_access_expiry_idx ON tokenserver_access_tokens (expires_at)
    WHERE expires_at IS NOT NULL;
""")
made = 0
T0 = 1_764_000_000_000


def batch(count):
    global made
    db.execute("BEGIN IMMEDIATE")
    for _ in range(count):
        made += 1
        now = T0 + made // 20
        token = os.urandom(28).hex()
        digest = hashlib.sha256(token.encode()).digest()
        key = now.to_bytes(6, "big") + digest[:26] if KEY == "time" else digest
        db.execute("INSERT INTO tokenserver_access_tokens VALUES (?, ?, ?, ?, ?, ?, ?)",
                   ("bench-svc", key, token, f"new-{made % APPS}", None, now + 7_200_000, now))
    db.execute("COMMIT")


for _ in range(FILL):
    batch(64)
db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
for _ in range(50):
    batch(BATCH)
wal = open(path + "-wal", "rb").read()
frames = [struct.unpack(">I", wal[at:at + 4])[0] for at in range(32, len(wal) - 23, 24 + 4096)]
owner = {page: (name, kind) for page, name, kind in db.execute("SELECT pageno, name, pagetype FROM dbstat")}
counts = collections.Counter(owner.get(page, ("?", "?")) for page in frames)
creates = 50 * BATCH
print(f"batch {BATCH}, {APPS} applications, key {KEY}: {len(frames) / creates:.2f} pages per create")
for (name, kind), n in counts.most_common():
    print(f"  {name} {kind}: {n / creates:.2f}")
