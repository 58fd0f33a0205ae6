//! `connrate server PORT [THREADS]`: accept and close connections forever.
//! `connrate client ADDR PORT SECS CONC`: open and close TCP connections from CONC threads for
//! SECS seconds; print the connections per second (and failures) as one line.
//!
//! Only std, no async runtime: each connection is a connect, a one-byte read until close, done.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn usage() -> ! {
    eprintln!("usage: connrate server PORT [THREADS] | connrate client ADDR PORT SECS CONC");
    std::process::exit(2)
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> T {
    args.get(i)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| usage())
}

fn server(port: u16, threads: usize) -> std::io::Result<()> {
    let l = TcpListener::bind(("::", port))?;
    println!("ready");
    let mut hs = Vec::new();
    for _ in 0..threads {
        let l = l.try_clone()?;
        hs.push(std::thread::spawn(move || {
            // Accept and drop: the client sees a clean close.
            for s in l.incoming().flatten() {
                drop(s);
            }
        }));
    }
    for h in hs {
        let _ = h.join();
    }
    Ok(())
}

fn client(addr: SocketAddr, secs: u64, conc: usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let hs: Vec<_> = (0..conc)
        .map(|_| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 1];
                while !stop.load(Ordering::Relaxed) {
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                        Ok(mut s) => {
                            let _ = s.read(&mut buf);
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        let _ = h.join();
    }
    let el = start.elapsed().as_secs_f64();
    println!(
        "{:.0} conn/s ({} ok, {} failed, {:.2} s)",
        ok.load(Ordering::Relaxed) as f64 / el,
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        el
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("server") => {
            let threads = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(2);
            if let Err(e) = server(arg(&args, 2), threads) {
                eprintln!("connrate server: {e}");
                std::process::exit(1);
            }
        }
        Some("client") => {
            let ip: std::net::IpAddr = arg(&args, 2);
            client(
                SocketAddr::new(ip, arg(&args, 3)),
                arg(&args, 4),
                arg(&args, 5),
            );
        }
        _ => usage(),
    }
}
