"""Opens 5 WebSocket connections and sends each 1,100 subscriptions to 60 KB patterns: what a
public reader can make the server hold in subscriptions (perf/README, session 19). Prints the
first reply of the first connection; read the server's VmRSS (/proc/PID/status) after.

    python3 perf/experiments/long_subscriptions.py PORT
"""
import asyncio
import json
import sys

import websockets

port = int(sys.argv[1])


async def main():
    connections = []
    for c in range(5):
        ws = await websockets.connect(f"ws://127.0.0.1:{port}/api/ws", max_size=None)
        for i in range(1100):
            pattern = f"{i}-{c}-" + "x" * 60000
            await ws.send(json.dumps({"type": "subscribe", "entity_id": pattern}))
        connections.append(ws)
    await asyncio.sleep(1)
    print(str(await asyncio.wait_for(connections[0].recv(), 5))[:200])

asyncio.run(main())
