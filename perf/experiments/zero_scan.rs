//! How fast a 64 MiB tail of zeros is checked: byte by byte (`iter().any`) against a `memcmp`
//! with a zero buffer, the way `engine/src/log/local.rs::zeros_to_end` does it (decision 0006).
//! Memory only, no file I/O.
//!
//!     rustc -O perf/experiments/zero_scan.rs -o target/zero_scan && target/zero_scan

use std::hint::black_box;
use std::time::Instant;

fn main() {
    const WINDOW: usize = 1 << 20;
    const WINDOWS: usize = 64;
    let buf = vec![0u8; WINDOW];
    let zeros = vec![0u8; WINDOW];
    let mut nonzero = 0;
    let started = Instant::now();
    for _ in 0..WINDOWS {
        if black_box(&buf).iter().any(|&b| b != 0) {
            nonzero += 1;
        }
    }
    let by_byte = started.elapsed();
    let started = Instant::now();
    for _ in 0..WINDOWS {
        if black_box(&buf)[..] != black_box(&zeros)[..] {
            nonzero += 1;
        }
    }
    let by_memcmp = started.elapsed();
    println!("64 MiB: byte by byte {by_byte:?}, memcmp {by_memcmp:?} ({nonzero} non-zero)");
}
