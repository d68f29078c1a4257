"""Updates NENT entities for SECONDS from 3 connections (batches of 1,000 events), each event
with a new `source` name: what tracking active publishers costs when every event comes from
a publisher never seen before (perf/README, session 19). Needs aiohttp.

    python3 perf/experiments/source_churn.py PORT SECONDS [NENT]

Then read the server's VmRSS (/proc/PID/status) and VmHWM, scraping /metrics now and then
(the scrape is what forgets publishers quiet for 60 s).
"""
import asyncio
import itertools
import sys
import time

import aiohttp

port, seconds = int(sys.argv[1]), float(sys.argv[2])
entities = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
counter = itertools.count()


async def main():
    started, sent = time.time(), 0
    async with aiohttp.ClientSession() as session:
        async def worker():
            nonlocal sent
            while time.time() - started < seconds:
                events = []
                for _ in range(1000):
                    n = next(counter)
                    events.append({"stream": "s", "source": f"src-{n}",
                                   "timestamp": 1764000000000 + n,
                                   "payload": {"entity_id": f"upd/e{n % entities:06d}",
                                               "properties": {"k": n, "t": "abc"}}})
                url = f"http://127.0.0.1:{port}/api/events/batch"
                async with session.post(url, json=events) as reply:
                    body = await reply.json()
                    if reply.status != 200 or body["failed"]:
                        sys.exit(f"{reply.status} {str(body)[:200]}")
                sent += len(events)
        await asyncio.gather(*[worker() for _ in range(3)])
    print(f"sent {sent} events in {time.time() - started:.1f} s")

asyncio.run(main())
