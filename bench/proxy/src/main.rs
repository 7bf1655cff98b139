//! Open-loop HTTP/1.1 load: `C` keep-alive connections send `GET PATH` on a fixed schedule
//! totalling `RATE` requests per second for `SECONDS`; latency counts from the scheduled
//! send time (no coordinated omission). With `RATE` 0 it runs closed-loop as fast as it
//! can. Prints `rps p50_ms p99_ms errors`.
//!
//! Usage: meshward-loadgen HOST:PORT PATH RATE SECONDS CONNECTIONS

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn one(stream: &mut tokio::net::TcpStream, req: &[u8], buf: &mut Vec<u8>) -> std::io::Result<()> {
    stream.write_all(req).await?;
    buf.clear();
    let mut tmp = [0u8; 4096];
    loop {
        let n = stream.read(&mut tmp).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(h) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..h]).to_ascii_lowercase();
            let len: usize = head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
            if buf.len() >= h + 4 + len {
                if !head.starts_with("http/1.1 200") {
                    return Err(std::io::Error::other(head.lines().next().unwrap_or("").to_owned()));
                }
                return Ok(());
            }
        }
    }
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 6 {
        eprintln!("usage: meshward-loadgen HOST:PORT PATH RATE SECONDS CONNECTIONS");
        std::process::exit(2);
    }
    let (addr, path) = (a[1].clone(), a[2].clone());
    let rate: f64 = a[3].parse().unwrap_or(0.0);
    let secs: u64 = a[4].parse().unwrap_or(10);
    let conns: usize = a[5].parse().unwrap_or(1);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap_or_else(|e| panic!("{e}"));
    let (lat, errors, elapsed) = rt.block_on(async move {
        let req = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").into_bytes();
        let start = Instant::now();
        let end = start + Duration::from_secs(secs);
        let mut tasks = vec![];
        for c in 0..conns {
            let (addr, req) = (addr.clone(), req.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0u64;
                let mut s = match tokio::net::TcpStream::connect(&addr).await {
                    Ok(s) => s,
                    Err(_) => return (lat, 1),
                };
                let _ = s.set_nodelay(true);
                let mut buf = Vec::with_capacity(4096);
                let interval = if rate > 0.0 { Some(Duration::from_secs_f64(conns as f64 / rate)) } else { None };
                let mut next = start + interval.map_or(Duration::ZERO, |i| i.mul_f64(c as f64 / conns as f64));
                while Instant::now() < end {
                    if interval.is_some() {
                        tokio::time::sleep_until(next.into()).await;
                    }
                    let sched = if interval.is_some() { next } else { Instant::now() };
                    match one(&mut s, &req, &mut buf).await {
                        Ok(()) => lat.push(sched.elapsed()),
                        Err(_) => {
                            errors += 1;
                            match tokio::net::TcpStream::connect(&addr).await {
                                Ok(n) => s = n,
                                Err(_) => break,
                            }
                        }
                    }
                    if let Some(i) = interval {
                        next += i;
                    }
                }
                (lat, errors)
            }));
        }
        let mut all = vec![];
        let mut errors = 0;
        for t in tasks {
            if let Ok((l, e)) = t.await {
                all.extend(l);
                errors += e;
            }
        }
        (all, errors, start.elapsed())
    });
    let mut lat = lat;
    lat.sort_unstable();
    let q = |p: f64| lat.get(((lat.len().max(1) - 1) as f64 * p) as usize).map_or(0.0, |d| d.as_secs_f64() * 1e3);
    println!("{:.0} {:.3} {:.3} {}", lat.len() as f64 / elapsed.as_secs_f64(), q(0.5), q(0.99), errors);
}
