#!/usr/bin/env python3
"""Two tokenserver builds side by side on one filled access-token database, taking a listing
load in turn: an A/B with the host's drift taken out.

Harness runs of two builds are minutes apart, and on these hosts the machine's speed moves
between them (bench/results/host-2026-12-07-s.md). Here both servers stay up on the database a
`tokenserver-bench access --big N` run left filled (its tokens live two hours), and each round
gives each server the same load for a few seconds, alternating. Reports pages, p99 and the CPU
a page of each server and of the database process, from /proc/<pid>/stat.

    python3 bench/pages_side_by_side.py --a /tmp/A/tokenserver --b /tmp/B/tokenserver \
        --access-url mysql://root@127.0.0.1:3306/tokenserver_bench --db-process mariadbd

Extra server settings for one side: --a-env K=V / --b-env K=V (repeatable).
"""

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time

API_KEY = "bench-access-key"
TICK_US = 1_000_000 / os.sysconf("SC_CLK_TCK")


def cpu_us(pid):
    """User + system CPU of a process so far, in µs."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_US


def pids(name):
    return subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout.split()


def db_cpu_us(name):
    """CPU so far of every process named `name` (PostgreSQL runs one a connection), in µs."""
    total = 0.0
    for pid in pids(name):
        try:
            total += cpu_us(int(pid))
        except FileNotFoundError:
            pass  # ended since pgrep listed it
    return total


async def load(port, path, seconds, conns):
    """Keep-alive GETs of `path` from `conns` connections for `seconds`; every answer must be a
    200 holding 100 tokens. Returns (pages, p99 ms, bad answers)."""
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Authorization: Bearer {API_KEY}\r\n\r\n").encode()
    latencies, bad = [], [0]

    async def client(stop):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.monotonic() < stop:
            started = time.monotonic()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200") or body.count(b'{"token":') != 100:
                bad[0] += 1
            latencies.append(time.monotonic() - started)
        writer.close()

    stop = time.monotonic() + seconds
    await asyncio.gather(*(client(stop) for _ in range(conns)))
    latencies.sort()
    return len(latencies), latencies[int(len(latencies) * 0.99)] * 1000, bad[0]


def start(binary, url, port, extra):
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TOKENSERVER_ACCESS__URL": url,
        "TOKENSERVER_ACCESS__API_KEY": API_KEY,
        "TOKENSERVER_PORT": str(port),
        "TOKENSERVER_INTERNAL__PORT": str(port + 1),
    }
    env.update(kv.split("=", 1) for kv in extra)
    proc = subprocess.Popen([binary, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port + 1), timeout=0.1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    sys.exit(f"{binary} did not listen on {port + 1}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", required=True, help="the first tokenserver binary")
    p.add_argument("--b", required=True, help="the second tokenserver binary")
    p.add_argument("--a-env", action="append", default=[], metavar="K=V")
    p.add_argument("--b-env", action="append", default=[], metavar="K=V")
    p.add_argument("--access-url", required=True, help="the filled access-token database")
    p.add_argument("--db-process", required=True,
                   help="the database's process name: mariadbd, postgres (every process of it is counted), redis-server")
    p.add_argument("--service", default="bench-svc")
    p.add_argument("--app", default="big")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--connections", type=int, default=32)
    args = p.parse_args()

    path = f"/v1/services/{args.service}/applications/{args.app}/tokens?limit=100"
    if not pids(args.db_process):
        sys.exit(f"no process named {args.db_process}")
    servers = {}
    try:
        # Inside the `try`: if B does not start, A is still stopped.
        servers["A"] = (start(args.a, args.access_url, 18201, args.a_env), 18202)
        servers["B"] = (start(args.b, args.access_url, 18211, args.b_env), 18212)
        for name, (_, port) in servers.items():
            asyncio.run(load(port, path, 1, args.connections))  # connections opened, caches warm
        print("| Round | Side | pages | p99 ms | bad | server µs a page | database µs a page |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for round_ in range(1, args.rounds + 1):
            for name, (proc, port) in servers.items():
                s0, d0 = cpu_us(proc.pid), db_cpu_us(args.db_process)
                pages, p99, bad = asyncio.run(load(port, path, args.seconds, args.connections))
                s1, d1 = cpu_us(proc.pid), db_cpu_us(args.db_process)
                print(f"| {round_} | {name} | {pages} | {p99:.2f} | {bad} | "
                      f"{(s1 - s0) / pages:.0f} | {(d1 - d0) / pages:.0f} |", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
