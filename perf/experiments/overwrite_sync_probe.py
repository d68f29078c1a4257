"""Paced appends into a zero-filled, synced file (a spare segment): fdatasync of the file against
sync_file_range of the appended bytes + fdatasync of the directory (a cache flush with nothing of
its own to write; engine/src/log/overwrite.rs). Standard library only.

Usage: python3 perf/experiments/overwrite_sync_probe.py DIR APPENDS RATE BYTES [DEVICE]
       python3 perf/experiments/overwrite_sync_probe.py target/tmp 1200 200 200 vda

Runs APPENDS/2 appends of BYTES each way, twice, interleaved, paced at RATE a second. Prints p50
and p99 of one append + sync and the device's write requests and flushes per sync, from
/sys/block/DEVICE/stat (fields 5 and 16) around each way.
"""
import os, sys, time
d = sys.argv[1]; n = int(sys.argv[2]); rate = float(sys.argv[3]); size = int(sys.argv[4])
device = sys.argv[5] if len(sys.argv) > 5 else "vda"
path = os.path.join(d, "sfr.tmp")
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
os.write(fd, b"\0" * (n * size + 8192)); os.fsync(fd)
dfd = os.open(d, os.O_RDONLY)
os.fsync(dfd)
def stat():
    f = open(f"/sys/block/{device}/stat").read().split()
    return int(f[4]), int(f[15]) if len(f) > 15 else 0  # writes completed, flushes completed
import ctypes
libc = ctypes.CDLL("libc.so.6", use_errno=True)
libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
SFR = 1 | 2 | 4
def sync_file_range(fd, off, n, flags):
    if libc.sync_file_range(fd, off, n, flags) != 0:
        raise OSError(ctypes.get_errno(), "sync_file_range")
res = {}
for mode in ("fdatasync", "sfr+dirsync", "fdatasync", "sfr+dirsync"):
    lat = []; off = 0
    w0, f0 = stat()
    due = time.perf_counter()
    for i in range(n // 2):
        due += 1 / rate
        while time.perf_counter() < due: pass
        t = time.perf_counter()
        os.pwrite(fd, b"x" * size, off)
        if mode == "fdatasync":
            os.fdatasync(fd)
        else:
            sync_file_range(fd, off, size, SFR)
            os.fdatasync(dfd)
        lat.append(time.perf_counter() - t)
        off += size
    w1, f1 = stat()
    lat.sort()
    print(f"{mode:12s} p50 {lat[len(lat)//2]*1e6:6.0f} us p99 {lat[int(len(lat)*.99)]*1e6:6.0f} us  writes/sync {(w1-w0)/len(lat):.2f} flushes/sync {(f1-f0)/len(lat):.2f}")
os.close(fd); os.unlink(path)
