//! Waiting until an instant with sub-millisecond precision inside tokio, for open-loop runs.
//!
//! tokio's timer rounds every deadline up to its 1 ms tick. An open-loop request due at `t`
//! would leave up to a millisecond late, and since latency counts from when a request was due
//! (coordinated omission), the generator would charge its own lateness to the server: a server
//! answering in 0.6 ms measured 1.2–1.7 ms at 200 requests/s. A [`Pacer`] owns a Linux timerfd
//! registered with tokio's reactor and sleeps on that instead.
//!
//! Invariant: [`Pacer::sleep_until`] never returns before its deadline (it re-reads the clock
//! after every wake-up and re-arms for what is left).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A one-shot timer on its own timerfd; one per task that paces.
pub struct Pacer {
    timer: AsyncFd<OwnedFd>,
}

impl Pacer {
    pub fn new() -> io::Result<Pacer> {
        // SAFETY: plain syscall; the flags are valid for timerfd_create.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the `OwnedFd` moves into the `AsyncFd`, which owns it until dropped, so the
        // descriptor stays open and the same for the `AsyncFd`'s whole life.
        let timer = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Pacer { timer })
    }

    /// Returns at `due` or shortly after; at once if `due` has passed.
    pub async fn sleep_until(&self, due: Instant) -> io::Result<()> {
        loop {
            let Some(left) = due
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
            else {
                return Ok(());
            };
            self.arm(left)?;
            let mut ready = self.timer.readable().await?;
            let mut expirations = [0u8; 8];
            // SAFETY: reads at most 8 bytes into a live 8-byte buffer.
            let read = unsafe {
                libc::read(
                    self.timer.get_ref().as_raw_fd(),
                    expirations.as_mut_ptr().cast(),
                    expirations.len(),
                )
            };
            if read < 0 {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::WouldBlock {
                    return Err(error);
                }
                ready.clear_ready();
            }
        }
    }

    /// Arms the timer to fire once, `after` from now.
    fn arm(&self, after: Duration) -> io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: a valid fd, a valid itimerspec, and no old value asked for.
        let result = unsafe {
            libc::timerfd_settime(
                self.timer.get_ref().as_raw_fd(),
                0,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn never_wakes_before_the_deadline() {
        let pacer = Pacer::new().expect("timerfd");
        for micros in [0u64, 1, 50, 300, 1_500, 4_000] {
            let due = Instant::now() + Duration::from_micros(micros);
            pacer.sleep_until(due).await.expect("sleep");
            assert!(
                Instant::now() >= due,
                "woke before a deadline {micros} µs away"
            );
        }
        // A deadline in the past returns at once.
        let past = Instant::now() - Duration::from_millis(5);
        pacer.sleep_until(past).await.expect("sleep");
    }
}
