//! How the engine's own threads (shards, the log writer) wait for work and where they run.
//!
//! Invariants: a thread never spins longer than its configured window before it sleeps on its
//! channel, so an idle engine burns next to no CPU (an idle shard wakes every 200 ms to see
//! whether its ids need sorting); pinning only narrows a thread to one CPU of those
//! the process may use, and failing to pin is logged and otherwise ignored.

use std::time::{Duration, Instant};

/// Waiting and placement of the engine's threads (`--spin-us`, `--pin`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadPolicy {
    /// Poll the inbox this long after it runs dry before sleeping on it (0: sleep at once).
    pub spin: Duration,
    /// Pin each shard thread to one CPU (shard k to the k-th allowed CPU, wrapping).
    pub pin: bool,
}

/// Polls `rx` until `until`: `Some(Ok)` with a message, `Some(Err)` once every sender is gone
/// and the channel is empty, `None` if nothing came in time.
fn poll_until<T>(rx: &flume::Receiver<T>, until: Instant) -> Option<Result<T, ()>> {
    loop {
        match rx.try_recv() {
            Ok(message) => return Some(Ok(message)),
            Err(flume::TryRecvError::Disconnected) => return Some(Err(())),
            Err(flume::TryRecvError::Empty) if Instant::now() >= until => return None,
            Err(flume::TryRecvError::Empty) => std::hint::spin_loop(),
        }
    }
}

/// Receives the next message, polling for up to `spin` before sleeping on the channel.
/// `Err` once every sender is gone and the channel is empty.
pub fn recv_spinning<T>(rx: &flume::Receiver<T>, spin: Duration) -> Result<T, flume::RecvError> {
    if !spin.is_zero() {
        match poll_until(rx, Instant::now() + spin) {
            Some(Ok(message)) => return Ok(message),
            Some(Err(())) => return Err(flume::RecvError::Disconnected),
            None => {}
        }
    }
    rx.recv()
}

/// Like [`recv_spinning`], but gives up after `timeout` (counted from the call).
pub fn recv_spinning_timeout<T>(
    rx: &flume::Receiver<T>,
    spin: Duration,
    timeout: Duration,
) -> Result<T, flume::RecvTimeoutError> {
    let now = Instant::now();
    if !spin.is_zero() {
        match poll_until(rx, now + spin.min(timeout)) {
            Some(Ok(message)) => return Ok(message),
            Some(Err(())) => return Err(flume::RecvTimeoutError::Disconnected),
            None => {}
        }
    }
    rx.recv_deadline(now + timeout)
}

/// The CPUs this process may run on, in order.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed `cpu_set_t` is a valid (empty) set; the kernel writes at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: `set` is a live, writable `cpu_set_t` of `size` bytes.
    if unsafe { libc::sched_getaffinity(0, size, &mut set) } != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, inside the set.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// Pins the calling thread to the `index`-th allowed CPU (wrapping). Logs and carries on when
/// the kernel refuses.
pub fn pin_current_thread(index: usize) {
    let cpus = allowed_cpus();
    if cpus.is_empty() {
        tracing::warn!("cannot read this process's CPU set; thread not pinned");
        return;
    }
    let cpu = cpus[index % cpus.len()];
    // SAFETY: a zeroed `cpu_set_t` is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` came from the allowed set, so it is below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: `set` is a live `cpu_set_t` of `size` bytes; 0 names the calling thread.
    if unsafe { libc::sched_setaffinity(0, size, &set) } != 0 {
        let error = std::io::Error::last_os_error();
        tracing::warn!(cpu, %error, "pinning a thread failed; it runs unpinned");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spinning_receive_gets_messages_and_sees_the_end() {
        let (tx, rx) = flume::unbounded();
        let spin = Duration::from_micros(200);
        let sender = std::thread::spawn(move || {
            for i in 0..1000u32 {
                tx.send(i).expect("send");
                if i % 100 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
        for i in 0..1000u32 {
            assert_eq!(recv_spinning(&rx, spin), Ok(i));
        }
        sender.join().expect("sender");
        assert_eq!(
            recv_spinning(&rx, spin),
            Err(flume::RecvError::Disconnected)
        );
    }

    #[test]
    fn spinning_receive_with_timeout_times_out() {
        let (_tx, rx) = flume::unbounded::<u32>();
        let started = Instant::now();
        let got = recv_spinning_timeout(&rx, Duration::from_micros(100), Duration::from_millis(20));
        assert_eq!(got, Err(flume::RecvTimeoutError::Timeout));
        assert!(started.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn pinning_keeps_the_thread_inside_the_allowed_set() {
        let allowed = allowed_cpus();
        assert!(!allowed.is_empty());
        std::thread::spawn(move || {
            pin_current_thread(allowed.len() + 1);
            let now = allowed_cpus();
            assert_eq!(now, vec![allowed[1 % allowed.len()]]);
        })
        .join()
        .expect("pinned thread");
    }
}
