//! What a channel hand-off costs here, for the engine's channels (shard inboxes, the log
//! writer's kick, the JetStream tail): flume (what the engine uses), crossbeam-channel and
//! std's `sync_channel`, each bounded.
//!
//! Two patterns, each timed per round, rounds interleaved across the three channels so a noisy
//! neighbour hits them alike; the report gives each channel's median over the rounds:
//! - `wake`: two threads ping-pong one message over two channels of capacity 1, each asleep
//!   on its receive until the other sends. One round trip is two hand-offs to a sleeping
//!   thread: what a shard inbox or the writer's kick costs when the engine is not saturated
//!   (its usual state: a group commit or a batch per message, not a stream of them).
//! - `stream`: one thread sends `u64`s into a channel of capacity 1,024 as fast as it can while
//!   another receives them: the cost per message when neither side sleeps.
//!
//! Usage: `channel_probe [ROUNDS] [ROUND_TRIPS] [STREAM_MESSAGES]` (defaults 7, 20,000,
//! 1,000,000).

use std::time::{Duration, Instant};

/// One channel implementation behind the two patterns.
trait Channel: 'static {
    const NAME: &'static str;
    type Tx: Send + 'static;
    type Rx: Send + 'static;
    fn bounded(capacity: usize) -> (Self::Tx, Self::Rx);
    fn send(tx: &Self::Tx, value: u64);
    fn recv(rx: &Self::Rx) -> u64;
}

struct Flume;
impl Channel for Flume {
    const NAME: &'static str = "flume";
    type Tx = flume::Sender<u64>;
    type Rx = flume::Receiver<u64>;
    fn bounded(capacity: usize) -> (Self::Tx, Self::Rx) {
        flume::bounded(capacity)
    }
    fn send(tx: &Self::Tx, value: u64) {
        tx.send(value).expect("receiver alive");
    }
    fn recv(rx: &Self::Rx) -> u64 {
        rx.recv().expect("sender alive")
    }
}

struct Crossbeam;
impl Channel for Crossbeam {
    const NAME: &'static str = "crossbeam";
    type Tx = crossbeam::channel::Sender<u64>;
    type Rx = crossbeam::channel::Receiver<u64>;
    fn bounded(capacity: usize) -> (Self::Tx, Self::Rx) {
        crossbeam::channel::bounded(capacity)
    }
    fn send(tx: &Self::Tx, value: u64) {
        tx.send(value).expect("receiver alive");
    }
    fn recv(rx: &Self::Rx) -> u64 {
        rx.recv().expect("sender alive")
    }
}

struct Std;
impl Channel for Std {
    const NAME: &'static str = "std sync_channel";
    type Tx = std::sync::mpsc::SyncSender<u64>;
    type Rx = std::sync::mpsc::Receiver<u64>;
    fn bounded(capacity: usize) -> (Self::Tx, Self::Rx) {
        std::sync::mpsc::sync_channel(capacity)
    }
    fn send(tx: &Self::Tx, value: u64) {
        tx.send(value).expect("receiver alive");
    }
    fn recv(rx: &Self::Rx) -> u64 {
        rx.recv().expect("sender alive")
    }
}

/// Mean µs per round trip of `trips` ping-pongs between two threads.
fn wake<C: Channel>(trips: u64) -> f64 {
    let (ping_tx, ping_rx) = C::bounded(1);
    let (pong_tx, pong_rx) = C::bounded(1);
    let echo = std::thread::spawn(move || {
        for _ in 0..trips {
            let value = C::recv(&ping_rx);
            C::send(&pong_tx, value);
        }
    });
    // Let the echo thread reach its first receive and sleep there.
    std::thread::sleep(Duration::from_millis(5));
    let started = Instant::now();
    for i in 0..trips {
        C::send(&ping_tx, i);
        assert_eq!(C::recv(&pong_rx), i);
    }
    let elapsed = started.elapsed();
    echo.join().expect("echo thread");
    elapsed.as_secs_f64() * 1e6 / trips as f64
}

/// Mean ns per message of `messages` streamed from one thread to another.
fn stream<C: Channel>(messages: u64) -> f64 {
    let (tx, rx) = C::bounded(1024);
    let started = Instant::now();
    let sink = std::thread::spawn(move || {
        let mut sum = 0u64;
        for _ in 0..messages {
            sum = sum.wrapping_add(C::recv(&rx));
        }
        sum
    });
    for i in 0..messages {
        C::send(&tx, i);
    }
    let sum = sink.join().expect("sink thread");
    assert_eq!(sum, messages * (messages - 1) / 2);
    started.elapsed().as_secs_f64() * 1e9 / messages as f64
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn number(arg: Option<String>, name: &str, default: u64) -> u64 {
    match arg {
        None => default,
        Some(text) => text.parse().unwrap_or_else(|_| {
            eprintln!("{name} must be a whole number, not {text:?}");
            std::process::exit(2)
        }),
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds = number(args.next(), "ROUNDS", 7).max(1) as usize;
    let trips = number(args.next(), "ROUND_TRIPS", 20_000).max(1);
    let messages = number(args.next(), "STREAM_MESSAGES", 1_000_000).max(2);
    let mut wakes = [Vec::new(), Vec::new(), Vec::new()];
    let mut streams = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..rounds {
        wakes[0].push(wake::<Flume>(trips));
        wakes[1].push(wake::<Crossbeam>(trips));
        wakes[2].push(wake::<Std>(trips));
        streams[0].push(stream::<Flume>(messages));
        streams[1].push(stream::<Crossbeam>(messages));
        streams[2].push(stream::<Std>(messages));
    }
    println!("medians of {rounds} rounds ({trips} round trips, {messages} streamed messages each)");
    println!(
        "{:<18} {:>22} {:>20}",
        "channel", "wake: µs/round trip", "stream: ns/message"
    );
    for (i, name) in [Flume::NAME, Crossbeam::NAME, Std::NAME].iter().enumerate() {
        println!(
            "{name:<18} {:>22.2} {:>20.1}",
            median(&mut wakes[i]),
            median(&mut streams[i])
        );
    }
}
