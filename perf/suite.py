#!/usr/bin/env python3
"""The standard performance suite of Flux (issue 5): Python 3.11, standard library only.

Run it through perf/run-suite.sh, which builds the release binaries first. For every run this
starts a fresh `flux serve` on a free loopback port with a fresh data directory under
target/perf-data/, waits for its "listening on http://" line, runs one `flux-loadtest`
scenario with --server-pid, stops the server (SIGTERM, then SIGKILL after a bound) and keeps the
generator's JSON result. Runs are interleaved (run 1 of every scenario, then run 2, ...) so a
noisy minute on a shared machine does not land on all runs of one scenario.

The report goes to perf/reports/<YYYY-MM-DD>-<short commit>.md, the raw JSON to
perf/reports/<same name>/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "perf" / "reports"
DATA_ROOT = ROOT / "target" / "perf-data"

ORDER = ["ingest-batch", "ingest", "e2e-1", "e2e-100", "fanout-1000-200", "fanout-1000-1000",
         "publish-1000", "connections", "memory-list", "recovery"]
MB = 1_000_000  # goals in MB are decimal megabytes
KIB = 1024

# ---------------------------------------------------------------------------------------------
# Process bookkeeping: everything started here is a session leader, recorded, and killed at exit.
# ---------------------------------------------------------------------------------------------


class Reaper:
    """Remembers every process the suite starts and kills the leftovers."""

    def __init__(self, pid_file: Path | None):
        self.pid_file = pid_file
        self.pids: set[int] = set()
        self.popens: list[subprocess.Popen] = []

    def add(self, pid: int, popen: subprocess.Popen | None = None) -> None:
        self.pids.add(pid)
        if popen is not None:
            self.popens.append(popen)
        if self.pid_file is not None:
            with open(self.pid_file, "a") as f:
                f.write(f"{pid}\n")

    def kill_all(self) -> None:
        for pid in sorted(self.pids):
            if alive(pid) and ours(pid):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
        for p in self.popens:
            try:
                p.wait(timeout=5)
            except Exception:
                pass


REAPER: Reaper


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def ours(pid: int) -> bool:
    """True when `pid` runs one of the suite's copied binaries (guards against pid reuse)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"perf-data" in f.read()
    except OSError:
        return False


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(cmd: str, timeout: float = 60) -> str:
    try:
        return subprocess.run(
            cmd, shell=True, capture_output=True, text=True, timeout=timeout, cwd=ROOT
        ).stdout.strip()
    except subprocess.TimeoutExpired:
        return ""


class Server:
    """One `flux serve` on a free port with its own data directory."""

    def __init__(self, binary: Path, data_dir: Path, log_path: Path):
        self.binary = binary
        self.data_dir = data_dir
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        # A server restarted by the recovery scenario's --restart-cmd (not our child).
        self.restart_pid_file = data_dir.parent / (data_dir.name + ".restarted.pid")
        self.exit_note = ""

    def argv(self) -> list[str]:
        return [
            str(self.binary), "serve",
            "--listen", f"127.0.0.1:{self.port}",
            "--data-dir", str(self.data_dir),
        ]

    def start(self, timeout: float = 30) -> None:
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=ROOT,
        )
        log.close()
        self.pid = self.proc.pid
        REAPER.add(self.pid, self.proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flux serve exited with {self.proc.returncode}: {self.tail()}")
            if b"listening on http://" in self.log_path.read_bytes():
                return
            time.sleep(0.02)
        raise RuntimeError(f"flux serve did not print its listening line in {timeout}s")

    def tail(self, n: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-n:])
        except OSError:
            return ""

    def restart_cmd(self) -> str:
        """kill -9 the running server, wait until it is gone, start it again on the same
        data dir in the background and record its pid; returns at once."""
        pid = self.current_pid()
        argv = " ".join(self.argv())
        return (
            f"kill -9 {pid}; "
            # Gone = no such process, or a zombie whose every thread has exited: the leader turns
            # Z while a thread may still sit in fdatasync holding the data dir's LOCK.
            f"while [ -e /proc/{pid} ] && {{ [ \"$(cut -d' ' -f3 /proc/{pid}/stat 2>/dev/null)\" != Z ] "
            f"|| [ \"$(ls /proc/{pid}/task 2>/dev/null | wc -l)\" -gt 1 ]; }}; "
            f"do sleep 0.002; done; "
            f"nohup {argv} </dev/null >>{self.log_path} 2>&1 & echo $! >{self.restart_pid_file}"
        )

    def current_pid(self) -> int | None:
        if self.restart_pid_file.exists():
            text = self.restart_pid_file.read_text().strip()
            if text.isdigit():
                return int(text)
        return self.pid

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM every incarnation, SIGKILL what is left after `timeout`."""
        notes = []
        pids = []
        if self.restart_pid_file.exists():
            text = self.restart_pid_file.read_text().strip()
            if text.isdigit():
                pids.append(int(text))
                REAPER.add(int(text))
        if self.pid is not None:
            pids.append(self.pid)
        for pid in pids:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGTERM)
                except OSError:
                    pass
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        for pid in pids:
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if alive(pid):
                notes.append(f"pid {pid} ignored SIGTERM for {timeout}s: killed")
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if self.proc is not None:
            try:
                code = self.proc.wait(timeout=5)
                if code not in (0, -9):
                    notes.append(f"exit code {code}")
            except subprocess.TimeoutExpired:
                pass
        notes.append(f"stopped in {time.monotonic() - started:.2f}s")
        self.exit_note = "; ".join(notes)


def run_generator(binary: Path, argv: list[str], timeout: float, stderr_path: Path) -> tuple[dict, str]:
    """Runs flux-loadtest in its own session; returns (parsed JSON, raw stdout line)."""
    with open(stderr_path, "ab") as err:
        proc = subprocess.Popen(
            [str(binary), *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=err, start_new_session=True, cwd=ROOT,
        )
        REAPER.add(proc.pid, proc)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.communicate()
            raise RuntimeError(f"flux-loadtest timed out after {timeout:.0f}s (killed)")
    text = out.decode(errors="replace").strip()
    if proc.returncode != 0:
        detail = stderr_path.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"flux-loadtest exited with {proc.returncode}: {' | '.join(detail)}")
    line = text.splitlines()[-1] if text else ""
    return json.loads(line), line


# Counters the report reads after a run (whole server lifetime, warmup and sync included).
SCRAPED = ["flux_websocket_writes_total", "flux_websocket_frames_queued_total",
           "flux_events_accepted_total", "flux_log_fsync_seconds_count", "flux_log_fsync_seconds_sum"]


def scrape_metrics(url: str) -> dict:
    """The SCRAPED samples of the server's /metrics (those it has)."""
    host, port = url.removeprefix("http://").split(":")
    try:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode(errors="replace")
        conn.close()
    except OSError as e:
        return {"error": str(e)}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in SCRAPED:
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


# ---------------------------------------------------------------------------------------------
# Machine, disk and CPU reference.
# ---------------------------------------------------------------------------------------------


def machine_info() -> dict:
    info = {
        "nproc": sh("nproc"),
        "cpu_model": sh("lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1"),
        "kernel": sh("uname -r"),
        "ram": sh("free -h | awk '/^Mem:/ {print $2}'"),
        "ram_kib": sh("awk '/MemTotal/ {print $2}' /proc/meminfo"),
        "data_fs": sh(f"findmnt -no SOURCE,FSTYPE,OPTIONS -T {DATA_ROOT}"),
        "tmp_fs": sh("findmnt -no FSTYPE -T /tmp"),
        "rustc": sh("rustc --version"),
        "python": sys.version.split()[0],
        "ulimit_nofile": sh("ulimit -n"),
    }
    return info


def git_info() -> dict:
    commit = sh("git rev-parse HEAD")
    short = sh("git rev-parse --short HEAD")
    status = sh("git status --porcelain")
    return {
        "commit": commit,
        "short": short,
        "subject": sh("git log -1 --format=%s"),
        "dirty": bool(status),
        "dirty_files": status.splitlines(),
    }


def cpu_reference() -> float:
    start = time.monotonic()
    subprocess.run(
        "head -c 1G /dev/zero | sha256sum", shell=True, check=True, stdout=subprocess.DEVNULL,
        timeout=300,
    )
    return time.monotonic() - start


FSYNC_RE = re.compile(r"p50 (\d+) us, p99 (\d+) us, max (\d+) us, mean (\d+) us")


def fsync_probe(binary: Path, directory: Path, repeats: int, rate: int = 0) -> dict:
    """`rate` > 0 paces the appends (per second) like a rate-limited run; 0 is back to back."""
    out = subprocess.run(
        [str(binary), str(directory), str(repeats), "4096", "append", str(rate)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    m = FSYNC_RE.search(out.stdout)
    if not m:
        raise RuntimeError(f"fsync_probe output not understood: {out.stdout!r} {out.stderr!r}")
    p50, p99, mx, mean = (int(x) for x in m.groups())
    return {"p50_us": p50, "p99_us": p99, "max_us": mx, "mean_us": mean, "line": out.stdout.strip()}


# ---------------------------------------------------------------------------------------------
# The scenarios.
# ---------------------------------------------------------------------------------------------


# e2e runs publish this many events per second; the paced fdatasync probe before an e2e
# 1-subscriber run uses the same pace (E2E_PACED_PROBES appends, 3 s).
E2E_RATE = 200
E2E_PACED_PROBES = 600


class Suite:
    def __init__(self, opts, bins: dict[str, Path], work: Path, raw_dir: Path):
        self.opts = opts
        self.bins = bins
        self.work = work
        self.raw_dir = raw_dir
        self.runs: dict[str, list[dict]] = {}
        self.commands: dict[str, str] = {}
        self.fsync_adjacent: list[dict] = []

    def timing(self) -> list[str]:
        return ["--duration", str(self.opts.duration), "--warmup", str(self.opts.warmup)]

    def scenarios(self) -> list[tuple[str, callable]]:
        o = self.opts
        gen = self.generator_run
        return [
            ("ingest-batch", lambda i: gen("ingest-batch", i, [
                "ingest-batch", "--connections", "4", "--batch", "1000", "--props", "5",
                *self.timing()], self.opts.duration + self.opts.warmup + 60)),
            ("ingest", lambda i: gen("ingest", i, [
                "ingest", "--connections", "32", *self.timing()],
                self.opts.duration + self.opts.warmup + 60, profile=i == o.runs)),
            ("e2e-1", lambda i: gen("e2e-1", i, [
                "e2e", "--subscribers", "1", "--rate", "200", *self.timing()],
                self.opts.duration + self.opts.warmup + 90, fsync_before=True)),
            ("e2e-100", lambda i: gen("e2e-100", i, [
                "e2e", "--subscribers", "100", "--rate", "200", *self.timing()],
                self.opts.duration + self.opts.warmup + 90)),
            ("fanout-1000-200", lambda i: gen("fanout-1000-200", i, [
                "fanout", "--subscribers", "1000", "--rate", "200", *self.timing()],
                self.opts.duration + self.opts.warmup + 120, profile=i == o.runs)),
            ("fanout-1000-1000", lambda i: gen("fanout-1000-1000", i, [
                "fanout", "--subscribers", "1000", "--rate", "1000", *self.timing()],
                self.opts.duration + self.opts.warmup + 120)),
            # No goal: fanout-1000-1000's publisher alone (the same requests, no subscriber),
            # to split that run's server CPU between the publish path and the writes.
            ("publish-1000", lambda i: gen("publish-1000", i, [
                "ingest", "--connections", "1", "--rate", "1000", *self.timing()],
                self.opts.duration + self.opts.warmup + 60)),
            ("connections", lambda i: gen("connections", i, [
                "connections", "--connections", str(o.connections), "--hold", str(o.hold)],
                o.hold + 150)),
            ("memory-list", self.memory_list_run),
            ("recovery", self.recovery_run),
        ]

    def record(self, key: str, run: dict) -> None:
        self.runs.setdefault(key, []).append(run)
        with open(self.raw_dir / f"{key}-run{run['run']}.suite.json", "w") as f:
            json.dump(run, f, indent=1, sort_keys=True)

    def new_server(self, key: str, i: int) -> Server:
        name = f"{key}-run{i}"
        return Server(self.bins["flux"], self.work / name, self.raw_dir / f"{name}.server.log")

    def generator_run(self, key: str, i: int, argv: list[str], timeout: float,
                      fsync_before: bool = False, profile: bool = False) -> None:
        run = {"run": i, "load_before": loadavg()}
        if fsync_before:
            try:
                run["fsync"] = fsync_probe(self.bins["fsync_probe"], self.work / "fsync", self.opts.fsync_repeats)
                # The same appends paced like the run (200/s): on this VM an fdatasync after 5 ms
                # idle takes about twice as long as one back to back.
                run["fsync_paced"] = fsync_probe(self.bins["fsync_probe"], self.work / "fsync",
                                                 E2E_PACED_PROBES, E2E_RATE)
                self.fsync_adjacent.append({**run["fsync"], "paced": run["fsync_paced"]})
            except Exception as e:  # noqa: BLE001
                run["fsync_error"] = str(e)
        server = self.new_server(key, i)
        self.commands.setdefault(key, "flux-loadtest " + " ".join(argv)
                                 + " --url http://127.0.0.1:<port> --server-pid <pid>")
        try:
            server.start()
            full = [*argv, "--url", server.url, "--server-pid", str(server.pid)]
            run["argv"] = full
            started = time.monotonic()
            profiler = None
            if profile:
                profiler = threading.Thread(target=lambda: run.update(profile=self.profile_server(
                    key, server.pid, self.opts.warmup + 0.5, max(1.0, self.opts.duration - 1.5))))
                profiler.start()
            result, line = run_generator(self.bins["flux-loadtest"], full, timeout,
                                         self.raw_dir / f"{key}-run{i}.stderr.log")
            if profiler:
                profiler.join()
            run["wall_s"] = round(time.monotonic() - started, 3)
            (self.raw_dir / f"{key}-run{i}.json").write_text(line + "\n")
            run["result"] = result
            run["metrics"] = scrape_metrics(server.url)
            if not alive(server.pid):
                run["error"] = f"the server died during the run: {server.tail()}"
        except Exception as e:  # noqa: BLE001
            run["error"] = str(e)
        finally:
            server.stop()
            run["server_stop"] = server.exit_note
            run["load_after"] = loadavg()
            shutil.rmtree(server.data_dir, ignore_errors=True)
        self.record(key, run)

    def profile_server(self, key: str, pid: int, after: float, seconds: float) -> dict:
        """`perf record` of the server for `seconds`, `after` seconds into the run: the share of
        samples per binary (kernel vs flux) and the top symbols, as text and parsed."""
        time.sleep(after)
        data = self.work / f"{key}.perf.data"
        try:
            rec = subprocess.run(["perf", "record", "-q", "-F", "499", "-p", str(pid), "-o", str(data),
                                  "--", "sleep", f"{seconds:.1f}"],
                                 capture_output=True, text=True, timeout=seconds + 30)
            if rec.returncode != 0 or not data.exists():
                return {"error": f"perf record failed: {rec.stderr.strip()[-200:]}"}
            out = {"seconds": round(seconds, 1), "frequency_hz": 499}
            for sort, limit in [("dso", "1"), ("sym", "1.5")]:
                text = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--sort", sort,
                                       "--percent-limit", limit],
                                      capture_output=True, text=True, timeout=120).stdout
                (self.raw_dir / f"{key}-profile-{sort}.txt").write_text(text)
                rows = []
                for line in text.splitlines():
                    m = re.match(r"\s*([\d.]+)%\s+(.*\S)", line)
                    if m and not line.lstrip().startswith("#"):
                        rows.append([float(m.group(1)), m.group(2)])
                samples = re.search(r"# Samples: (\S+)", text)
                out[sort] = rows[:12]
                out["samples"] = samples.group(1) if samples else None
            return out
        except (OSError, subprocess.TimeoutExpired) as e:
            return {"error": f"perf unavailable: {e}"}
        finally:
            data.unlink(missing_ok=True)

    # -- memory with 100,000 entities x 5 props, then list them all --------------------------

    def memory_list_run(self, i: int) -> None:
        key = "memory-list"
        n = self.opts.entities
        run = {"run": i, "load_before": loadavg(), "entities": n}
        server = self.new_server(key, i)
        # Open loop at n events/s for 1 s, batches of 1,000: exactly n/1000 requests are due
        # inside the window and every one of them is sent (none dropped), so exactly n events
        # reach exactly n entities (`loadtest/dev-<seq mod n>`), one event each.
        argv = ["ingest-batch", "--connections", "4", "--batch", "1000", "--props", "5",
                "--entities", str(n), "--rate", str(n), "--duration", "1", "--warmup", "0",
                "--drop-after-ms", "120000", "--timeout-ms", "60000"]
        self.commands.setdefault(key, "flux-loadtest " + " ".join(argv)
                                 + " --url http://127.0.0.1:<port> --server-pid <pid>; "
                                 "then VmRSS 1 s and 4 s later; then GET /api/state/entities twice "
                                 "(http.client, whole body, server VmRSS sampled every ~1 ms)")
        try:
            server.start()
            time.sleep(0.5)
            run["rss_fresh_bytes"] = rss_bytes(server.pid)
            full = [*argv, "--url", server.url, "--server-pid", str(server.pid)]
            run["argv"] = full
            result, line = run_generator(self.bins["flux-loadtest"], full, 180,
                                         self.raw_dir / f"{key}-run{i}.stderr.log")
            (self.raw_dir / f"{key}-run{i}.json").write_text(line + "\n")
            run["result"] = result
            if result.get("events") != n or result.get("errors_by_status"):
                run["error"] = (f"populate accepted {result.get('events')} of {n} events, "
                                f"errors {result.get('errors_by_status')}")
            time.sleep(1.0)
            run["rss_populated_bytes"] = rss_bytes(server.pid)
            time.sleep(3.0)
            run["rss_populated_later_bytes"] = rss_bytes(server.pid)
            run["lists"] = [self.list_all(server) for _ in range(2)]
            listed = run["lists"][0].get("entities")
            if listed is not None and listed < n:
                run["error"] = f"the list returned {listed} entities, expected at least {n}"
        except Exception as e:  # noqa: BLE001
            run["error"] = str(e)
        finally:
            server.stop()
            run["server_stop"] = server.exit_note
            run["load_after"] = loadavg()
            shutil.rmtree(server.data_dir, ignore_errors=True)
        self.record(key, run)

    def list_all(self, server: Server) -> dict:
        pid = server.pid
        before = rss_bytes(pid)
        peak = [before or 0]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                r = rss_bytes(pid)
                if r is not None and r > peak[0]:
                    peak[0] = r
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("GET", "/api/state/entities")
        resp = conn.getresponse()
        body = resp.read()
        elapsed = time.perf_counter() - started
        conn.close()
        time.sleep(0.2)
        stop.set()
        sampler.join()
        after = rss_bytes(pid)
        out = {
            "status": resp.status,
            "seconds": round(elapsed, 4),
            "body_bytes": len(body),
            "rss_before_bytes": before,
            "rss_peak_bytes": peak[0],
            "rss_after_bytes": after,
            "rss_peak_growth_bytes": (peak[0] - before) if before else None,
            "rss_after_growth_bytes": (after - before) if before and after else None,
        }
        try:
            entities = json.loads(body)
            out["entities"] = len(entities)
            out["loadtest_entities"] = sum(
                1 for e in entities if str(e.get("id", "")).startswith("loadtest/dev-"))
        except ValueError as e:
            out["parse_error"] = str(e)
        return out

    # -- recovery after kill -9 ---------------------------------------------------------------

    def recovery_run(self, i: int) -> None:
        key = "recovery"
        events = self.opts.recovery_events
        entities = 10_000
        run = {"run": i, "load_before": loadavg()}
        server = self.new_server(key, i)
        self.commands.setdefault(
            key, f"flux-loadtest recovery --events {events} --batch 1000 --connections 4 "
                 f"--entities {entities} --url http://127.0.0.1:<port> --server-pid <pid> "
                 "--restart-cmd 'kill -9 <pid>; <wait until gone>; nohup flux serve <same "
                 "--listen and --data-dir> &'")
        try:
            server.start()
            argv = ["recovery", "--events", str(events), "--batch", "1000", "--connections", "4",
                    "--entities", str(entities), "--restart-timeout", "120",
                    "--url", server.url, "--server-pid", str(server.pid),
                    "--restart-cmd", server.restart_cmd()]
            run["argv"] = argv
            result, line = run_generator(self.bins["flux-loadtest"], argv, 900,
                                         self.raw_dir / f"{key}-run{i}.stderr.log")
            (self.raw_dir / f"{key}-run{i}.json").write_text(line + "\n")
            run["result"] = result
            run["verify"] = self.verify_recovery(server, result, events, entities)
        except Exception as e:  # noqa: BLE001
            run["error"] = str(e)
        finally:
            server.stop()
            run["server_stop"] = server.exit_note
            run["load_after"] = loadavg()
            shutil.rmtree(server.data_dir, ignore_errors=True)
            server.restart_pid_file.unlink(missing_ok=True)
        self.record(key, run)

    def verify_recovery(self, server: Server, result: dict, events: int, entities: int) -> dict:
        """Nothing lost: every acknowledged event is back. The generator's events are
        deterministic: event `s` goes to `loadtest/dev-<s mod entities>` with `p0 = s`, so after
        a complete replay entity n holds p0 = the last s with s mod entities = n, and its
        history holds events/entities events."""
        v: dict = {"acknowledged": result.get("events"), "expected": events}
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("GET", "/api/state/entities?prefix=loadtest/dev-")
        resp = conn.getresponse()
        body = resp.read()
        listed = json.loads(body) if resp.status == 200 else []
        last_seq = {}
        for s in range(max(0, events - entities), events):
            last_seq[f"loadtest/dev-{s % entities}"] = s
        wrong = []
        for e in listed:
            want = last_seq.get(e.get("id"))
            p0 = (e.get("properties") or {}).get("p0")
            got = p0.get("value") if isinstance(p0, dict) else p0
            if want is not None and got != want:
                wrong.append((e.get("id"), got, want))
        v["entities_listed"] = len(listed)
        v["entities_expected"] = len(last_seq)
        v["entities_with_wrong_last_value"] = len(wrong)
        v["wrong_examples"] = wrong[:5]
        per_entity = events // entities
        sample_ids = [0, 1, entities // 2, entities - 1]
        history = {}
        for n in sample_ids:
            conn.request("GET", f"/api/events?entity=loadtest/dev-{n}&limit={min(500, per_entity + 10)}")
            r = conn.getresponse()
            data = r.read()
            try:
                parsed = json.loads(data)
                count = len(parsed if isinstance(parsed, list) else parsed.get("events", []))
            except ValueError:
                count = None
            history[f"loadtest/dev-{n}"] = count
        conn.close()
        v["history_expected_per_entity"] = per_entity if per_entity <= 500 else None
        v["history_counts"] = history
        v["history_ok"] = (per_entity > 500 or all(c == per_entity for c in history.values()))
        v["nothing_lost"] = (
            result.get("events") == events
            and not result.get("errors_by_status")
            and len(listed) == len(last_seq)
            and not wrong
            and v["history_ok"]
        )
        return v


# ---------------------------------------------------------------------------------------------
# Goals and the report.
# ---------------------------------------------------------------------------------------------


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def g(d, *path):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def fmt_num(v, unit="", digits=0):
    if v is None:
        return "–"
    return f"{v:,.{digits}f}{unit}"


def fmt_us_as_ms(us):
    return "–" if us is None else f"{us / 1000:.2f} ms"


def fmt_bytes(b):
    if b is None:
        return "–"
    if abs(b) >= MB:
        return f"{b / MB:.1f} MB"
    if abs(b) >= 10 * KIB:
        return f"{b / KIB:.0f} KiB"
    return f"{b / KIB:.2f} KiB"


def ok_runs(runs):
    return [r for r in runs if "result" in r and "error" not in r]


def gen_cpu_per_event(r):
    """Generator CPU is for the whole process (warmup and drain included): divide by the events
    it handled over warmup + duration, estimated from the measured throughput."""
    res = r["result"]
    cpu = g(res, "generator", "cpu_s")
    thr = res.get("throughput_events_per_s")
    p = res.get("params", {})
    span = (p.get("warmup") or 0) + (p.get("duration") or 0)
    if cpu is None or not thr or not span:
        return None
    return cpu * 1e6 / (thr * span)


def gen_cpu_per_frame(r):
    """Generator CPU over the whole process / every frame it received (warmup included)."""
    res = r["result"]
    cpu = g(res, "generator", "cpu_s")
    frames = g(res, "loss", "received")
    if cpu is None or not frames:
        return None
    return cpu * 1e6 / frames


class Goal:
    def __init__(self, name, run_key, goal_text):
        self.name = name
        self.run_key = run_key
        self.goal_text = goal_text
        self.rows = []  # (metric, median text, [run texts], met, by how much)

    def add(self, metric, values, fmt, met, by):
        self.rows.append((metric, fmt(med(values)) if values else "–",
                          [fmt(v) for v in values], met, by))

    def met(self):
        mets = [r[3] for r in self.rows if r[3] is not None]
        if not mets:
            return None
        return all(mets)


def ratio_text(value, limit, higher_is_better, unit_fmt):
    if value is None:
        return "no data"
    if higher_is_better:
        if value >= limit:
            return f"{value / limit:.2f}× the goal ({unit_fmt(value - limit)} above)"
        return f"{limit / value:.1f}× short ({unit_fmt(limit - value)} below)" if value > 0 else "nothing"
    if value <= limit:
        return f"{unit_fmt(limit - value)} under the limit ({value / limit:.0%} of it)"
    return f"{value / limit:.1f}× the limit ({unit_fmt(value - limit)} over)"


def evaluate(suite: Suite, fsync_main: dict) -> list[Goal]:
    R = suite.runs
    goals = []

    def res_values(key, *path):
        return [g(r["result"], *path) for r in ok_runs(R.get(key, []))]

    # ingest-batch
    gl = Goal("ingest-batch 4 conns × 1,000 events, 5 props", "ingest-batch", "≥ 1,000,000 events/s")
    v = res_values("ingest-batch", "throughput_events_per_s")
    m = med(v)
    gl.add("events/s", v, lambda x: fmt_num(x), None if m is None else m >= 1_000_000,
           ratio_text(m, 1_000_000, True, lambda x: f"{x:,.0f} events/s"))
    goals.append(gl)

    # ingest
    gl = Goal("ingest 32 conns, 1 event per request", "ingest",
              "≥ 100,000 events/s; server ≤ 5 µs CPU per request")
    v = res_values("ingest", "throughput_events_per_s")
    m = med(v)
    gl.add("events/s", v, lambda x: fmt_num(x), None if m is None else m >= 100_000,
           ratio_text(m, 100_000, True, lambda x: f"{x:,.0f} events/s"))
    v = res_values("ingest", "server", "cpu_us_per_event")
    m = med(v)
    gl.add("server CPU µs/request", v, lambda x: fmt_num(x, " µs", 2), None if m is None else m <= 5,
           ratio_text(m, 5, False, lambda x: f"{x:.2f} µs"))
    goals.append(gl)

    # e2e 1 subscriber: each run against the fdatasync probes taken just before it. The verdict
    # uses the probe paced like the run (200 appends/s); the back-to-back probe is shown beside it.
    gl = Goal("e2e 1 subscriber, 200 events/s", "e2e-1",
              "p50 ≤ fdatasync p50 + 0.1 ms, p99 ≤ fdatasync p99 + 0.2 ms")
    runs = ok_runs(R.get("e2e-1", []))
    p50 = [g(r["result"], "latency_us", "p50") for r in runs]
    p99 = [g(r["result"], "latency_us", "p99") for r in runs]
    f50 = [g(r, "fsync_paced", "p50_us") for r in runs]
    f99 = [g(r, "fsync_paced", "p99_us") for r in runs]
    b50 = [g(r, "fsync", "p50_us") or fsync_main.get("p50_us") for r in runs]
    b99 = [g(r, "fsync", "p99_us") or fsync_main.get("p99_us") for r in runs]
    lim50 = med([a + 100 for a in f50 if a is not None])
    lim99 = med([a + 200 for a in f99 if a is not None])
    blim50 = med([a + 100 for a in b50 if a is not None])
    blim99 = med([a + 200 for a in b99 if a is not None])
    m50, m99 = med(p50), med(p99)

    def against(m, lim, blim):
        if lim is None:
            return "no paced fsync data"
        text = f"limit {fmt_us_as_ms(lim)} (paced probe): " + ratio_text(m, lim, False, fmt_us_as_ms)
        if blim is not None:
            text += (f"; against the back-to-back probe, limit {fmt_us_as_ms(blim)}: "
                     + ratio_text(m, blim, False, fmt_us_as_ms))
        return text

    gl.add("delivery p50", p50, fmt_us_as_ms, None if m50 is None or lim50 is None else m50 <= lim50,
           against(m50, lim50, blim50))
    gl.add("delivery p99", p99, fmt_us_as_ms, None if m99 is None or lim99 is None else m99 <= lim99,
           against(m99, lim99, blim99))
    gl.rows.append(("fdatasync p50 / p99 paced at 200/s, just before the run",
                    f"limits {fmt_us_as_ms(lim50)} / {fmt_us_as_ms(lim99)}",
                    [f"{a / 1000:.2f} / {b / 1000:.2f} ms" if a and b else "–" for a, b in zip(f50, f99)],
                    None, "limits = median paced fdatasync + 0.1 / + 0.2 ms"))
    gl.rows.append(("fdatasync p50 / p99 back to back, just before the run",
                    f"{fmt_us_as_ms(med(b50))} / {fmt_us_as_ms(med(b99))}",
                    [f"{a / 1000:.2f} / {b / 1000:.2f} ms" if a and b else "–" for a, b in zip(b50, b99)],
                    None, "shown for comparison: an idle disk path answers slower"))
    goals.append(gl)

    # e2e 100
    gl = Goal("e2e 100 subscribers, 200 events/s", "e2e-100", "p99 ≤ 1.5 ms")
    v = res_values("e2e-100", "latency_us", "p99")
    m = med(v)
    gl.add("delivery p99", v, fmt_us_as_ms, None if m is None else m <= 1500,
           ratio_text(m, 1500, False, fmt_us_as_ms))
    v = res_values("e2e-100", "loss", "lost")
    gl.add("frames lost", v, lambda x: fmt_num(x), None if not v else all(x == 0 for x in v), "–")
    goals.append(gl)

    def delivered(key):
        vals = []
        for r in ok_runs(R.get(key, [])):
            res = r["result"]
            lost = g(res, "loss", "lost")
            failed = (g(res, "subscribers", "connect_failed") or 0) + (g(res, "subscribers", "closed_by_server") or 0)
            vals.append((lost or 0) + failed == 0 and (res.get("dropped") or 0) == 0
                        and not res.get("errors_by_status"))
        return vals

    def loss_text(key):
        out = []
        for r in ok_runs(R.get(key, [])):
            res = r["result"]
            out.append(f"lost {g(res, 'loss', 'lost')}, dropped {res.get('dropped')}, "
                       f"closed {g(res, 'subscribers', 'closed_by_server')}, "
                       f"pub {fmt_num(res.get('throughput_events_per_s'))}/s")
        return out

    # fanout 200
    gl = Goal("fanout 1,000 subs on *, 200 events/s", "fanout-1000-200", "all delivered, p99 ≤ 10 ms")
    d = delivered("fanout-1000-200")
    gl.rows.append(("all delivered (lost, dropped, closed, publish rate)", f"{d.count(True)} of {len(d)} runs",
                    loss_text("fanout-1000-200"), None if not d else all(d),
                    "every run delivered everything" if d and all(d) else f"{d.count(False)} of {len(d)} runs lost or dropped"))
    v = res_values("fanout-1000-200", "latency_us", "p99")
    m = med(v)
    gl.add("delivery p99", v, fmt_us_as_ms, None if m is None else m <= 10_000,
           ratio_text(m, 10_000, False, fmt_us_as_ms))
    goals.append(gl)

    # fanout 1000
    gl = Goal("fanout 1,000 subs on *, 1,000 events/s", "fanout-1000-1000",
              "all delivered; server ≤ 0.3 µs CPU/frame; generator ≤ 0.5 µs/frame")
    d = delivered("fanout-1000-1000")
    gl.rows.append(("all delivered (lost, dropped, closed, publish rate)", f"{d.count(True)} of {len(d)} runs",
                    loss_text("fanout-1000-1000"), None if not d else all(d),
                    "every run delivered everything" if d and all(d) else f"{d.count(False)} of {len(d)} runs lost or dropped"))
    v = res_values("fanout-1000-1000", "server", "cpu_us_per_frame")
    m = med(v)
    gl.add("server CPU µs/frame", v, lambda x: fmt_num(x, " µs", 3), None if m is None else m <= 0.3,
           ratio_text(m, 0.3, False, lambda x: f"{x:.3f} µs"))
    v = [gen_cpu_per_frame(r) for r in ok_runs(R.get("fanout-1000-1000", []))]
    m = med(v)
    gl.add("generator CPU µs/frame (whole process)", v, lambda x: fmt_num(x, " µs", 3),
           None if m is None else m <= 0.5, ratio_text(m, 0.5, False, lambda x: f"{x:.3f} µs"))
    v = res_values("fanout-1000-1000", "latency_us", "p99")
    gl.add("delivery p99 (no goal)", v, fmt_us_as_ms, None, "–")
    goals.append(gl)

    # connections
    gl = Goal(f"connections {suite.opts.connections:,} idle", "connections", "≤ 4 KiB server RSS each")
    v = res_values("connections", "server", "rss_per_connection_bytes")
    m = med(v)
    gl.add("RSS per connection", v, fmt_bytes, None if m is None else m <= 4 * KIB,
           ratio_text(m, 4 * KIB, False, fmt_bytes))
    v = res_values("connections", "connections", "connected")
    gl.add("connected", v, lambda x: fmt_num(x), None if not v else all(x == suite.opts.connections for x in v), "–")
    goals.append(gl)

    # memory
    ml = ok_runs(R.get("memory-list", []))
    gl = Goal(f"memory, {suite.opts.entities:,} entities × 5 props", "memory-list", "≤ 25 MB RSS")
    v = [r.get("rss_populated_bytes") for r in ml]
    m = med(v)
    gl.add("server VmRSS", v, fmt_bytes, None if m is None else m <= 25 * MB,
           ratio_text(m, 25 * MB, False, fmt_bytes))
    gl.add("(same, 3 s later; no goal)", [r.get("rss_populated_later_bytes") for r in ml], fmt_bytes, None, "–")
    gl.add("(fresh server VmRSS before populating; no goal)", [r.get("rss_fresh_bytes") for r in ml],
           fmt_bytes, None, "–")
    goals.append(gl)

    gl = Goal(f"list all {suite.opts.entities:,} entities", "memory-list", "≤ 100 ms, RSS grows ≤ 10 MB")
    v = [r["lists"][0]["seconds"] * 1000 if r.get("lists") else None for r in ml]
    m = med(v)
    gl.add("GET /api/state/entities, ms", v, lambda x: fmt_num(x, " ms", 1), None if m is None else m <= 100,
           ratio_text(m, 100, False, lambda x: f"{x:.1f} ms"))
    v = [r["lists"][0].get("rss_peak_growth_bytes") if r.get("lists") else None for r in ml]
    m = med(v)
    gl.add("server RSS growth (peak, sampled every ~1 ms)", v, fmt_bytes, None if m is None else m <= 10 * MB,
           ratio_text(m, 10 * MB, False, fmt_bytes))
    v = [r["lists"][1]["seconds"] * 1000 if r.get("lists") and len(r["lists"]) > 1 else None for r in ml]
    gl.add("second list on the same server, ms (no goal)", v, lambda x: fmt_num(x, " ms", 1), None, "–")
    v = [r["lists"][0].get("body_bytes") if r.get("lists") else None for r in ml]
    gl.add("body size (no goal)", v, fmt_bytes, None, "–")
    goals.append(gl)

    # recovery
    rec = ok_runs(R.get("recovery", []))
    gl = Goal(f"recovery after kill -9, {suite.opts.recovery_events:,} events", "recovery",
              "≤ 1 s to correct state, nothing lost")
    v = [g(r["result"], "recovery", "seconds") for r in rec]
    m = med(v)
    gl.add("seconds to the marker", v, lambda x: fmt_num(x, " s", 3), None if m is None else m <= 1.0,
           ratio_text(m, 1.0, False, lambda x: f"{x:.3f} s"))
    lost = [g(r, "verify", "nothing_lost") for r in rec]
    gl.rows.append(("nothing lost (all entities hold their last value, sampled histories complete)",
                    f"{sum(bool(x) for x in lost)} of {len(lost)} runs",
                    ["yes" if x else "NO" for x in lost], None if not lost else all(bool(x) for x in lost),
                    "–" if lost and all(lost) else "see the runs below"))
    v = [g(r["result"], "recovery", "first_response_s") for r in rec]
    gl.add("first HTTP answer after the restart (no goal)", v, lambda x: fmt_num(x, " s", 3), None, "–")
    v = [r["result"].get("throughput_events_per_s") for r in rec]
    gl.add("populate events/s (no goal)", v, lambda x: fmt_num(x), None, "–")
    goals.append(gl)

    # A goal with a failed run cannot be called met.
    for gl in goals:
        bad = [r for r in R.get(gl.run_key, []) if "error" in r]
        if bad:
            gl.rows.append(("failed runs", str(len(bad)), [r["error"][:120] for r in bad], False,
                            "a run failed"))
    return goals


def cpu_split_rows(suite: Suite) -> list[list[str]]:
    rows = []
    for key, unit in [("ingest-batch", "event"), ("ingest", "event"), ("e2e-1", "frame"),
                      ("e2e-100", "frame"), ("fanout-1000-200", "frame"),
                      ("fanout-1000-1000", "frame")]:
        runs = ok_runs(suite.runs.get(key, []))
        if not runs:
            continue
        s_cpu = med([g(r["result"], "server", "cpu_s") for r in runs])
        s_util = med([g(r["result"], "server", "cpu_utilization") for r in runs])
        s_per = med([g(r["result"], "server", f"cpu_us_per_{unit}") for r in runs])
        gen_cpu = med([g(r["result"], "generator", "cpu_s") for r in runs])
        gen_per = med([gen_cpu_per_event(r) if unit == "event" else gen_cpu_per_frame(r) for r in runs])
        rows.append([key, unit, fmt_num(s_cpu, " s", 2), fmt_num(s_util, "", 2),
                     fmt_num(s_per, " µs", 3), fmt_num(gen_cpu, " s", 2), fmt_num(gen_per, " µs", 3)])
    return rows


def window_slopes() -> tuple[float, float, float] | None:
    """The writers' coalescing window as `Pace::update` in egress/src/connection.rs sets it:
    (ns per frame/s up to the knee, the knee in frames/s, ns per frame/s past it)."""
    try:
        text = (ROOT / "egress" / "src" / "connection.rs").read_text()
    except OSError:
        return None
    low = re.search(r"WINDOW_PER_FRAME_RATE: Duration = Duration::from_nanos\((\d+)\)", text)
    knee = re.search(r"WINDOW_KNEE_FRAME_RATE: f64 = ([\d_.]+);", text)
    high = re.search(r"WINDOW_PER_FRAME_RATE_PAST_KNEE: Duration = Duration::from_nanos\((\d+)\)",
                     text)
    if not (low and knee and high):
        return None
    return float(low.group(1)), float(knee.group(1).replace("_", "")), float(high.group(1))


def window_ms_at(frames_s: float) -> float | None:
    """The writers' coalescing window at `frames_s` delivered frames/s (50 ms at most)."""
    slopes = window_slopes()
    if slopes is None:
        return None
    low, knee, high = slopes
    return min(50.0, (low * min(frames_s, knee) + high * max(0.0, frames_s - knee)) / 1e6)


def profile_text(runs, key: str) -> str | None:
    """One sentence on the profile taken in one of `runs`, if any."""
    for r in runs:
        p = r.get("profile")
        if not p:
            continue
        if "error" in p:
            return f"No profile: {p['error']}."
        dso = ", ".join(f"{name} {pct:.1f} %" for pct, name in p.get("dso", [])[:4])
        sym = ", ".join(f"`{name.split('] ', 1)[-1]}` {pct:.1f} %" for pct, name in p.get("sym", [])[:8])
        return (f"Profile of the server (`perf record -F 499 -p <pid>`, {p['seconds']} s in run {r['run']}, "
                f"{p.get('samples')} samples; raw in `{{raw}}/{key}-profile-*.txt`): by binary {dso}; "
                f"top symbols {sym}.")
    return None


def bounds_section(suite: Suite, meta: dict, goals: list[Goal], raw_rel: str) -> list[str]:
    """For every goal not met: what bounds it, computed from this suite's own runs."""
    cores = int(g(meta, "machine", "nproc") or 2)
    out = []
    for gl in goals:
        if gl.met() is not False:
            continue
        runs = ok_runs(suite.runs.get(gl.run_key, []))
        res = lambda *path: med([g(r["result"], *path) for r in runs])  # noqa: E731
        text = None
        if gl.run_key == "ingest":
            s_per = res("server", "cpu_us_per_event")
            sys_share = med([g(r["result"], "server", "cpu_sys_s") / g(r["result"], "server", "cpu_s")
                             for r in runs if g(r["result"], "server", "cpu_sys_s") is not None
                             and g(r["result"], "server", "cpu_s")])
            gen_per = med([gen_cpu_per_event(r) for r in runs])
            if s_per and gen_per:
                total = s_per + gen_per
                text = (f"Each request cost the server {s_per:.1f} µs of CPU"
                        + (f", {s_per * sys_share:.1f} µs of it in the kernel (one receive, one send "
                           "over loopback, the wake-ups)" if sys_share is not None else "")
                        + f", and the generator {gen_per:.1f} µs: {total:.1f} µs per request on "
                        f"{cores} shared cores caps this run at ~{cores * 1e6 / total:,.0f} requests/s "
                        "however the server schedules its work. "
                        + (f"The kernel's part alone is over the 5 µs limit. " if sys_share is not None
                           and s_per * sys_share > 5 else "")
                        + "A lean C client (`wrk -c 32`) costs about as much as flux-loadtest here "
                        "(perf/README.md).")
                reached = res("throughput_events_per_s")
                p50 = res("latency_us", "p50")
                per_commit = med([g(r, "metrics", "flux_events_accepted_total")
                                  / g(r, "metrics", "flux_log_fsync_seconds_count")
                                  for r in runs if g(r, "metrics", "flux_log_fsync_seconds_count")
                                  and g(r, "metrics", "flux_events_accepted_total") is not None])
                sync_ms = med([g(r, "metrics", "flux_log_fsync_seconds_sum") * 1000
                               / g(r, "metrics", "flux_log_fsync_seconds_count")
                               for r in runs if g(r, "metrics", "flux_log_fsync_seconds_count")
                               and g(r, "metrics", "flux_log_fsync_seconds_sum") is not None])
                if reached and per_commit and sync_ms and p50:
                    text += (f" The run reached {reached:,.0f} requests/s, "
                             f"{reached * total / (cores * 1e6):.0%} of that cap: the closed loop "
                             f"also waits on the commit. {per_commit:.1f} requests shared each "
                             f"fdatasync ({sync_ms:.2f} ms on average), and a request waited for "
                             f"the commit under way and then its own (p50 {p50 / 1000:.2f} ms). "
                             "With the data dir on tmpfs, where fdatasync costs nothing, the same "
                             "build ran 95–115k requests/s; a second commit in flight made more "
                             "syncs but no more throughput (perf/README.md, session 20).")
        elif gl.run_key.startswith("fanout"):
            frames_s = res("delivered_frames_per_s")
            p99 = res("latency_us", "p99")
            ns = (window_slopes() or (None,))[0]
            s_frame = res("server", "cpu_us_per_frame")
            gen_frame = med([gen_cpu_per_frame(r) for r in runs])
            fpw = med([g(r, "metrics", "flux_websocket_frames_queued_total")
                       / g(r, "metrics", "flux_websocket_writes_total")
                       for r in runs if g(r, "metrics", "flux_websocket_writes_total")])
            window_ms = window_ms_at(frames_s) if frames_s else None
            if frames_s and ns and p99 and window_ms is not None:
                text = (f"A frame waits for its connection's next write. Writers write at most once "
                        f"per coalescing window, {window_ms:.1f} ms at {frames_s:,.0f} frames/s "
                        f"({ns:.0f} ns per frame/s up to a knee, more past it, 50 ms at most; `egress/src/connection.rs`), so frames wait 0–"
                        f"{window_ms:.1f} ms and p99 ({p99 / 1000:.1f} ms) is about the window plus "
                        "the publish and the machine's delays.")
                if fpw and s_frame and gen_frame:
                    writes_s = frames_s / fpw
                    per_write = (s_frame + gen_frame) * fpw
                    text += (f" Each write carried {fpw:.1f} frames and cost {s_frame * fpw:.1f} µs of "
                             f"server CPU and {gen_frame * fpw:.1f} µs of generator CPU: "
                             f"{writes_s:,.0f} writes/s took {writes_s * per_write / 1e6:.2f} of the "
                             f"{cores} cores.")
                    if gl.run_key == "fanout-1000-200":
                        text += (f" A 10 ms p99 needs a window of ~8 ms, {window_ms / 8:.1f}× the "
                                 f"writes: ~{writes_s * per_write / 1e6 * window_ms / 8:.2f} cores for "
                                 "the writes alone.")
            publish = med([g(r["result"], "server", "cpu_us_per_event")
                           for r in ok_runs(suite.runs.get("publish-1000", []))])
            if gl.run_key == "fanout-1000-1000" and publish and s_frame and frames_s:
                events_s = res("throughput_events_per_s") or 1000
                per_event = s_frame * frames_s / events_s
                text = (text or "") + (
                    f" The server spent {per_event:.0f} µs of CPU per event. The same 1,000 "
                    f"single-event POSTs a second with no subscriber (`ingest -c 1 --rate 1000`, "
                    f"run publish-1000) took {publish:.0f} µs each: the publish path (request, "
                    f"commit with its fdatasync, apply) is {publish / per_event:.0%} of the run's "
                    f"server CPU, {publish * events_s / frames_s:.3f} µs per frame, and the writes "
                    f"to the 1,000 sockets the other {(per_event - publish) * events_s / frames_s:.3f}"
                    " µs per frame.")
        elif gl.run_key == "e2e-1":
            p50 = res("latency_us", "p50")
            paced = med([g(r, "fsync_paced", "p50_us") for r in runs])
            if p50 is not None and paced is not None:
                text = (f"Delivery p50 sat {(p50 - paced) / 1000:.2f} ms above the paced fdatasync p50 "
                        "(limit 0.10 ms). Between the request and the frame the server does one "
                        "fdatasync, ~40k instructions, and two wake-ups of idle threads (its worker on "
                        "the request, the subscriber on the frame; ~20–60 µs each on this VM): "
                        "perf/README.md, \"Where e2e-1's ~0.1 ms above the disk goes\".")
        elif gl.run_key == "e2e-100":
            s_frame = res("server", "cpu_us_per_frame")
            if s_frame:
                text = (f"One write per frame: {s_frame:.1f} µs of server CPU each, so an event's 100 "
                        f"frames take ~{s_frame * 100 / 1000:.2f} ms of server CPU, shared by two "
                        "threads, while the generator spends about as much reading them.")
        elif gl.run_key == "ingest-batch":
            lat = res("latency_us", "p50")
            s_per = res("server", "cpu_us_per_event")
            if lat and s_per:
                text = (f"4 connections × 1,000 events per {lat / 1000:.2f} ms round trip (p50) "
                        f"= ~{4000 / (lat / 1e6):,.0f} events/s; the server spent {s_per:.2f} µs of "
                        "CPU per event.")
        prof = profile_text(runs, gl.run_key)
        lines = [t for t in [text, prof and prof.replace("{raw}", raw_rel)] if t]
        out.append(f"- **{gl.name}**: " + (" ".join(lines) if lines else "see the runs above."))
    return out


def md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |")
    return "\n".join(out)


def met_text(m):
    return {True: "**met**", False: "**not met**", None: "no data"}[m]


def write_report(path: Path, raw_rel: str, suite: Suite, meta: dict, goals: list[Goal]) -> None:
    o = suite.opts
    L = []
    title = "Flux performance suite" + (" — QUICK smoke test, not a record" if o.quick else "")
    L.append(f"# {title}: {meta['date']}, commit {meta['git']['short']}")
    L.append("")
    L.append(f"Written by `perf/run-suite.sh{' --quick' if o.quick else ''}` "
             f"({meta['started']} → {meta['finished']}, {meta['elapsed_min']:.1f} min). "
             f"Raw JSON: [`{raw_rel}/`]({raw_rel}/) — one `<run>.json` per generator run exactly as "
             "flux-loadtest printed it, `<run>.suite.json` with what the suite measured around it "
             "(load average, fdatasync probe, RSS, list timings, recovery checks), the server logs, "
             "and `suite.json` with everything below.")
    L.append("")
    met = [gl for gl in goals if gl.met() is True]
    missed = [gl for gl in goals if gl.met() is False]
    L.append("## Verdict")
    L.append("")
    L.append(f"**{len(met)} of {len(goals)} goals met.** "
             + ("Met: " + "; ".join(gl.name for gl in met) + ". " if met else "None met. ")
             + ("Not met: " + "; ".join(gl.name for gl in missed) + "." if missed else ""))
    L.append("")
    summary = []
    for gl in goals:
        headline = next((r for r in gl.rows if r[3] is not None), None)
        detail = "; ".join(f"{r[0]} {r[1]}" for r in gl.rows if r[3] is not None)
        by = "; ".join(r[4] for r in gl.rows if r[3] is False) or (headline[4] if headline else "–")
        summary.append([gl.name, gl.goal_text, detail or "–", met_text(gl.met()), by])
    L.append(md_table(["run", "goal", "median (of the runs)", "met?", "by how much"], summary))
    L.append("")
    L.append("Medians are over the successful runs of each scenario"
             f" ({o.runs} run{'s' if o.runs > 1 else ''} each, interleaved). The machine is shared: "
             "see the load average below before reading single digits.")
    L.append("")

    m = meta["machine"]
    L.append("## Machine")
    L.append("")
    L.append(md_table(["", ""], [
        ["nproc", m["nproc"]], ["CPU (lscpu Model name)", m["cpu_model"]], ["kernel", m["kernel"]],
        ["RAM", f"{m['ram']} ({m['ram_kib']} KiB)"], ["data disk (target/)", m["data_fs"]],
        ["/tmp", m["tmp_fs"]], ["rustc", m["rustc"]], ["open files limit", m["ulimit_nofile"]],
        ["CPU reference: `head -c 1G /dev/zero | sha256sum`",
         f"**{meta['cpu_reference_s']:.2f} s** wall, {meta['cpu_reference_s'] / 4.3:.2f}× the 4.3 s of the "
         "machine the goals were set on"],
        ["fdatasync of a 4 KiB append (fsync_probe, 1,000×, in target/perf-data)",
         f"**p50 {meta['fsync']['p50_us'] / 1000:.2f} ms, p99 {meta['fsync']['p99_us'] / 1000:.2f} ms**, "
         f"max {meta['fsync']['max_us'] / 1000:.2f} ms (0.30 / 0.55 ms where the goals were set)"],
        ["load average (1/5/15 min) at start / end",
         f"{' '.join(map(str, meta['load_start']))} / {' '.join(map(str, meta['load_end']))}"],
        ["load average (1 min) before the runs: min / median / max",
         f"{meta['load_runs'][0]} / {meta['load_runs'][1]} / {meta['load_runs'][2]}"],
    ]))
    L.append("")
    if len(suite.fsync_adjacent) > 0:
        L.append("fdatasync probes taken just before each e2e 1-subscriber run, back to back / paced "
                 "at 200 appends/s (p50 / p99): "
                 + ", ".join(f"{f['p50_us'] / 1000:.2f} / {f['p99_us'] / 1000:.2f} ms"
                             + (f" and {f['paced']['p50_us'] / 1000:.2f} / {f['paced']['p99_us'] / 1000:.2f} ms"
                                if f.get("paced") else "")
                             for f in suite.fsync_adjacent) + ". The e2e 1-subscriber verdict uses the "
                 "paced probe: the run appends 200 times a second, and on this VM an fdatasync after "
                 "an idle gap costs more than one back to back (see `perf/README.md`).")
        L.append("")

    gi = meta["git"]
    L.append("## Commit")
    L.append("")
    L.append(f"`{gi['commit']}` — {gi['subject']}")
    L.append("")
    code_dirty = [f for f in gi["dirty_files"] if not f[3:].startswith("perf/")]
    if code_dirty:
        L.append(f"**The tree was dirty** ({len(gi['dirty_files'])} paths): the binaries measured "
                 "include these uncommitted changes:")
        L.append("")
        L.append("```")
        L.extend(gi["dirty_files"][:40])
        L.append("```")
    elif gi["dirty"]:
        L.append("The tree was dirty only under `perf/` (the suite and its reports), so the "
                 "binaries measured are the commit's: " + ", ".join(
                     f"`{f[3:]}`" for f in gi["dirty_files"]) + ".")
    else:
        L.append("The tree was clean.")
    L.append("")
    L.append("Binaries (copied out of target/release right after the build, so a concurrent "
             "rebuild cannot change them mid-suite): "
             + ", ".join(f"`{k}` sha256 `{v[:16]}…`" for k, v in meta["binary_sha256"].items()) + ".")
    L.append("")

    L.append("## Commands")
    L.append("")
    L.append("Every run: a fresh `flux serve --listen 127.0.0.1:<free port> --data-dir "
             "target/perf-data/<stamp>/<run>` (defaults otherwise: local log, durable acks, "
             f"shards = http workers = cores), then the generator with `--server-pid`, then SIGTERM. "
             f"Rate scenarios use `--duration {o.duration} --warmup {o.warmup}`.")
    L.append("")
    L.append("```sh")
    L.append("cargo build --release -p flux -p flux-loadtest")
    L.append("cargo build --release -p flux-bench --bin fsync_probe   # = cargo run --release -p flux-bench --bin fsync_probe -- target/perf-data/<stamp>/fsync 1000")
    L.append("# before each e2e-1 run, back to back and paced like the run:")
    L.append(f"fsync_probe target/perf-data/<stamp>/fsync 1000; fsync_probe target/perf-data/<stamp>/fsync {E2E_PACED_PROBES} 4096 append {E2E_RATE}")
    for key in ORDER:
        if key in suite.commands:
            L.append(f"# {key}")
            L.append(suite.commands[key])
    L.append("```")
    L.append("")

    L.append("## Goals, run by run")
    L.append("")
    for gl in goals:
        L.append(f"### {gl.name} — goal: {gl.goal_text} — {met_text(gl.met())}")
        L.append("")
        n = max([len(r[2]) for r in gl.rows] + [1])
        header = ["metric", "median"] + [f"run {i + 1}" for i in range(n)] + ["met?", "by how much"]
        rows = []
        for metric, median, runs, ok, by in gl.rows:
            runs = list(runs) + [""] * (n - len(runs))
            rows.append([metric, median, *runs, "–" if ok is None else met_text(ok), by])
        L.append(md_table(header, rows))
        L.append("")

    bounds = bounds_section(suite, meta, goals, raw_rel)
    if bounds:
        L.append("## What bounds the goals not met")
        L.append("")
        L.append("Computed from this suite's runs (medians); the reasoning and the experiments "
                 "behind it are in `perf/README.md`.")
        L.append("")
        L.extend(bounds)
        L.append("")

    L.append("## CPU split: server vs generator")
    L.append("")
    L.append("Medians. Server CPU is utime+stime of the flux process over the measured window, "
             "divided by the events accepted (ingest) or frames delivered (e2e/fanout) in that "
             "window. Generator CPU is the whole flux-loadtest process lifetime (connect, warmup, "
             "sync and drain included, fanout workers included), divided by the events over "
             "warmup + duration (estimated at the measured rate) or by every frame it received: an "
             "upper bound. Both share the same 2 cores.")
    L.append("")
    L.append(md_table(["scenario", "per", "server CPU", "server cores busy", "server µs per",
                       "generator CPU", "generator µs per"], cpu_split_rows(suite)))
    L.append("")

    L.append("## Other numbers from the same runs")
    L.append("")
    rows = []
    for key in ["ingest-batch", "ingest", "e2e-1", "e2e-100", "fanout-1000-200", "fanout-1000-1000"]:
        for r in suite.runs.get(key, []):
            res = r.get("result", {})
            lat = res.get("latency_us", {})
            rows.append([key, r["run"], fmt_num(res.get("throughput_events_per_s")),
                         f"{fmt_us_as_ms(lat.get('p50'))} / {fmt_us_as_ms(lat.get('p99'))} / "
                         f"{fmt_us_as_ms(lat.get('p999'))} / {fmt_us_as_ms(lat.get('max'))}",
                         fmt_num(res.get("delivered_frames_per_s")),
                         json.dumps(res.get("errors_by_status")) if res.get("errors_by_status") else "–",
                         fmt_bytes(g(res, "server", "rss_bytes")),
                         f"{r['load_before'][0]:.2f}", r.get("error", "")[:100]])
    L.append(md_table(["scenario", "run", "events/s (acked)", "latency p50 / p99 / p99.9 / max",
                       "frames/s", "errors", "server RSS at end", "load 1 min", "error"], rows))
    L.append("")
    rows = []
    for r in suite.runs.get("connections", []):
        c = g(r, "result", "connections") or {}
        s = g(r, "result", "server") or {}
        rows.append([r["run"], c.get("connected"), c.get("connect_s"), fmt_bytes(s.get("rss_before_bytes")),
                     fmt_bytes(s.get("rss_connected_bytes")), fmt_bytes(s.get("rss_bytes")),
                     fmt_bytes(s.get("rss_per_connection_bytes")), r.get("error", "")[:100]])
    if rows:
        L.append(md_table(["connections run", "connected", "connect s", "RSS before", "RSS connected",
                           "RSS after hold", "per connection", "error"], rows))
        L.append("")
    rows = []
    for r in suite.runs.get("recovery", []):
        rc = g(r, "result", "recovery") or {}
        v = r.get("verify") or {}
        rows.append([r["run"], g(r, "result", "events"), rc.get("seconds"), rc.get("restart_cmd_s"),
                     rc.get("first_response_s"), rc.get("polls"),
                     f"{v.get('entities_listed')}/{v.get('entities_expected')}",
                     v.get("entities_with_wrong_last_value"), json.dumps(v.get("history_counts")),
                     r.get("error", "")[:100]])
    if rows:
        L.append(md_table(["recovery run", "events acked", "seconds", "restart cmd s", "first answer s",
                           "polls", "entities back", "wrong last value", "history counts (sample)",
                           "error"], rows))
        L.append("")
        L.append("“Nothing lost” is checked after each recovery: the generator's events are "
                 "deterministic (event s goes to `loadtest/dev-<s mod 10000>` with `p0 = s`), so "
                 "every entity must hold the p0 of its last event, and four sampled entities must "
                 "have their full history (events / 10,000 each).")
        L.append("")

    if o.quick:
        L.append("**This was a `--quick` run: one short run per scenario, smaller counts. "
                 "It checks the suite, not Flux.**")
        L.append("")
    path.write_text("\n".join(L) + "\n")


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 1 run each, 2 s windows, 2,000 connections, 200,000 recovery events")
    ap.add_argument("--runs", type=int, help="runs per scenario (default 3; quick 1)")
    ap.add_argument("--duration", type=float, help="measured seconds per rate run (default 5; quick 2)")
    ap.add_argument("--warmup", type=float, help="warmup seconds (default 1; quick 0.5)")
    ap.add_argument("--only", help="comma-separated scenarios to run (ingest-batch, ingest, e2e-1, "
                    "e2e-100, fanout-1000-200, fanout-1000-1000, publish-1000, connections, memory-list, "
                    "recovery)")
    ap.add_argument("--max-minutes", type=float, default=45,
                    help="stop starting new runs after this long (default 45)")
    ap.add_argument("--out", help="report path (default perf/reports/<date>-<commit>[-quick].md)")
    ap.add_argument("--render-only", metavar="RAW_DIR",
                    help="only rewrite the report from RAW_DIR/suite.json of an earlier run "
                         "(e.g. perf/reports/2026-11-23-abc1234); runs nothing")
    ap.add_argument("--pid-file", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.render_only:
        return render_only(Path(opts.render_only))
    opts.runs = opts.runs or (1 if opts.quick else 3)
    opts.duration = opts.duration or (2.0 if opts.quick else 5.0)
    opts.warmup = opts.warmup if opts.warmup is not None else (0.5 if opts.quick else 1.0)
    opts.hold = 2.0 if opts.quick else 5.0
    opts.connections = 2_000 if opts.quick else 10_000
    opts.entities = 100_000
    opts.recovery_events = 200_000 if opts.quick else 1_000_000
    opts.fsync_repeats = 1000

    global REAPER
    REAPER = Reaper(Path(opts.pid_file) if opts.pid_file else None)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    started = dt.datetime.now()
    t0 = time.monotonic()
    git = git_info()
    date = started.strftime("%Y-%m-%d")
    name = f"{date}-{git['short']}" + ("-quick" if opts.quick else "")
    report = Path(opts.out) if opts.out else REPORTS / f"{name}.md"
    raw_dir = report.with_suffix("")
    raw_dir.mkdir(parents=True, exist_ok=True)
    for old in raw_dir.iterdir():
        if old.is_file():
            old.unlink()
    stamp = started.strftime("%Y%m%d-%H%M%S")
    work = DATA_ROOT / stamp
    bin_dir = work / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    bins = {}
    shas = {}
    for b in ["flux", "flux-loadtest", "fsync_probe"]:
        src = ROOT / "target" / "release" / b
        if not src.exists():
            print(f"missing {src}: run perf/run-suite.sh (it builds first)", file=sys.stderr)
            return 2
        shutil.copy2(src, bin_dir / b)
        bins[b] = bin_dir / b
        shas[b] = hashlib.sha256((bin_dir / b).read_bytes()).hexdigest()

    suite = Suite(opts, bins, work, raw_dir)
    meta = {"date": date, "started": started.strftime("%Y-%m-%d %H:%M:%S"), "git": git,
            "binary_sha256": shas, "load_start": loadavg(), "quick": opts.quick,
            "options": {k: v for k, v in vars(opts).items() if k != "pid_file"}}
    try:
        print("== machine, CPU reference, fdatasync", file=sys.stderr)
        meta["machine"] = machine_info()
        meta["cpu_reference_s"] = cpu_reference()
        meta["fsync"] = fsync_probe(bins["fsync_probe"], work / "fsync", opts.fsync_repeats)
        print(f"   cpu reference {meta['cpu_reference_s']:.2f} s; {meta['fsync']['line']}", file=sys.stderr)
        only = set(opts.only.split(",")) if opts.only else None
        scenarios = [(k, f) for k, f in suite.scenarios() if only is None or k in only]
        deadline = t0 + opts.max_minutes * 60
        for i in range(1, opts.runs + 1):
            for key, fn in scenarios:
                if time.monotonic() > deadline:
                    print(f"   --max-minutes reached: skipping {key} run {i}", file=sys.stderr)
                    suite.record(key, {"run": i, "error": "skipped: --max-minutes reached",
                                       "load_before": loadavg()})
                    continue
                # The previous run's dirty pages (a batch run leaves ~1 GB) are written back
                # before this run starts, not during it.
                os.sync()
                time.sleep(1.0)
                print(f"== {key} run {i}/{opts.runs} (load {loadavg()[0]:.2f}, "
                      f"{(time.monotonic() - t0) / 60:.1f} min)", file=sys.stderr)
                fn(i)
                last = suite.runs[key][-1]
                if "error" in last:
                    print(f"   FAILED: {last['error']}", file=sys.stderr)
    finally:
        REAPER.kill_all()
        shutil.rmtree(work, ignore_errors=True)

    finished = dt.datetime.now()
    meta["finished"] = finished.strftime("%Y-%m-%d %H:%M:%S")
    meta["elapsed_min"] = (time.monotonic() - t0) / 60
    meta["load_end"] = loadavg()
    loads = sorted(r["load_before"][0] for runs in suite.runs.values() for r in runs)
    meta["load_runs"] = [loads[0], statistics.median(loads), loads[-1]] if loads else [None] * 3
    return finish(report, raw_dir, suite, meta)


def finish(report: Path, raw_dir: Path, suite: Suite, meta: dict) -> int:
    goals = evaluate(suite, meta["fsync"])
    meta["goals"] = [{"name": gl.name, "goal": gl.goal_text, "met": gl.met(),
                      "rows": [{"metric": r[0], "median": r[1], "runs": r[2], "met": r[3], "by": r[4]}
                               for r in gl.rows]} for gl in goals]
    with open(raw_dir / "suite.json", "w") as f:
        json.dump({"meta": meta, "runs": suite.runs, "commands": suite.commands,
                   "fsync_adjacent": suite.fsync_adjacent}, f, indent=1, sort_keys=True, default=str)
    rel = os.path.relpath(raw_dir, report.parent)
    write_report(report, rel, suite, meta, goals)
    print(f"== report: {report.relative_to(ROOT) if report.is_relative_to(ROOT) else report}", file=sys.stderr)
    for gl in goals:
        print(f"   {met_text(gl.met()).strip('*'):9} {gl.name}: {gl.goal_text}", file=sys.stderr)
    return 0


def render_only(raw_dir: Path) -> int:
    """Rewrites <raw_dir>.md from <raw_dir>/suite.json (after a change to the report's layout)."""
    raw_dir = raw_dir.resolve()
    data = json.loads((raw_dir / "suite.json").read_text())
    meta = data["meta"]
    opts = argparse.Namespace(**meta["options"])
    suite = Suite(opts, {}, raw_dir, raw_dir)
    suite.runs = data["runs"]
    suite.commands = data["commands"]
    suite.fsync_adjacent = data["fsync_adjacent"]
    return finish(raw_dir.with_suffix(".md"), raw_dir, suite, meta)


if __name__ == "__main__":
    sys.exit(main())
