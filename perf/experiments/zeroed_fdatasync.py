"""4 KiB write + fdatasync into three kinds of file, back to back and paced at 200/s.

append: the file grows with every write (fdatasync also writes the inode);
zeroed: zeros were written (and synced) over the whole range first, so writes overwrite;
fallocate: posix_fallocate reserved the range (unwritten extents: the first write into a block
still changes metadata).

    python3 perf/experiments/zeroed_fdatasync.py     # writes its files under target/

Prints p50/p99 in microseconds per mode, three rounds interleaved. Behind decision 0006.
"""
import os, time, sys
def run(mode, n=3000, size=4096, pace=0.0):
    path = os.path.join(os.path.dirname(__file__), "..", "..", "target", f"probe-{mode}")
    fd = os.open(path, os.O_CREAT|os.O_TRUNC|os.O_WRONLY, 0o644)
    if mode == "zeroed":
        os.write(fd, b"\0" * (n*size + (1<<20))); os.fsync(fd); os.lseek(fd, 0, 0)
    if mode == "fallocate":
        os.posix_fallocate(fd, 0, n*size + (1<<20)); os.fsync(fd)
    buf = b"x" * size
    lat = []
    for i in range(n):
        t = time.perf_counter()
        os.write(fd, buf); os.fdatasync(fd)
        lat.append(time.perf_counter() - t)
        if pace: time.sleep(pace)
    os.close(fd); os.unlink(path)
    lat.sort()
    return lat[len(lat)//2]*1e6, lat[int(len(lat)*0.99)]*1e6
for r in range(3):
    for mode in ["append", "zeroed", "fallocate"]:
        print(mode, "b2b p50/p99 us %.0f %.0f" % run(mode), "paced %.0f %.0f" % run(mode, 600, pace=0.005))
