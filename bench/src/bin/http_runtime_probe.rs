//! What one keep-alive HTTP request costs a server here with nothing behind it: the floor the
//! async runtime and the TCP stack put under `ingest -c 32`, per runtime.
//!
//! Serves `POST`s (or anything) on `127.0.0.1:PORT` with a fixed 200 JSON reply the size of
//! Flux's publish reply, parsing only the request head's end and `Content-Length`. No disk, no
//! JSON: what is left is reading the request, writing the reply, and the runtime between them.
//! Drive it with `wrk -t2 -c32 -d5s -s perf/experiments/wrk-post.lua http://127.0.0.1:PORT` and
//! divide the server's CPU (`/proc/PID/stat`, printed on SIGINT/after `--seconds`) by requests.
//!
//! Usage: `http_runtime_probe MODE [port=18700] [seconds=12]`, MODE one of
//! - `tokio`: a multi-thread tokio runtime with 2 workers, one task per connection (as Flux);
//! - `hyper`: the same with hyper's HTTP/1.1 server instead of the hand parser (as Flux);
//! - `monoio`: two monoio io_uring runtimes, thread per core, each accepting on its own
//!   `SO_REUSEPORT` listener (the kernel spreads connections between them);
//! - `monoio-legacy`: the same on monoio's epoll driver.

use std::time::{Duration, Instant};

/// A publish reply: `{"eventId":<uuid>,"stream":"load"}`.
const BODY: &[u8] = br#"{"eventId":"019ab7e4-5e1c-7c3a-9f21-4d8e2b6a1c07","stream":"load"}"#;

fn reply() -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        BODY.len()
    )
    .into_bytes();
    out.extend_from_slice(BODY);
    out
}

/// The length of the first complete request in `buf` (head plus `Content-Length` body).
fn request_len(buf: &[u8]) -> Option<usize> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = &buf[..head_end];
    let mut body = 0usize;
    for line in head.split(|b| *b == b'\n') {
        if line.len() > 15 && line[..15].eq_ignore_ascii_case(b"content-length:") {
            let value = std::str::from_utf8(&line[15..]).ok()?.trim();
            body = value.parse().ok()?;
        }
    }
    (buf.len() >= head_end + body).then_some(head_end + body)
}

/// Process CPU seconds (user, system) from `/proc/self/stat`.
fn cpu_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command.
    (field(11) / ticks, field(12) / ticks)
}

static REQUESTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn count() {
    REQUESTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Prints requests, CPU per request, every `seconds`/4 after the first request, for `seconds`.
fn report(seconds: f64) {
    let started = Instant::now();
    while REQUESTS.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        if started.elapsed() > Duration::from_secs(60) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Skip the first second (connections opening, caches warming).
    std::thread::sleep(Duration::from_secs(1));
    let (u0, s0) = cpu_seconds();
    let r0 = REQUESTS.load(std::sync::atomic::Ordering::Relaxed);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let (u1, s1) = cpu_seconds();
    let r1 = REQUESTS.load(std::sync::atomic::Ordering::Relaxed);
    let n = (r1 - r0).max(1) as f64;
    println!(
        "requests/s {:.0}  server µs/request {:.2} (user {:.2}, sys {:.2})",
        n / t0.elapsed().as_secs_f64(),
        (u1 - u0 + s1 - s0) * 1e6 / n,
        (u1 - u0) * 1e6 / n,
        (s1 - s0) * 1e6 / n,
    );
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "tokio".into());
    let port: u16 = args.next().and_then(|a| a.parse().ok()).unwrap_or(18700);
    let seconds: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(4.0);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    println!("{mode} on http://{addr}");
    match mode.as_str() {
        "tokio" => {
            std::thread::spawn(move || tokio_server(addr, false));
        }
        "hyper" => {
            std::thread::spawn(move || tokio_server(addr, true));
        }
        "monoio" | "monoio-legacy" => {
            for _ in 0..2 {
                let legacy = mode == "monoio-legacy";
                std::thread::spawn(move || monoio_server(addr, legacy));
            }
        }
        other => {
            eprintln!("unknown mode {other:?}: tokio, hyper, monoio, monoio-legacy");
            std::process::exit(2);
        }
    }
    report(seconds);
    Ok(())
}

fn tokio_server(addr: std::net::SocketAddr, hyper: bool) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            if hyper {
                tokio::spawn(hyper_connection(stream));
            } else {
                tokio::spawn(tokio_connection(stream));
            }
        }
    });
}

async fn tokio_connection(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let reply = reply();
    let mut buf = Vec::with_capacity(8192);
    loop {
        while let Some(len) = request_len(&buf) {
            buf.drain(..len);
            count();
            if stream.write_all(&reply).await.is_err() {
                return;
            }
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

async fn hyper_connection(stream: tokio::net::TcpStream) {
    use http_body_util::{BodyExt, Full};
    let service = hyper::service::service_fn(
        |request: hyper::Request<hyper::body::Incoming>| async move {
            let _ = request.into_body().collect().await;
            count();
            let mut response = hyper::Response::new(Full::new(bytes::Bytes::from_static(BODY)));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            Ok::<_, std::convert::Infallible>(response)
        },
    );
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await;
}

fn monoio_server(addr: std::net::SocketAddr, legacy: bool) {
    let serve = async move {
        let options = monoio::net::ListenerOpts::default().reuse_port(true);
        let listener = monoio::net::TcpListener::bind_with_config(addr, &options).expect("bind");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            monoio::spawn(monoio_connection(stream));
        }
    };
    if legacy {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .expect("monoio legacy runtime")
            .block_on(serve);
    } else {
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .build()
            .expect("monoio io_uring runtime")
            .block_on(serve);
    }
}

async fn monoio_connection(mut stream: monoio::net::TcpStream) {
    use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
    let mut reply = reply();
    let mut pending: Vec<u8> = Vec::with_capacity(8192);
    let mut read_buf: Vec<u8> = Vec::with_capacity(8192);
    loop {
        while let Some(len) = request_len(&pending) {
            pending.drain(..len);
            count();
            let (result, back) = stream.write_all(reply).await;
            reply = back;
            if result.is_err() {
                return;
            }
        }
        read_buf.clear();
        let (result, back) = stream.read(read_buf).await;
        read_buf = back;
        match result {
            Ok(0) | Err(_) => return,
            Ok(_) => pending.extend_from_slice(&read_buf),
        }
    }
}
