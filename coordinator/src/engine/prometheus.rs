//! Analysis gates evaluated by a Prometheus server instead of the agents' summaries:
//! an instant query of the HTTP API (`/api/v1/query`) over the gate's window, on the
//! metrics every agent exports (`hitless_backend_*_total`, labelled by service and
//! version). Plain `http://` only: Prometheus usually sits next to the coordinator. The
//! requests go through hyper's client (already in the tree through tonic).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

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
        if self.host.contains(':') {
            write!(f, "http://[{}]:{}{}", self.host, self.port, self.prefix)
        } else {
            write!(f, "http://{}:{}{}", self.host, self.port, self.prefix)
        }
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
            Some((h, p)) if !h.ends_with(':') && !p.ends_with(']') => {
                (h, p.parse::<u16>().map_err(|_| format!("{s:?}: the port {p:?} is not a number"))?)
            }
            _ => (authority, 80),
        };
        let host = host.trim_matches(['[', ']']);
        if host.is_empty() {
            return Err(format!("{s:?}: the host is missing; give a URL such as http://127.0.0.1:9090"));
        }
        let prefix = path.trim_end_matches('/');
        let prefix = if prefix.is_empty() { String::new() } else { format!("/{prefix}") };
        let url = Self { host: host.to_owned(), port, prefix };
        // The same URL must make a valid request URI (no spaces, no stray characters).
        url.uri("up", 0.0)
            .map_err(|e| format!("{s:?}: not a usable URL ({e}); give one such as http://127.0.0.1:9090"))?;
        Ok(url)
    }
}

/// How long one query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer read: a gate's queries are sums, a few hundred bytes.
const MAX_ANSWER: usize = 1 << 20;

impl PromUrl {
    /// Runs an instant query evaluated at `at` and returns the sum of the result vector,
    /// or `None` when it is empty (no series: Prometheus knows nothing of it).
    pub async fn query(&self, promql: &str, at: std::time::SystemTime) -> Result<Option<f64>, QueryError> {
        let unreachable = |why: String| QueryError::Unreachable { url: self.to_string(), why };
        let at = at.duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let body = tokio::time::timeout(QUERY_TIMEOUT, self.get(promql, at))
            .await
            .map_err(|_| unreachable(format!("no answer within {QUERY_TIMEOUT:?}")))?
            .map_err(unreachable)?;
        let bad = |what: String| QueryError::BadAnswer { url: self.to_string(), what };
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|_| bad(format!("{body:.200}")))?;
        if v["status"] != "success" {
            return Err(bad(format!("{}: {}", v["errorType"], v["error"])));
        }
        let Some(series) = v["data"]["result"].as_array() else {
            return Err(bad(format!("a {} result, not a vector", v["data"]["resultType"])));
        };
        if series.is_empty() {
            return Ok(None);
        }
        series
            .iter()
            .try_fold(0.0, |sum, s| {
                let value = s["value"][1].as_str().and_then(|x| x.parse::<f64>().ok());
                value.map(|x| sum + if x.is_finite() { x } else { 0.0 }).ok_or_else(|| bad(format!("a sample {s}")))
            })
            .map(Some)
    }

    /// The request URI of an instant query.
    fn uri(&self, promql: &str, at: f64) -> Result<http::Uri, http::uri::InvalidUri> {
        format!("{self}/api/v1/query?query={}&time={at:.3}", encode(promql)).parse()
    }

    /// `GET /api/v1/query`; returns the body of a 200 answer, and of a 400 or 422, which
    /// carry the query's error in JSON for the caller to read.
    async fn get(&self, promql: &str, at: f64) -> Result<String, String> {
        let uri = self.uri(promql, at).map_err(|e| e.to_string())?;
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let request = http::Request::get(uri)
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let answer = client.request(request).await.map_err(|e| e.to_string())?;
        let status = answer.status();
        let body = Limited::new(answer.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        match status.as_u16() {
            200 | 400 | 422 => Ok(String::from_utf8_lossy(&body).into_owned()),
            _ => Err(format!("HTTP answer {status}")),
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
/// established plus failed ones, summed over every node's agent. The attempts query is
/// empty when Prometheus has no series of the version (every agent exports both
/// counters of a backend together): that is "nothing to judge", never 0 attempts.
pub fn failure_queries(service: &str, version: &str, window: Duration) -> (String, String) {
    let sel = format!("{{service=\"{}\",version=\"{}\"}}", escape(service), escape(version));
    let w = format!("[{}s]", window.as_secs().max(1));
    let inc = |m: &str| format!("sum(increase(hitless_backend_{m}_total{sel}{w}))");
    let errors = format!("{} + {}", or_zero(&inc("connect_failures")), or_zero(&inc("resets")));
    let attempts = format!("{} + {}", inc("connects"), inc("connect_failures"));
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
        let u: PromUrl = "http://[::1]:9090".parse().expect("IPv6");
        assert_eq!(u.to_string(), "http://[::1]:9090");
        let e = "http://prom:9090/a b".parse::<PromUrl>().expect_err("space");
        assert!(e.contains("not a usable URL"), "{e}");
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
