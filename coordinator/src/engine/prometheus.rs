//! Analysis gates evaluated by a Prometheus server instead of the agents' summaries:
//! an instant query of the HTTP API (`/api/v1/query`) over the gate's window, on the
//! metrics every agent exports (`hitless_backend_*_total`, labelled by service and
//! version). Plain `http://` only: Prometheus usually sits next to the coordinator.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A Prometheus server's base URL, checked when the coordinator starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromUrl {
    host: String,
    port: u16,
    prefix: String,
}

/// Why a query gave no number.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The server could not be reached or did not answer in time.
    #[error("cannot reach Prometheus at {url}: {why}")]
    Unreachable {
        /// The server.
        url: String,
        /// What happened.
        why: String,
    },
    /// It answered, but not with a result we can read.
    #[error("Prometheus at {url} answered {what}")]
    BadAnswer {
        /// The server.
        url: String,
        /// What it answered.
        what: String,
    },
}

impl std::fmt::Display for PromUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}:{}{}", self.host, self.port, self.prefix)
    }
}

impl std::str::FromStr for PromUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s.strip_prefix("http://").ok_or_else(|| {
            format!(
                "{s:?}: give the server's plain-HTTP base URL, such as http://127.0.0.1:9090 (https is not supported)"
            )
        })?;
        let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| format!("{s:?}: the port {p:?} is not a number"))?),
            None => (authority, 80),
        };
        if host.is_empty() {
            return Err(format!("{s:?}: the host is missing; give a URL such as http://127.0.0.1:9090"));
        }
        let prefix = path.trim_end_matches('/');
        let prefix = if prefix.is_empty() { String::new() } else { format!("/{prefix}") };
        Ok(Self { host: host.trim_matches(['[', ']']).to_owned(), port, prefix })
    }
}

/// How long one query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

impl PromUrl {
    /// Runs an instant query evaluated at `at` and returns the sum of the result vector
    /// (0 when empty: no series means nothing happened).
    pub async fn query(&self, promql: &str, at: std::time::SystemTime) -> Result<f64, QueryError> {
        let unreachable = |why: String| QueryError::Unreachable { url: self.to_string(), why };
        let at = at.duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let body = tokio::time::timeout(QUERY_TIMEOUT, self.get(promql, at))
            .await
            .map_err(|_| unreachable(format!("no answer within {QUERY_TIMEOUT:?}")))?
            .map_err(|e| unreachable(e.to_string()))?;
        let bad = |what: String| QueryError::BadAnswer { url: self.to_string(), what };
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|_| bad(format!("{body:.200}")))?;
        if v["status"] != "success" {
            return Err(bad(format!("{}: {}", v["errorType"], v["error"])));
        }
        let Some(series) = v["data"]["result"].as_array() else {
            return Err(bad(format!("a {} result, not a vector", v["data"]["resultType"])));
        };
        series.iter().try_fold(0.0, |sum, s| {
            let value = s["value"][1].as_str().and_then(|x| x.parse::<f64>().ok());
            value.map(|x| sum + if x.is_finite() { x } else { 0.0 }).ok_or_else(|| bad(format!("a sample {s}")))
        })
    }

    /// `GET /api/v1/query` over HTTP/1.0 (the server then neither keeps the connection
    /// nor chunks the body); returns the body of a 200 answer.
    async fn get(&self, promql: &str, at: f64) -> std::io::Result<String> {
        let mut stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await?;
        let request = format!(
            "GET {}/api/v1/query?query={}&time={at:.3} HTTP/1.0\r\nHost: {}:{}\r\nAccept: application/json\r\n\r\n",
            self.prefix,
            encode(promql),
            self.host,
            self.port
        );
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        let text = String::from_utf8_lossy(&answer);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.lines().next().unwrap_or_default();
        // 400 and 422 carry the query error in a JSON body: return it for the caller to read.
        if status.contains(" 200 ") || status.contains(" 400 ") || status.contains(" 422 ") {
            Ok(body.to_owned())
        } else {
            Err(std::io::Error::other(format!("HTTP answer {status:?}")))
        }
    }
}

/// Percent-encodes a query parameter (everything but RFC 3986's unreserved characters).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The PromQL of a version's connect outcomes over `window`: `(errors, attempts)`,
/// where errors are failed connects plus resets and attempts are connects that
/// established plus failed ones, summed over every node's agent.
pub fn failure_queries(service: &str, version: &str, window: Duration) -> (String, String) {
    let sel = format!("{{service=\"{}\",version=\"{}\"}}", escape(service), escape(version));
    let w = format!("[{}s]", window.as_secs().max(1));
    let inc = |m: &str| format!("sum(increase(hitless_backend_{m}_total{sel}{w}))");
    let errors = format!("{} + {}", or_zero(&inc("connect_failures")), or_zero(&inc("resets")));
    let attempts = format!("{} + {}", or_zero(&inc("connects")), or_zero(&inc("connect_failures")));
    (errors, attempts)
}

/// A sum over no series is empty, and empty + x is empty: count it as 0.
fn or_zero(q: &str) -> String {
    format!("({q} or vector(0))")
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_errors_say_what_to_give() {
        let u: PromUrl = "http://127.0.0.1:9090".parse().expect("valid");
        assert_eq!(u.to_string(), "http://127.0.0.1:9090");
        let u: PromUrl = "http://prom.example:8080/prometheus/".parse().expect("valid");
        assert_eq!(u.to_string(), "http://prom.example:8080/prometheus");
        assert_eq!("http://prom".parse::<PromUrl>().map(|u| u.port), Ok(80));
        let e = "https://prom:9090".parse::<PromUrl>().expect_err("https");
        assert!(e.contains("https is not supported"), "{e}");
        let e = "http://prom:x".parse::<PromUrl>().expect_err("port");
        assert!(e.contains("port"), "{e}");
        let e = "127.0.0.1:9090".parse::<PromUrl>().expect_err("scheme");
        assert!(e.contains("http://127.0.0.1:9090"), "{e}");
    }

    #[test]
    fn queries_select_the_version_over_the_window_and_encode() {
        let (errors, attempts) = failure_queries("web", "v2", Duration::from_secs(30));
        assert!(errors.contains(r#"hitless_backend_connect_failures_total{service="web",version="v2"}[30s]"#));
        assert!(errors.contains("hitless_backend_resets_total"));
        assert!(attempts.contains("hitless_backend_connects_total"));
        assert_eq!(encode("a b{\"}"), "a%20b%7B%22%7D");
    }
}
