//! Measures what thread hand-offs add to a durable round trip on this machine, the floor under
//! `flux-loadtest e2e --subscribers 1`.
//!
//! A client sends a 64-byte request over loopback TCP at a fixed rate and waits for 64 bytes on
//! a second connection (the "subscriber"). The server side reads the request, appends 4 KiB to a
//! file and `fdatasync`s it, then writes to the subscriber. The request passes through h more
//! threads after the reader, each asleep on a channel until it arrives; the last one writes to
//! the subscriber (like a shard), and the thread at `sync_at` (0 = the reader) does the append +
//! fdatasync. The configurations:
//! - 0 hand-offs: one thread does everything (run to completion);
//! - 1 hand-off, sync in the reader: the reader syncs, a second thread writes (a leader group
//!   commit in the HTTP worker, then a shard);
//! - 1 hand-off, sync after it: the reader hands to a thread that syncs and writes (a log
//!   writer that also applies);
//! - 2 hand-offs: reader → syncing thread → writing thread (Flux today: HTTP worker → log
//!   writer → shard).
//!
//! Every configuration runs in turn, round after round, so a noisy neighbour hits them alike;
//! the report gives each one's p50/p99 and the fdatasync's own.
//!
//! Usage: `hop_probe [DIR] [REQUESTS_PER_ROUND] [ROUNDS] [RATE_PER_S]` (defaults: `target/tmp`,
//! 400, 3, 200). DIR must be on the disk under test.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const MESSAGE_BYTES: usize = 64;
const APPEND_BYTES: usize = 4096;
/// `(hand-offs, index of the thread that syncs)`, described in the module comment.
const CONFIGS: [(usize, usize); 4] = [(0, 0), (1, 0), (1, 1), (2, 1)];

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "target/tmp".into()));
    let requests = number(args.next(), "REQUESTS_PER_ROUND", 400)?;
    let rounds = number(args.next(), "ROUNDS", 3)?;
    let rate = number(args.next(), "RATE_PER_S", 200)?.max(1);
    std::fs::create_dir_all(&dir)?;
    let mut round_trips: Vec<Vec<Duration>> = vec![Vec::new(); CONFIGS.len()];
    let mut syncs: Vec<Duration> = Vec::new();
    for _ in 0..rounds {
        for (&(hops, sync_at), samples) in CONFIGS.iter().zip(round_trips.iter_mut()) {
            let path = dir.join(format!("hop_probe.{}.tmp", std::process::id()));
            let result = run(&path, hops, sync_at, requests, rate);
            let _ = std::fs::remove_file(&path);
            let (trips, sync) = result?;
            samples.extend(trips);
            syncs.extend(sync);
        }
    }
    let fsync = percentiles(&mut syncs);
    println!(
        "append {APPEND_BYTES} B + fdatasync inside the runs: p50 {:.0} us, p99 {:.0} us",
        fsync.0, fsync.1
    );
    for (&(hops, sync_at), samples) in CONFIGS.iter().zip(round_trips.iter_mut()) {
        let (p50, p99) = percentiles(samples);
        println!(
            "{hops} hand-off(s), sync in thread {sync_at}: round trip p50 {p50:.0} us (fdatasync p50 + {:.0}), p99 {p99:.0} us \
             (fdatasync p99 + {:.0}), {} samples",
            p50 - fsync.0,
            p99 - fsync.1,
            samples.len()
        );
    }
    Ok(())
}

/// One configuration: returns the client's round trips and the server's fdatasync times.
fn run(
    path: &std::path::Path,
    hops: usize,
    sync_at: usize,
    requests: usize,
    rate: usize,
) -> std::io::Result<(Vec<Duration>, Vec<Duration>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    let mut request = TcpStream::connect(address)?;
    let (request_in, _) = listener.accept()?;
    let mut subscriber = TcpStream::connect(address)?;
    let (subscriber_out, _) = listener.accept()?;
    for stream in [&request, &request_in, &subscriber, &subscriber_out] {
        stream.set_nodelay(true)?;
    }
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let server = std::thread::spawn(move || serve(request_in, subscriber_out, file, hops, sync_at));

    let mut trips = Vec::with_capacity(requests);
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut message = [0u8; MESSAGE_BYTES];
    let mut due = Instant::now() + interval;
    for _ in 0..requests {
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        due += interval;
        let sent = Instant::now();
        request.write_all(&message)?;
        subscriber.read_exact(&mut message)?;
        trips.push(sent.elapsed());
    }
    drop(request);
    let syncs = server
        .join()
        .map_err(|_| std::io::Error::other("server thread panicked"))??;
    Ok((trips, syncs))
}

/// The server side: thread 0 reads, threads 1..=hops each wait on a channel. Thread `sync_at`
/// appends and syncs; the last one writes to the subscriber.
fn serve(
    mut request: TcpStream,
    subscriber: TcpStream,
    file: std::fs::File,
    hops: usize,
    sync_at: usize,
) -> std::io::Result<Vec<Duration>> {
    let (sync_tx, sync_rx) = mpsc::channel::<Duration>();
    let mut output = Output::Socket(subscriber);
    let mut threads = Vec::new();
    for hop in (1..=hops).rev() {
        let (tx, rx) = mpsc::channel::<[u8; MESSAGE_BYTES]>();
        let mut stage = Stage {
            file: (hop == sync_at).then(|| file.try_clone()).transpose()?,
            syncs: sync_tx.clone(),
            output: std::mem::replace(&mut output, Output::Channel(tx)),
        };
        threads.push(std::thread::spawn(move || -> std::io::Result<()> {
            while let Ok(message) = rx.recv() {
                stage.handle(message)?;
            }
            Ok(())
        }));
    }
    let mut reader = Stage {
        file: (sync_at == 0).then_some(file),
        syncs: sync_tx,
        output,
    };
    let mut message = [0u8; MESSAGE_BYTES];
    loop {
        match request.read_exact(&mut message) {
            Ok(()) => reader.handle(message)?,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
    }
    drop(reader);
    for thread in threads {
        thread
            .join()
            .map_err(|_| std::io::Error::other("hop thread panicked"))??;
    }
    Ok(sync_rx.into_iter().collect())
}

/// What one thread does with a message: append and sync if it holds the file, then pass the
/// message on.
struct Stage {
    file: Option<std::fs::File>,
    syncs: mpsc::Sender<Duration>,
    output: Output,
}

enum Output {
    Channel(mpsc::Sender<[u8; MESSAGE_BYTES]>),
    Socket(TcpStream),
}

impl Stage {
    fn handle(&mut self, message: [u8; MESSAGE_BYTES]) -> std::io::Result<()> {
        if let Some(file) = &mut self.file {
            self.syncs.send(append_and_sync(file)?).ok();
        }
        match &mut self.output {
            Output::Channel(next) => next
                .send(message)
                .map_err(|_| std::io::Error::other("next hop stopped")),
            Output::Socket(subscriber) => subscriber.write_all(&message),
        }
    }
}

fn append_and_sync(file: &mut std::fs::File) -> std::io::Result<Duration> {
    let started = Instant::now();
    file.write_all(&[7u8; APPEND_BYTES])?;
    file.sync_data()?;
    Ok(started.elapsed())
}

fn percentiles(samples: &mut [Duration]) -> (f64, f64) {
    if samples.is_empty() {
        return (0.0, 0.0);
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.50).as_secs_f64() * 1e6, at(0.99).as_secs_f64() * 1e6)
}

fn number(arg: Option<String>, name: &str, default: usize) -> std::io::Result<usize> {
    arg.map_or(Ok(default), |s| {
        s.parse().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{name} must be a whole number, not {s:?}"),
            )
        })
    })
}
