//! The live progress line: once a second on stderr, only when stderr is a terminal, so piped
//! and captured runs stay clean. Stops (and ends the line) when dropped.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Counters read once a second: (done so far, errors so far).
pub type Counters = Box<dyn Fn() -> (u64, u64) + Send>;

pub struct Progress {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Progress {
    /// Prints `<elapsed>s  <label> <total> (<rate>/s)  errors <n>` each second.
    pub fn start(label: &'static str, counters: Counters) -> Progress {
        let stop = Arc::new(AtomicBool::new(false));
        if !std::io::stderr().is_terminal() {
            return Progress { stop, thread: None };
        }
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut last = (0, Instant::now());
            let mut next = started + Duration::from_secs(1);
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                let now = Instant::now();
                if now < next {
                    continue;
                }
                next += Duration::from_secs(1);
                let (done, errors) = counters();
                let rate =
                    (done - last.0.min(done)) as f64 / now.duration_since(last.1).as_secs_f64();
                last = (done, now);
                let mut stderr = std::io::stderr().lock();
                let _ = write!(
                    stderr,
                    "\r{:>5.0}s  {label} {done} ({rate:.0}/s)  errors {errors}   ",
                    now.duration_since(started).as_secs_f64()
                );
                let _ = stderr.flush();
            }
            let _ = writeln!(std::io::stderr());
        });
        Progress {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
