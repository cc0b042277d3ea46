#!/usr/bin/env python3
"""A soak of the gateway: a mix of clients at a moderate rate for a while,
with the gateway's RSS, open descriptors and the answers' counts reported
every 30 s. Not in CI: run by benches/soak.sh (issue 21, point 8).

    soak.py BIN [SECONDS] [RATE]

BIN is the budget-gateway binary (a release build); SECONDS the duration
(600); RATE the requests a second of each client kind (5). Exits non-zero
if the gateway itself answered a 5xx other than the 503 a shed connection
gets, or if it died.
"""
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

BIN = sys.argv[1]
SECONDS = float(sys.argv[2]) if len(sys.argv) > 2 else 600.0
RATE = float(sys.argv[3]) if len(sys.argv) > 3 else 5.0

KEY_BIG, KEY_SMALL = "sk-soak-big", "sk-soak-small"
CONFIG = f"""
admin_key = "soak-admin"
tokenizer = "o200k_base"

[[agents]]
api_key = "{KEY_BIG}"
agent_id = "7f9c24e8-3b1a-4c5d-9e2f-1a2b3c4d5e6f"
token_budget = 1000000000
calls_budget = 1000000000
window_secs = 60

[[agents]]
api_key = "{KEY_SMALL}"
agent_id = "0b3c9a30-4f2e-4b8a-9d41-6c0e2f7a1b55"
token_budget = 2000
calls_budget = 20
window_secs = 60
"""


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, proc):
    for _ in range(500):
        if proc.poll() is not None:
            sys.exit(f"exited early: {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    sys.exit(f"port {port} never listened")


counts = Counter()
lock = threading.Lock()
stop = threading.Event()


def count(kind, outcome):
    with lock:
        counts[(kind, outcome)] += 1


def chat(port, key, body, kind):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("POST", "/v1/chat/completions", json.dumps(body),
                  {"authorization": f"Bearer {key}", "content-type": "application/json"})
        r = c.getresponse()
        r.read()
        count(kind, r.status)
        c.close()
    except Exception as e:  # noqa: BLE001 - every failure is counted
        count(kind, type(e).__name__)


QUESTION = {"model": "m", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 16}


def normal(port):
    chat(port, KEY_BIG, QUESTION, "normal")


def streaming(port):
    chat(port, KEY_BIG, dict(QUESTION, stream=True), "stream")


def over_budget(port):
    chat(port, KEY_SMALL, QUESTION, "over-budget")


def bogus(port):
    chat(port, "sk-bogus-" + str(time.monotonic_ns()), QUESTION, "bogus-key")


def disconnecting(port):
    # Sends a request the mock answers after 400 ms, and hangs up at 50.
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        body = json.dumps(dict(QUESTION, mock_delay_ms=400))
        s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY_BIG}\r\n"
                   f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n{body}").encode())
        time.sleep(0.05)
        s.close()
        count("disconnect", "sent")
    except Exception as e:  # noqa: BLE001
        count("disconnect", type(e).__name__)


def slow(port):
    # A head dripped a byte every 300 ms: cut off at the head's deadline.
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        head = f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY_BIG}\r\n"
        started = time.monotonic()
        for b in head.encode():
            try:
                s.sendall(bytes([b]))
            except OSError:
                break
            time.sleep(0.3)
            if stop.is_set() or time.monotonic() - started > 8:
                break
        s.settimeout(0.5)
        try:
            data = s.recv(100)
            count("slow", "closed" if not data else data.split(b" ")[1].decode())
        except (socket.timeout, OSError):
            count("slow", "held")
        s.close()
    except Exception as e:  # noqa: BLE001
        count("slow", type(e).__name__)


def drive(port, fn, rate):
    period = 1.0 / rate
    nxt = time.monotonic()
    threads = []
    while not stop.is_set():
        t = threading.Thread(target=fn, args=(port,), daemon=True)
        t.start()
        threads.append(t)
        threads = [t for t in threads if t.is_alive()]
        nxt += period
        time.sleep(max(0.0, nxt - time.monotonic()))


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def main():
    tmp = tempfile.mkdtemp(prefix="soak-")
    config = os.path.join(tmp, "gw.toml")
    with open(config, "w") as f:
        f.write(CONFIG)
    up_port, gw_port = free_port(), free_port()
    mock = subprocess.Popen([BIN, "--mock-upstream", "--listen", f"127.0.0.1:{up_port}"],
                            stderr=subprocess.DEVNULL)
    wait_port(up_port, mock)
    gw = subprocess.Popen([BIN, "--config", config, "--listen", f"127.0.0.1:{gw_port}",
                           "--upstream", f"http://127.0.0.1:{up_port}",
                           "--state", os.path.join(tmp, "state.json"),
                           "--header-timeout", "2", "--body-timeout", "5",
                           "--max-connections", "256"], stderr=subprocess.PIPE)
    wait_port(gw_port, gw)
    kinds = [normal, streaming, over_budget, bogus, disconnecting, slow]
    drivers = [threading.Thread(target=drive, args=(gw_port, k, RATE), daemon=True) for k in kinds]
    for d in drivers:
        d.start()
    started = time.monotonic()
    failed = False
    print(f"soak: {SECONDS:.0f} s, {RATE} requests/s of each of {len(kinds)} kinds, gateway pid {gw.pid}")
    print("t_s\trss_kb\tfds\tcounts")
    try:
        while time.monotonic() - started < SECONDS:
            time.sleep(min(30.0, SECONDS - (time.monotonic() - started)) if SECONDS > 30 else SECONDS)
            if gw.poll() is not None:
                print("the gateway died:", gw.returncode)
                failed = True
                break
            with lock:
                snapshot = dict(counts)
            shown = " ".join(f"{k}:{o}={n}" for (k, o), n in sorted(snapshot.items(), key=str))
            print(f"{time.monotonic() - started:.0f}\t{rss_kb(gw.pid)}\t{fds(gw.pid)}\t{shown}", flush=True)
    finally:
        stop.set()
        time.sleep(1)
        if gw.poll() is None:
            gw.terminate()
            try:
                gw.wait(40)
            except subprocess.TimeoutExpired:
                gw.kill()
                failed = True
                print("the gateway did not stop within 40 s of SIGTERM")
        mock.terminate()
        mock.wait(10)
    server_errors = {k: n for k, n in counts.items()
                     if isinstance(k[1], int) and k[1] >= 500}
    print("5xx:", server_errors or "none")
    sys.exit(1 if failed or server_errors else 0)


if __name__ == "__main__":
    main()
