"""Interleaved first and second `GET /api/state/entities` (ms) of two `flux` builds, each on a
fresh server holding the suite's 100,000 entities x 5 properties, read whole with http.client as
perf/suite.py does. Run from the repository root after `cargo build --release -p flux-loadtest`:

    python3 perf/experiments/list_ab.py OLD_FLUX NEW_FLUX ROUNDS

Prints one line per round: `old [first, second] new [first, second]`.
"""
import http.client
import shutil
import socket
import subprocess
import sys
import tempfile
import time

GENERATOR = "target/release/flux-loadtest"
ENTITIES = 100_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, timeout: float) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


def run(binary: str) -> list[float]:
    """The two listings' times (ms) on a fresh server of `binary` holding the entities."""
    port, data = free_port(), tempfile.mkdtemp()
    server = subprocess.Popen(
        [binary, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                get(port, "/api/health", 1)
                break
            except OSError:
                time.sleep(0.05)
        # The suite's populate: one event for each of the entities, batches of 1,000.
        subprocess.run(
            [GENERATOR, "ingest-batch", "--connections", "4", "--batch", "1000", "--props", "5",
             "--entities", str(ENTITIES), "--rate", str(ENTITIES), "--duration", "1",
             "--warmup", "0", "--drop-after-ms", "120000", "--timeout-ms", "60000",
             "--url", f"http://127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120, check=True)
        time.sleep(4)  # as the suite waits (its two RSS samples) before listing
        times = []
        for _ in range(2):
            started = time.perf_counter()
            get(port, "/api/state/entities", 60)
            times.append(round((time.perf_counter() - started) * 1000, 1))
            time.sleep(0.2)
        return times
    finally:
        server.terminate()
        server.wait(timeout=15)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    old, new, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    for _ in range(rounds):
        print("old", run(old), "new", run(new), flush=True)
