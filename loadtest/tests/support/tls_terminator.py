"""A TLS terminator in front of a plain-HTTP Flux, as a deployment would put one: the
generator's and the CLI's https:// tests talk TLS to it (through tls_terminator.rs, which runs
it as `python3 -c`), and it forwards the bytes to Flux unchanged.

usage: tls_terminator.py CERT KEY UPSTREAM_PORT SECONDS
Prints the port it listens on (127.0.0.1), then serves until SECONDS have passed.
"""

import asyncio
import ssl
import sys


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def main():
    cert, key, upstream, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    async def handle(client_reader, client_writer):
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", upstream)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer)
        )

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(seconds)


asyncio.run(main())
