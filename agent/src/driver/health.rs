//! Health checks and pre-stop hooks: an HTTP GET, a TCP connect, or an argv run inside the
//! instance's cgroup. Each call is bounded by the timeout it is given and returns why it
//! failed, in words that can go into an error message.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout, Instant};

use super::process;

/// Where and how to run an exec check or hook: the instance's environment, cgroup and log.
pub(crate) struct ExecContext<'a> {
    pub env: &'a [(String, String)],
    pub cgroup: &'a Path,
    pub log: &'a Path,
}

/// `GET path` on `addr`; Ok with the status code when the server answered at all.
pub(crate) async fn http_get(addr: SocketAddr, path: &str, limit: Duration) -> Result<u16, String> {
    let get = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect to {addr}: {e}"))?;
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: hitless-agent\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.map_err(|e| format!("GET {path} on {addr}: {e}"))?;
        let mut head = Vec::with_capacity(256);
        let mut buf = [0u8; 256];
        while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
            let n = s.read(&mut buf).await.map_err(|e| format!("GET {path} on {addr}: {e}"))?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        status_code(&head).ok_or_else(|| {
            format!(
                "GET {path} on {addr}: not an HTTP answer: {:?}",
                String::from_utf8_lossy(&head[..head.len().min(80)])
            )
        })
    };
    timeout(limit, get).await.unwrap_or_else(|_| Err(format!("GET {path} on {addr}: no answer within {limit:?}")))
}

/// The status code of an HTTP/1.x status line.
pub(crate) fn status_code(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/1."))?;
    parts.next()?.parse().ok()
}

/// A TCP connect to `addr`.
pub(crate) async fn tcp(addr: SocketAddr, limit: Duration) -> Result<(), String> {
    match timeout(limit, TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("connect to {addr}: {e}")),
        Err(_) => Err(format!("connect to {addr}: no answer within {limit:?}")),
    }
}

/// Runs `argv` in the instance's cgroup with its environment, output appended to its log;
/// killed when it outlives `limit`. Ok when it exits 0.
pub(crate) async fn exec(argv: &[String], ctx: &ExecContext<'_>, limit: Duration) -> Result<(), String> {
    let name = argv.first().map(String::as_str).unwrap_or("");
    let mut child =
        process::spawn(argv, ctx.env, ctx.cgroup, ctx.log, false).map_err(|e| format!("run {name:?}: {e}"))?;
    let until = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("{name:?} {}", process::describe(status))),
            Ok(None) if Instant::now() >= until => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{name:?} still running after {limit:?}; killed"));
            }
            Ok(None) => sleep(Duration::from_millis(10)).await,
            Err(e) => return Err(format!("waiting for {name:?}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(status_code(b"HTTP/1.0 503 Service Unavailable\r\nx"), Some(503));
        assert_eq!(status_code(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_code(b""), None);
    }
}
