#!/usr/bin/env python3
"""A durable append two ways, interleaved and paced: `pwrite` + `fdatasync` against one
`pwritev2(RWF_DSYNC)`, into a file of zeros written and synced first (as a spare log segment).

    python3 perf/experiments/dsync_probe.py [DIR] [APPENDS] [BYTES] [RATE]
    python3 perf/experiments/dsync_probe.py target/tmp 600 200 200

Prints p50/p99 in µs of each. DIR must be on the disk under test; the file is removed after.
"""
import os
import sys
import time

directory = sys.argv[1] if len(sys.argv) > 1 else "target/tmp"
appends = int(sys.argv[2]) if len(sys.argv) > 2 else 600
size = int(sys.argv[3]) if len(sys.argv) > 3 else 200
rate = float(sys.argv[4]) if len(sys.argv) > 4 else 200.0

os.makedirs(directory, exist_ok=True)
path = os.path.join(directory, f"dsync_probe.{os.getpid()}.tmp")
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
try:
    os.write(fd, b"\0" * (appends * 2 * size + 4096))
    os.fsync(fd)
    data = b"x" * size
    two_calls, one_call = [], []
    offset = 0
    for i in range(appends * 2):
        started = time.perf_counter_ns()
        if i % 2 == 0:
            os.pwrite(fd, data, offset)
            os.fdatasync(fd)
            two_calls.append(time.perf_counter_ns() - started)
        else:
            os.pwritev(fd, [data], offset, os.RWF_DSYNC)
            one_call.append(time.perf_counter_ns() - started)
        offset += size
        if rate > 0:
            time.sleep(1 / rate)
finally:
    os.close(fd)
    os.unlink(path)


def quantile(samples, q):
    samples = sorted(samples)
    return samples[int(len(samples) * q)] / 1000


for name, samples in (("pwrite + fdatasync", two_calls), ("pwritev2 RWF_DSYNC", one_call)):
    print(f"{name:20} p50 {quantile(samples, 0.5):.0f} µs  p99 {quantile(samples, 0.99):.0f} µs")
