//! hitless-testsvc: a small HTTP/1.1 service for the driver tests and the demo.
//!
//! `GET /healthz` answers 200 "ok" (503 with `--unhealthy`, or after `GET /drain`);
//! `GET /drain` answers 200 and turns health to 503 (the pre-stop hook target); any other
//! request answers 200 with "VERSION ADDR\n". Connections are kept alive until the client
//! sends `Connection: close` or closes. `--reset-half` resets every second connection
//! (SO_LINGER 0) instead of answering: a faulty version for rollout tests; `--boot-ms`
//! delays listening, like a service that takes a while to start; `--backlog N` sets the
//! listen backlog (Python's `http.server` uses 5: under load its accept queue overflows,
//! the kernel drops SYNs and clients retransmit them a second later). On SIGTERM it
//! stops accepting, finishes the requests of open connections until their clients close
//! them (answering with `Connection: close` from then on), and exits 0.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use clap::Parser;

/// Command line.
#[derive(Parser)]
#[command(
    name = "hitless-testsvc",
    about = "HTTP/1.1 test service: /healthz, /drain, and VERSION ADDR for anything else"
)]
struct Args {
    /// Address to listen on (IP:PORT).
    #[arg(long)]
    listen: SocketAddr,
    /// Version to report.
    #[arg(long)]
    version: String,
    /// /healthz answers 503 from the start.
    #[arg(long)]
    unhealthy: bool,
    /// Reset every second connection instead of answering.
    #[arg(long)]
    reset_half: bool,
    /// Time to boot before listening, in milliseconds (a slow-starting service).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    boot_ms: u64,
    /// Listen backlog (accept queue length); default: the standard library's.
    #[arg(long, value_name = "N")]
    backlog: Option<i32>,
}

static TERM: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    TERM.store(true, Ordering::SeqCst);
}

fn main() {
    let args = Args::parse();
    // SAFETY: the handler only stores to an atomic. No SA_RESTART, so poll() returns EINTR.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_term as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
    }
    std::thread::sleep(std::time::Duration::from_millis(args.boot_ms));
    let listener = match TcpListener::bind(args.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hitless-testsvc: cannot listen on {}: {e}", args.listen);
            std::process::exit(1);
        }
    };
    if let Some(backlog) = args.backlog {
        // Linux: listen() again on a listening socket only changes its backlog.
        // SAFETY: listen on a socket we own.
        if unsafe { libc::listen(listener.as_raw_fd(), backlog) } != 0 {
            eprintln!("hitless-testsvc: listen backlog {backlog}: {}", std::io::Error::last_os_error());
            std::process::exit(1);
        }
    }
    if let Err(e) = listener.set_nonblocking(true) {
        eprintln!("hitless-testsvc: {e}");
        std::process::exit(1);
    }
    println!("hitless-testsvc {} listening on {}", args.version, args.listen);
    let shared = Arc::new(Shared {
        body: format!("{} {}\n", args.version, args.listen),
        unhealthy: AtomicBool::new(args.unhealthy),
    });
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    let mut accepted: u64 = 0;
    while !TERM.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd; a signal interrupts the wait (EINTR), the timeout bounds it.
        let ready = unsafe { libc::poll(&mut pfd, 1, 200) };
        if ready <= 0 {
            continue;
        }
        let Ok((stream, _)) = listener.accept() else { continue };
        accepted += 1;
        if args.reset_half && accepted.is_multiple_of(2) {
            reset(&stream);
            continue;
        }
        conns.retain(|h| !h.is_finished());
        let shared = Arc::clone(&shared);
        conns.push(spawn_without_sigterm(move || serve(stream, &shared)));
    }
    drop(listener);
    println!(
        "hitless-testsvc: SIGTERM; finishing {} open connections",
        conns.iter().filter(|h| !h.is_finished()).count()
    );
    let _ = std::io::stdout().flush();
    for h in conns {
        let _ = h.join();
    }
    println!("hitless-testsvc: exiting");
}

/// Spawns a thread with SIGTERM blocked, so the signal always interrupts the accept loop's
/// poll in the main thread rather than a connection's read.
fn spawn_without_sigterm(f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    // SAFETY: plain signal-set manipulation on local sets; the thread inherits the mask
    // in force while it is created, and the main thread's mask is restored right after.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        let handle = std::thread::spawn(f);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        handle
    }
}

struct Shared {
    body: String,
    unhealthy: AtomicBool,
}

/// Closes with a TCP RST instead of a FIN.
fn reset(stream: &TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on a socket we own with a correctly sized value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Answers requests on one connection until the client closes or asks to.
fn serve(stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(read_half);
    let mut out = stream;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut parts = line.split_whitespace();
        let (method, path, proto) =
            (parts.next().unwrap_or(""), parts.next().unwrap_or("/"), parts.next().unwrap_or(""));
        let mut close = proto == "HTTP/1.0";
        let mut body_len = 0usize;
        loop {
            let mut h = String::new();
            match reader.read_line(&mut h) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
                match k.as_str() {
                    "connection" if v == "close" => close = true,
                    "connection" if v == "keep-alive" => close = false,
                    "content-length" => body_len = v.parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
        if body_len > 0 && std::io::copy(&mut (&mut reader).take(body_len as u64), &mut std::io::sink()).is_err() {
            return;
        }
        let (code, body) = match (method, path) {
            (_, "/healthz") if shared.unhealthy.load(Ordering::SeqCst) => {
                ("503 Service Unavailable", "unhealthy\n".to_string())
            }
            (_, "/healthz") => ("200 OK", "ok".to_string()),
            (_, "/drain") => {
                shared.unhealthy.store(true, Ordering::SeqCst);
                ("200 OK", "draining\n".to_string())
            }
            _ => ("200 OK", shared.body.clone()),
        };
        close |= TERM.load(Ordering::SeqCst);
        let conn = if close { "close" } else { "keep-alive" };
        let resp = format!(
            "HTTP/1.1 {code}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {conn}\r\n\r\n{body}",
            body.len()
        );
        if out.write_all(resp.as_bytes()).is_err() || close {
            let _ = out.shutdown(std::net::Shutdown::Write);
            return;
        }
    }
}
