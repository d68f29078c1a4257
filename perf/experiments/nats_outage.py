#!/usr/bin/env python3
"""What a NATS outage does to writes in flight, in JetStream mode.

    python3 perf/experiments/nats_outage.py FLUX [OUTAGE_S] [AFTER_S] [WRITERS]
    python3 perf/experiments/nats_outage.py target/release/flux 10 6 4

Starts `nats-server -js` and `FLUX serve --log nats://…` on free loopback ports (fresh dirs
under a temp dir), runs WRITERS threads that each POST single events to entities of their own
(`acme/o-<writer>-<i>`, one entity per write), SIGKILLs nats-server after 1 s, starts it again
on the same port and store OUTAGE_S later (at least until 20 writes got 503), lets the writers
run AFTER_S more, and prints:
- the count of each status;
- `events` from /api/health against the writes answered 200: more events than 200s means a
  write answered 503 was applied after all (or one was stored twice);
- every write that took longer than 0.3 s, with its status.
Needs nats-server on the PATH.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


flux = sys.argv[1]
outage = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
after = float(sys.argv[3]) if len(sys.argv) > 3 else 6.0
writers = int(sys.argv[4]) if len(sys.argv) > 4 else 4

work = tempfile.mkdtemp(prefix="nats-outage-")
nats_port, flux_port = free_port(), free_port()
base = f"http://127.0.0.1:{flux_port}"


def start_nats():
    return subprocess.Popen(
        ["nats-server", "-js", "-a", "127.0.0.1", "-p", str(nats_port), "-sd", f"{work}/store"],
        stderr=open(f"{work}/nats.log", "a"),
    )


nats = start_nats()
time.sleep(0.5)
server = subprocess.Popen(
    [flux, "serve", "--listen", f"127.0.0.1:{flux_port}", "--data-dir", f"{work}/data",
     "--log", f"nats://127.0.0.1:{nats_port}"],
    stdout=subprocess.DEVNULL, stderr=open(f"{work}/flux.log", "w"),
)
for _ in range(100):
    try:
        urllib.request.urlopen(f"{base}/api/health", timeout=1)
        break
    except Exception:
        time.sleep(0.1)

stop = False
results = []  # (writer, i, status, started s, took s)
lock = threading.Lock()
t0 = time.time()


def writer(k):
    i = 0
    while not stop:
        event = {"stream": "s", "source": "outage", "timestamp": 1,
                 "payload": {"entity_id": f"acme/o-{k}-{i}", "properties": {"seq": i}}}
        request = urllib.request.Request(f"{base}/api/events", json.dumps(event).encode(),
                                         {"Content-Type": "application/json"})
        started = time.time()
        try:
            status = urllib.request.urlopen(request, timeout=30).status
        except urllib.error.HTTPError as e:
            status = e.code
        except Exception as e:  # transport errors are reported as such
            status = repr(e)
        with lock:
            results.append((k, i, status, started - t0, time.time() - started))
        if status != 200:
            time.sleep(0.02)
        i += 1


threads = [threading.Thread(target=writer, args=(k,)) for k in range(writers)]
for t in threads:
    t.start()
time.sleep(1.0)
killed_at = time.time() - t0
nats.send_signal(signal.SIGKILL)
nats.wait()
time.sleep(outage)
while sum(1 for r in results if r[2] == 503) < 20:
    time.sleep(0.01)
restarted_at = time.time() - t0
nats = start_nats()
time.sleep(after)
stop = True
for t in threads:
    t.join()

health = json.load(urllib.request.urlopen(f"{base}/api/health", timeout=5))
statuses = {}
for r in results:
    statuses[str(r[2])] = statuses.get(str(r[2]), 0) + 1
print(f"killed at {killed_at:.2f} s, restarted at {restarted_at:.2f} s; statuses {statuses}; "
      f"events {health.get('events')} against {statuses.get('200', 0)} answered 200")
for r in results:
    if r[4] > 0.3:
        print(f"  slow write: writer {r[0]} #{r[1]} status {r[2]} started {r[3]:.3f} s took {r[4]:.3f} s")
server.terminate()
nats.terminate()
server.wait()
nats.wait()
