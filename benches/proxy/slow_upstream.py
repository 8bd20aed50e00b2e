#!/usr/bin/env python3
"""A slow HTTP/1.1 upstream on 127.0.0.1:PORT: every request is answered
`200 ok` DELAY seconds after its head arrived, on keep-alive connections.

Usage: slow_upstream.py PORT DELAY COUNT_FILE SECONDS

Writes the number of connections accepted so far to COUNT_FILE twice a
second, and exits after SECONDS (bounded). Request bodies are not read:
the benchmark sends GETs only.
"""

import asyncio
import sys

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def main(port, delay, count_file, seconds):
    accepted = 0

    async def serve(reader, writer):
        nonlocal accepted
        accepted += 1
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                await asyncio.sleep(delay)
                writer.write(ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def report():
        while True:
            with open(count_file, "w", encoding="ascii") as f:
                f.write(str(accepted))
            await asyncio.sleep(0.5)

    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=4096)
    reporter = asyncio.create_task(report())
    async with server:
        await asyncio.sleep(seconds)
    reporter.cancel()


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    asyncio.run(
        main(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], min(float(sys.argv[4]), 600))
    )
