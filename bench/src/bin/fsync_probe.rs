//! Measures the disk's own durable-append cost: a 4 KiB `write` at the end of a file followed
//! by `fdatasync` (`File::sync_data`), repeated, reporting p50/p99/max. This is the floor under
//! every `LocalLog` group commit, which does the same (append, then one fdatasync).
//!
//! Usage: `fsync_probe [DIR] [REPEATS] [WRITE_BYTES] [MODE] [RATE]` (defaults: `target/tmp`,
//! 1000, 4096, `append`, 0). MODE `preallocated` first writes zeros over every byte the run will
//! write and syncs them, so each write lands inside the file's size and changes no metadata (how
//! a preallocated log segment would behave). RATE paces the appends at that many per second (0:
//! back to back). Pacing matters here: at 200 appends/s an fdatasync took about twice as long as
//! back to back on this VM (an idle vCPU and disk are slower to answer), so compare a paced
//! server run with a probe paced alike. DIR must be on the disk under test; a tmpfs would report
//! no cost at all. The probe file is removed afterwards.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "target/tmp".into()));
    let repeats = number_arg(args.next(), "REPEATS", 1_000)?;
    let write_bytes = number_arg(args.next(), "WRITE_BYTES", 4_096)?;
    let preallocated = match args.next().as_deref() {
        None | Some("append") => false,
        Some("preallocated") => true,
        Some(other) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("MODE must be `append` or `preallocated`, not {other:?}"),
            ));
        }
    };
    let rate = number_arg(args.next(), "RATE", 0)?;
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("fsync_probe.{}.tmp", std::process::id()));
    let result = probe(&path, repeats, write_bytes, preallocated, rate);
    let _ = std::fs::remove_file(&path);
    let mut latencies = result?;
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{repeats} x ({write_bytes} B {} + fdatasync{}) in {}: p50 {:.0} us, p99 {:.0} us, \
         max {:.0} us, mean {:.0} us",
        if preallocated {
            "write inside a preallocated file"
        } else {
            "append"
        },
        if rate > 0 {
            format!(", {rate}/s")
        } else {
            String::new()
        },
        dir.display(),
        micros(at(0.50)),
        micros(at(0.99)),
        micros(at(1.0)),
        micros(latencies.iter().sum::<Duration>()) / latencies.len().max(1) as f64,
    );
    Ok(())
}

fn number_arg(arg: Option<String>, name: &str, default: usize) -> std::io::Result<usize> {
    match arg {
        Some(n) => n.parse().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{name} must be a number"),
            )
        }),
        None => Ok(default),
    }
}

fn probe(
    path: &Path,
    repeats: usize,
    write_bytes: usize,
    preallocated: bool,
    rate: usize,
) -> std::io::Result<Vec<Duration>> {
    let mut file = OpenOptions::new().create_new(true).write(true).open(path)?;
    if preallocated {
        file.write_all(&vec![0u8; repeats * write_bytes])?;
        file.sync_all()?;
        file.seek(SeekFrom::Start(0))?;
    }
    let block = vec![0x5au8; write_bytes];
    let mut latencies = Vec::with_capacity(repeats);
    let interval = (rate > 0).then(|| Duration::from_secs_f64(1.0 / rate as f64));
    let mut due = Instant::now();
    for _ in 0..repeats {
        if let Some(interval) = interval {
            due += interval;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let start = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        latencies.push(start.elapsed());
    }
    Ok(latencies)
}
