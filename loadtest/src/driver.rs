//! The request driver: C connection tasks issuing a [`RequestSource`]'s requests, closed loop
//! (each connection sends its next request as soon as the last one is answered) or open loop
//! (request `i` is due at `start + i / rate`, whoever is free sends it).
//!
//! Invariants:
//! - Open loop latency runs from the request's *due* time, not its send time, so a stalled
//!   server shows up as latency instead of silently slowing the generator (coordinated
//!   omission). A request more than `drop_after` behind schedule, or beyond `max_backlog` due
//!   requests, is skipped and counted as dropped; one sent more than `late_after` behind
//!   schedule is counted as late.
//! - Only requests due (open loop) or started (closed loop) inside the measured window count
//!   toward the tally; warmup requests count only in the totals.
//! - Each task keeps its own tally; they are merged once at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hdrhistogram::Histogram;
use hyper::{Method, StatusCode};

use crate::http::{Connection, Target, find_u64_after};
use crate::payload::{RequestSource, unix_ns};
use crate::report::{Errors, new_histogram, record};

/// Start, start of measurement, and end of a run.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub start: Instant,
    pub measure_start: Instant,
    pub end: Instant,
}

impl Schedule {
    pub fn new(warmup: Duration, duration: Duration) -> Schedule {
        let start = Instant::now();
        Schedule {
            start,
            measure_start: start + warmup,
            end: start + warmup + duration,
        }
    }
}

/// How requests are issued.
#[derive(Debug, Clone)]
pub struct Plan {
    pub connections: usize,
    /// Requests per second for an open loop; `None` for a closed loop.
    pub request_rate: Option<f64>,
    /// Stop after this many requests (closed loop).
    pub request_limit: Option<u64>,
    pub drop_after: Duration,
    pub late_after: Duration,
    pub max_backlog: Option<u64>,
    pub timeout: Duration,
}

/// Running totals over all phases, for the progress line.
#[derive(Debug, Default)]
pub struct Live {
    pub requests: AtomicU64,
    pub events: AtomicU64,
    pub errors: AtomicU64,
}

/// What the connections did.
#[derive(Debug)]
pub struct Tally {
    /// Measured window: requests answered 200.
    pub requests: u64,
    /// Measured window: events the server accepted.
    pub events: u64,
    /// Measured window: failures by status or transport.
    pub errors: Errors,
    /// Measured window: requests sent more than `late_after` behind schedule.
    pub late: u64,
    /// Measured window: requests skipped for being too far behind.
    pub dropped: u64,
    /// Measured window: µs from due (open) or send (closed) to the complete reply.
    pub latency: Histogram<u64>,
    /// All phases: events the server accepted.
    pub total_events: u64,
    /// All phases: requests answered 200.
    pub total_requests: u64,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            requests: 0,
            events: 0,
            errors: Errors::default(),
            late: 0,
            dropped: 0,
            latency: new_histogram(),
            total_events: 0,
            total_requests: 0,
        }
    }

    fn merge(&mut self, other: Tally) {
        self.requests += other.requests;
        self.events += other.events;
        self.errors.merge(&other.errors);
        self.late += other.late;
        self.dropped += other.dropped;
        let _ = self.latency.add(&other.latency);
        self.total_events += other.total_events;
        self.total_requests += other.total_requests;
    }
}

struct Shared {
    target: Target,
    source: Arc<dyn RequestSource>,
    plan: Plan,
    schedule: Schedule,
    /// The next ticket (request sequence number) nobody has taken yet.
    next_ticket: AtomicU64,
    live: Arc<Live>,
}

impl Shared {
    /// Takes the next request: its ticket and, in an open loop, when it is due. `None` when
    /// the run is over.
    fn take_ticket(&self, tally: &mut Tally) -> Option<(u64, Option<Instant>)> {
        if crate::interrupt::stopped_at().is_some() {
            return None;
        }
        let Some(rate) = self.plan.request_rate else {
            if Instant::now() >= self.schedule.end {
                return None;
            }
            let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
            return match self.plan.request_limit {
                Some(limit) if ticket >= limit => None,
                _ => Some((ticket, None)),
            };
        };
        let elapsed = Instant::now()
            .saturating_duration_since(self.schedule.start)
            .as_secs_f64();
        let due_by_now = (elapsed * rate) as u64;
        let oldest_by_time =
            ((elapsed - self.plan.drop_after.as_secs_f64()) * rate).max(0.0) as u64;
        let oldest_by_backlog = self
            .plan
            .max_backlog
            .map_or(0, |max| due_by_now.saturating_sub(max));
        let oldest = oldest_by_time.max(oldest_by_backlog);
        let mut current = self.next_ticket.load(Ordering::Relaxed);
        loop {
            let take = current.max(oldest);
            match self.next_ticket.compare_exchange_weak(
                current,
                take + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    tally.dropped += self.measured_tickets(current, take);
                    let due = self.schedule.start + Duration::from_secs_f64(take as f64 / rate);
                    return (due < self.schedule.end).then_some((take, Some(due)));
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// How many of tickets `from..to` are due inside the measured window.
    fn measured_tickets(&self, from: u64, to: u64) -> u64 {
        let Some(rate) = self.plan.request_rate else {
            return 0;
        };
        if from >= to {
            return 0;
        }
        let at =
            |t: Instant| (t.duration_since(self.schedule.start).as_secs_f64() * rate).ceil() as u64;
        let (first, last) = (at(self.schedule.measure_start), at(self.schedule.end));
        to.min(last).saturating_sub(from.max(first))
    }
}

/// Runs the plan to the end of the schedule (or the request limit) and merges the tallies.
pub async fn run(
    target: Target,
    source: Arc<dyn RequestSource>,
    plan: Plan,
    schedule: Schedule,
    live: Arc<Live>,
) -> Tally {
    let shared = Arc::new(Shared {
        target,
        source,
        plan,
        schedule,
        next_ticket: AtomicU64::new(0),
        live,
    });
    let tasks: Vec<_> = (0..shared.plan.connections.max(1))
        .map(|_| tokio::spawn(connection_task(shared.clone())))
        .collect();
    let mut total = Tally::new();
    for task in tasks {
        if let Ok(tally) = task.await {
            total.merge(tally);
        }
    }
    total
}

async fn connection_task(shared: Arc<Shared>) -> Tally {
    let mut tally = Tally::new();
    // One buffer per connection: each body is split off and frozen, and once hyper drops it
    // `reserve` reclaims the same allocation for the next body.
    let mut buffer = BytesMut::with_capacity(16 * 1024);
    let mut largest_body = 0;
    let mut connection: Option<Connection> = None;
    let is_batch = shared.source.path().ends_with("/batch");
    // tokio's own timer would leave up to 1 ms late (see `pacer`); it is the fallback only.
    let pacer = crate::pacer::Pacer::new().ok();
    while let Some((ticket, due)) = shared.take_ticket(&mut tally) {
        if let Some(due) = due {
            let paced = match &pacer {
                Some(pacer) => pacer.sleep_until(due).await.is_ok(),
                None => false,
            };
            if !paced {
                tokio::time::sleep_until(due.into()).await;
            }
        }
        let started = Instant::now();
        let reference = due.unwrap_or(started);
        let measured = reference >= shared.schedule.measure_start;
        if measured && started.saturating_duration_since(reference) > shared.plan.late_after {
            tally.late += 1;
        }
        buffer.reserve(largest_body);
        // When it was due, on the clock subscribers read (an `Instant` has no epoch).
        let due_ns = unix_ns().saturating_sub(started.duration_since(reference).as_nanos() as u64);
        shared.source.write_body(ticket, due_ns, &mut buffer);
        largest_body = largest_body.max(buffer.len());
        let body = buffer.split().freeze();

        if connection.as_ref().is_some_and(Connection::is_closed) {
            connection = None;
        }
        let path = shared.source.path();
        let (target, timeout) = (&shared.target, shared.plan.timeout);
        let result = match &mut connection {
            Some(open) => open.send(target, Method::POST, path, body, timeout).await,
            None => match Connection::open(target).await {
                Ok(opened) => {
                    let open = connection.insert(opened);
                    open.send(target, Method::POST, path, body, timeout).await
                }
                Err(error) => Err(error),
            },
        };
        let finished = Instant::now();
        match result {
            Ok(reply) if reply.status == StatusCode::OK => {
                let events = if is_batch {
                    let failed = find_u64_after(&reply.body, b"\"failed\":").unwrap_or(0);
                    if failed > 0 {
                        crate::http::note_refusal(reply.status, &reply.body);
                        if measured {
                            tally.errors.add("event_failed", failed);
                        }
                    }
                    find_u64_after(&reply.body, b"\"successful\":").unwrap_or(0)
                } else {
                    shared.source.events_in(ticket)
                };
                shared.live.requests.fetch_add(1, Ordering::Relaxed);
                shared.live.events.fetch_add(events, Ordering::Relaxed);
                tally.total_requests += 1;
                tally.total_events += events;
                if measured {
                    tally.requests += 1;
                    tally.events += events;
                    record(
                        &mut tally.latency,
                        finished.duration_since(reference).as_micros() as u64,
                    );
                }
            }
            Ok(reply) => {
                crate::http::note_refusal(reply.status, &reply.body);
                shared.live.errors.fetch_add(1, Ordering::Relaxed);
                if measured {
                    tally.errors.add_status(reply.status.as_u16());
                }
            }
            Err(error) => {
                shared.live.errors.fetch_add(1, Ordering::Relaxed);
                if measured {
                    tally.errors.add(error.key(), 1);
                }
                connection = None;
                // A refused connect returns at once; do not spin while the server is away.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    tally
}
