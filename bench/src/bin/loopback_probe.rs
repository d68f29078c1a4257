//! The machine's own cost of one small TCP send over loopback, the floor under WebSocket fan-out.
//!
//! Opens `N` loopback TCP connections, then one sender thread sweeps them writing `K` 64-byte
//! "frames" per `write` while one receiver thread drains them with epoll, for a few seconds per
//! `K`. Prints, per `K`, the sender's and the receiver's CPU per `write` and per frame (from
//! `getrusage(RUSAGE_THREAD)`). On loopback the sender's `write` also runs the receiving side of
//! TCP (softirq) and the receiver's wake-up, so this is what one send costs a server here.
//!
//! With `uring:N` as third argument, the sender submits one io_uring `send` per connection,
//! `N` per submission (`uring` alone: all connections in one), instead of one `write` syscall
//! each: what batching the syscalls of a fan-out saves.
//!
//! Usage: `loopback_probe [connections=1000] [seconds-per-size=2] [write|uring[:N]]`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const FRAME: usize = 64;

fn thread_cpu() -> Duration {
    // SAFETY: `rusage` is plain integers, for which all-zero bytes are a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid out-pointer for the duration of the call.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let connections: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let seconds: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(2.0);
    // Sends per io_uring submission; `None`: one `write` each.
    let per_submission = match args.next().as_deref() {
        None | Some("write") => None,
        Some("uring") => Some(connections),
        Some(mode) => match mode.strip_prefix("uring:").and_then(|n| n.parse().ok()) {
            Some(n) if n > 0 => Some(n),
            _ => {
                eprintln!("unknown mode {mode:?}: write, uring or uring:N");
                std::process::exit(2);
            }
        },
    };
    let mut ring = match per_submission {
        Some(n) => Some(io_uring::IoUring::new((n as u32).next_power_of_two())?),
        None => None,
    };

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    let mut senders = Vec::with_capacity(connections);
    let mut receivers = Vec::with_capacity(connections);
    for _ in 0..connections {
        let receiver = TcpStream::connect(address)?;
        let (sender, _) = listener.accept()?;
        sender.set_nodelay(true)?;
        receiver.set_nonblocking(true)?;
        senders.push(sender);
        receivers.push(receiver);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let receiver_cpu = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stop, received, receiver_cpu) = (stop.clone(), received.clone(), receiver_cpu.clone());
        std::thread::spawn(move || receive(receivers, &stop, &received, &receiver_cpu))
    };

    let how = match per_submission {
        Some(n) => format!("io_uring sends, {n} per submission"),
        None => "one write per connection".to_string(),
    };
    println!(
        "{connections} loopback TCP connections, one sender thread ({how}), one epoll receiver \
         thread"
    );
    println!("frames/write  writes/s   sender µs/write  sender µs/frame  receiver µs/frame");
    for frames in [1usize, 2, 4, 8, 16, 32, 64] {
        let message = vec![b'x'; frames * FRAME];
        let cpu_before = thread_cpu();
        let received_before = received.load(Ordering::Relaxed);
        let receiver_before = receiver_cpu.load(Ordering::Relaxed);
        let started = Instant::now();
        let mut writes = 0u64;
        while started.elapsed().as_secs_f64() < seconds {
            match &mut ring {
                Some(ring) => {
                    for part in senders.chunks(per_submission.unwrap_or(1)) {
                        send_uring(ring, part, &message)?;
                    }
                }
                None => {
                    for sender in &mut senders {
                        sender.write_all(&message)?;
                    }
                }
            }
            writes += senders.len() as u64;
        }
        let wall = started.elapsed().as_secs_f64();
        let sender_cpu = (thread_cpu() - cpu_before).as_secs_f64() * 1e6;
        // Let the receiver catch up before reading its counters.
        let expected = received_before + writes * message.len() as u64;
        let deadline = Instant::now() + Duration::from_secs(10);
        while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50));
        let receiver_us = (receiver_cpu.load(Ordering::Relaxed) - receiver_before) as f64;
        let frames_sent = (writes * frames as u64) as f64;
        println!(
            "{frames:>12}  {:>8.0}   {:>15.2}  {:>15.3}  {:>17.3}",
            writes as f64 / wall,
            sender_cpu / writes as f64,
            sender_cpu / frames_sent,
            receiver_us / frames_sent,
        );
    }
    stop.store(true, Ordering::Relaxed);
    drop(senders);
    let _ = reader.join();
    Ok(())
}

/// Sends `message` to every sender with one io_uring submission, then waits for all of them.
fn send_uring(
    ring: &mut io_uring::IoUring,
    senders: &[TcpStream],
    message: &[u8],
) -> std::io::Result<()> {
    for sender in senders {
        let send = io_uring::opcode::Send::new(
            io_uring::types::Fd(sender.as_raw_fd()),
            message.as_ptr(),
            message.len() as u32,
        )
        .build();
        // SAFETY: `message` and the sockets outlive the operation, which completes before this
        // function returns (it waits for every completion).
        unsafe { ring.submission().push(&send) }
            .map_err(|_| std::io::Error::other("submission queue full"))?;
    }
    ring.submit_and_wait(senders.len())?;
    for completion in ring.completion() {
        if completion.result() != message.len() as i32 {
            return Err(std::io::Error::other(format!(
                "send returned {}",
                completion.result()
            )));
        }
    }
    Ok(())
}

/// Drains every receiver with epoll until `stop`, counting bytes and publishing its CPU time.
fn receive(
    mut receivers: Vec<TcpStream>,
    stop: &AtomicBool,
    received: &AtomicU64,
    cpu: &AtomicU64,
) {
    // SAFETY: no pointers are passed.
    let epoll = unsafe { libc::epoll_create1(0) };
    assert!(epoll >= 0, "epoll_create1 failed");
    for (token, receiver) in receivers.iter().enumerate() {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token as u64,
        };
        // SAFETY: `epoll` and the socket are open descriptors; `event` outlives the call.
        let added = unsafe {
            libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, receiver.as_raw_fd(), &mut event)
        };
        assert_eq!(added, 0, "epoll_ctl failed");
    }
    let start = thread_cpu();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buffer = vec![0u8; 64 << 10];
    while !stop.load(Ordering::Relaxed) {
        let capacity = events.len() as i32;
        // SAFETY: `events` is a valid buffer of `capacity` entries for the call.
        let ready = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), capacity, 20) };
        for event in events.iter().take(ready.max(0) as usize) {
            let receiver = &mut receivers[event.u64 as usize];
            while let Ok(n) = receiver.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                received.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        cpu.store((thread_cpu() - start).as_micros() as u64, Ordering::Relaxed);
    }
    // SAFETY: `epoll` is this thread's own descriptor, closed once.
    unsafe { libc::close(epoll) };
}
