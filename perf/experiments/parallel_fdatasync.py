"""Do concurrent fdatasyncs on one file overlap on this disk? (standard library only)

Usage: python3 perf/experiments/parallel_fdatasync.py [DIR] [BYTES] [APPENDS]
       (defaults target/tmp, 4096, 1000)

1, 2 and 4 threads each append BYTES and fdatasync the same file, APPENDS appends in all per
configuration, twice over; prints syncs/s, MB/s and the p50 of one append + sync. If syncs/s
does not grow with threads, a second group commit in flight would not raise the log's
throughput. BYTES 270000 is one group commit of ingest-batch (~1,400 records of ~194 bytes).
"""
import os
import sys
import threading
import time

directory = sys.argv[1] if len(sys.argv) > 1 else "target/tmp"
os.makedirs(directory, exist_ok=True)
path = os.path.join(directory, f"parallel_fdatasync.{os.getpid()}.tmp")
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o644)
size = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
appends = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
block = b"x" * size


def worker(count, out):
    for _ in range(count):
        started = time.perf_counter()
        os.write(fd, block)
        os.fdatasync(fd)
        out.append(time.perf_counter() - started)


try:
    for threads in (1, 2, 4, 1, 2, 4):
        latencies = []
        workers = [threading.Thread(target=worker, args=(appends // threads, latencies))
                   for _ in range(threads)]
        started = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - started
        latencies.sort()
        print(f"{threads} threads: {len(latencies) / elapsed:.0f} syncs/s, "
              f"{len(latencies) * size / elapsed / 1e6:.0f} MB/s, "
              f"p50 {latencies[len(latencies) // 2] * 1e6:.0f} us")
finally:
    os.close(fd)
    os.unlink(path)
