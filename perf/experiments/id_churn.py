"""Creates and deletes entities as fast as one keep-alive connection allows, in batches of 200
(POST /api/events/batch, then POST /api/state/entities/delete with their ids), for a while.
Measures what a churn of short-lived ids leaves in the server's memory once retention drops
their records (perf/README, session 19).

    python3 perf/experiments/id_churn.py PORT SECONDS [TAG]

Then read the server's VmRSS (/proc/PID/status) and `flux_deleted_entity_ids` (/metrics) every
few seconds. Session 19 ran the server with
`--retention 10s --segment-bytes 4194304 --snapshot-interval 2s`.
"""
import http.client
import json
import sys
import time

port, seconds = int(sys.argv[1]), float(sys.argv[2])
tag = sys.argv[3] if len(sys.argv) > 3 else "e"
conn = http.client.HTTPConnection("127.0.0.1", port)


def post(path, body):
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    text = reply.read()
    if reply.status != 200 or b'"failed":0' not in text:
        sys.exit(f"{path}: {reply.status} {text[:200]!r}")


done, started = 0, time.time()
while time.time() - started < seconds:
    ids = [f"churn/{tag}{done + k}" for k in range(200)]
    post("/api/events/batch", [
        {"stream": "s", "source": "c", "timestamp": 1764000000000,
         "payload": {"entity_id": i, "properties": {"v": 1}}} for i in ids])
    post("/api/state/entities/delete", {"entity_ids": ids})
    done += len(ids)
print(f"created and deleted {done} ids in {time.time() - started:.1f} s")
