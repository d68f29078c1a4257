# The Python example from the public docs ("Python example"), unchanged but for two things:
# the URL comes from argv[1] instead of the public instance, and the run is bounded by
# argv[2] seconds (asyncio.wait_for) so a test can never hang on it.
import asyncio, json, sys
import websockets

URL = sys.argv[1]
TIMEOUT_SECONDS = float(sys.argv[2])


async def subscribe():
    url = URL
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({
            "type": "subscribe",
            "entity_id": "myns/*"
        }))
        async for msg in ws:
            event = json.loads(msg)
            if event["type"] == "state_update":
                print(f"{event['entity_id']}.{event['property']} = {event['value']}")


async def bounded():
    try:
        await asyncio.wait_for(subscribe(), timeout=TIMEOUT_SECONDS)
    except asyncio.TimeoutError:
        pass


asyncio.run(bounded())
