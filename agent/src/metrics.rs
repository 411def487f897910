//! `/metrics`: what the kernel counted, in Prometheus text format.
//!
//! Every scrape reads the pinned maps afresh (per-CPU counters summed, active
//! connections per local backend, map fill) and renders them with the labels the last
//! apply left in [`Labels`]: the kernel's counters are the source of truth, so a
//! restarted agent reports the same totals. Served by a small thread on
//! `--metrics-addr`; nothing here writes a map.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry as PromRegistry, TextEncoder};
use tracing::{info, warn};

use crate::abi::{self, Endpoint};
use crate::registry::{Protocol, Registry};
use crate::writer::{Maps, Writer};

/// What the metrics are labelled with, refreshed after every apply.
#[derive(Debug, Default)]
pub struct Labels {
    /// Node name.
    pub node: String,
    /// Service id -> service name.
    pub services: Vec<(u32, String)>,
    /// Backend -> (service, version).
    pub backends: Vec<(Endpoint, String, String)>,
}

/// Shared between the applier (writes labels, counts errors) and the scrape thread.
#[derive(Debug, Default)]
pub struct State {
    /// Labels of the state in force.
    pub labels: Mutex<Labels>,
    /// Applies that failed (bad files, map writes, sessions that broke).
    pub reconcile_errors: AtomicU64,
    /// Backends isolated on this node now, and isolations so far per backend.
    pub outliers: Mutex<(std::collections::BTreeSet<Endpoint>, std::collections::BTreeMap<Endpoint, u64>)>,
}

impl State {
    /// Refreshes the labels after `reg` was applied through `writer`.
    pub fn update(&self, node: &str, reg: &Registry, writer: &Writer) {
        let mut l = Labels { node: node.to_owned(), ..Labels::default() };
        for s in &reg.services {
            if let Some(id) = writer.service_id(&s.name) {
                l.services.push((id, s.name.clone()));
            }
            let proto = match s.protocol {
                Protocol::Tcp => abi::PROTO_TCP,
                Protocol::Udp => abi::PROTO_UDP,
            };
            for b in &s.backends {
                l.backends.push((
                    Endpoint::new(b.address, proto),
                    s.name.clone(),
                    b.version.clone().unwrap_or_default(),
                ));
            }
        }
        if let Ok(mut labels) = self.labels.lock() {
            *labels = l;
        }
    }

    /// Publishes the outlier detector's state.
    pub fn set_outliers(&self, o: &crate::outlier::Outliers) {
        if let Ok(mut g) = self.outliers.lock() {
            *g = (o.isolated(), o.isolations());
        }
    }

    /// Counts a failed apply.
    pub fn error(&self) {
        self.reconcile_errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// The text of one scrape.
pub fn render(maps: &Maps, state: &State) -> Result<String, prometheus::Error> {
    let labels = state.labels.lock().map_err(|_| prometheus::Error::Msg("labels lock poisoned".into()))?;
    let node = labels.node.as_str();
    let reg = PromRegistry::new();
    let counter = |name: &str, help: &str| -> Result<IntCounterVec, prometheus::Error> {
        let c = IntCounterVec::new(Opts::new(name, help), &["node", "service"])?;
        reg.register(Box::new(c.clone()))?;
        Ok(c)
    };
    let steered =
        counter("hitless_connects_steered_total", "Connects and datagrams to a VIP sent to a serving backend.")?;
    let redirected = counter(
        "hitless_connects_redirected_total",
        "Connects dialled straight to a draining or down instance, steered to a serving sibling.",
    )?;
    let refused =
        counter("hitless_connects_refused_total", "Connects refused at once: no serving backend, or policy reject.")?;
    let passed = counter(
        "hitless_connects_passed_to_draining_total",
        "Connects dialled straight to a draining instance and let through (no serving sibling).",
    )?;
    for (id, name) in &labels.services {
        let c = maps.counters(*id);
        steered.with_label_values(&[node, name]).inc_by(c.steered);
        redirected.with_label_values(&[node, name]).inc_by(c.redirected);
        refused.with_label_values(&[node, name]).inc_by(c.refused);
        passed.with_label_values(&[node, name]).inc_by(c.passed_draining);
    }
    let active = IntGaugeVec::new(
        Opts::new("hitless_active_connections", "Open server-side connections of an instance on this node."),
        &["node", "service", "instance", "version"],
    )?;
    reg.register(Box::new(active.clone()))?;
    for (ep, service, version) in &labels.backends {
        if ep.proto == abi::PROTO_TCP && maps.has_active_entry(ep) {
            let addr = ep.socket_addr().to_string();
            active.with_label_values(&[node, service, &addr, version]).set(maps.active_connections(ep));
        }
    }
    let in_flight = IntGaugeVec::new(
        Opts::new(
            "hitless_backend_handshakes_in_flight",
            "Connects from this node to the instance still in their handshake (SYN sent, neither established nor failed); a drain waits for 0 on every node.",
        ),
        &["node", "service", "instance", "version"],
    )?;
    reg.register(Box::new(in_flight.clone()))?;
    for (ep, service, version) in labels.backends.iter().filter(|(ep, _, _)| ep.proto == abi::PROTO_TCP) {
        let n = maps.handshakes_in_flight(ep);
        if n > 0 {
            let addr = ep.socket_addr().to_string();
            in_flight.with_label_values(&[node, service, &addr, version]).set(n as i64);
        }
    }
    let per_backend = |name: &str, help: &str| -> Result<IntCounterVec, prometheus::Error> {
        let c = IntCounterVec::new(Opts::new(name, help), &["node", "service", "instance", "version"])?;
        reg.register(Box::new(c.clone()))?;
        Ok(c)
    };
    let b_connects =
        per_backend("hitless_backend_connects_total", "Connects from this node that established to the instance.")?;
    let b_failed = per_backend(
        "hitless_backend_connect_failures_total",
        "Connects from this node to the instance that never established (refused, reset, timed out).",
    )?;
    let b_resets = per_backend(
        "hitless_backend_resets_total",
        "Connections to the instance that ended without a FIN either way (reset or aborted).",
    )?;
    let b_closed = per_backend("hitless_backend_closed_connections_total", "Connections to the instance that closed.")?;
    let b_retrans =
        per_backend("hitless_backend_retransmits_total", "Retransmits on closed connections to the instance.")?;
    let b_in =
        per_backend("hitless_backend_received_bytes_total", "Bytes received on closed connections to the instance.")?;
    let b_out = per_backend("hitless_backend_sent_bytes_total", "Bytes acked on closed connections to the instance.")?;
    let b_rtt = GaugeVec::new(
        Opts::new(
            "hitless_backend_smoothed_rtt_seconds",
            "Mean smoothed RTT of closed connections to the instance, in seconds.",
        ),
        &["node", "service", "instance", "version"],
    )?;
    reg.register(Box::new(b_rtt.clone()))?;
    let mut histograms = String::new();
    for (ep, service, version) in labels.backends.iter().filter(|(ep, _, _)| ep.proto == abi::PROTO_TCP) {
        let Some(st) = maps.backend_stats(ep) else { continue };
        let addr = ep.socket_addr().to_string();
        let l = [node, service.as_str(), addr.as_str(), version.as_str()];
        b_connects.with_label_values(&l).inc_by(st.connects);
        b_failed.with_label_values(&l).inc_by(st.failed);
        b_closed.with_label_values(&l).inc_by(st.closed);
        b_resets.with_label_values(&l).inc_by(st.resets);
        b_retrans.with_label_values(&l).inc_by(st.retrans);
        b_in.with_label_values(&l).inc_by(st.bytes_in);
        b_out.with_label_values(&l).inc_by(st.bytes_out);
        if st.closed > 0 {
            b_rtt.with_label_values(&l).set(st.srtt_us_sum as f64 / st.closed as f64 / 1e6);
        }
        histogram(&mut histograms, &l, &st);
    }
    let isolated = IntGaugeVec::new(
        Opts::new("hitless_outlier_isolated", "1 while the instance is isolated on this node after failed connects."),
        &["node", "service", "instance"],
    )?;
    let isolations =
        per_node_backend(&reg, "hitless_outlier_isolations_total", "Times the instance was isolated on this node.")?;
    reg.register(Box::new(isolated.clone()))?;
    if let Ok(o) = state.outliers.lock() {
        for (ep, service, _) in &labels.backends {
            let addr = ep.socket_addr().to_string();
            if let Some(n) = o.1.get(ep) {
                isolations.with_label_values(&[node, service, &addr]).inc_by(*n);
                isolated.with_label_values(&[node, service, &addr]).set(i64::from(o.0.contains(ep)));
            }
        }
    }
    let revision = IntGaugeVec::new(
        Opts::new("hitless_agent_applied_revision", "Registry revision the node's maps hold."),
        &["node"],
    )?;
    reg.register(Box::new(revision.clone()))?;
    revision.with_label_values(&[node]).set(maps.revision().map_or(0, |r| r as i64));
    let invariant = IntGaugeVec::new(
        Opts::new(
            "hitless_agent_slots_to_unserving_backends",
            "Slots of the tables in force that point at a missing, draining or down backend, read back from the kernel: always 0 unless the update order broke (a scrape racing an apply may see one for a moment).",
        ),
        &["node"],
    )?;
    reg.register(Box::new(invariant.clone()))?;
    invariant.with_label_values(&[node]).set(maps.slots_to_unserving() as i64);
    let entries =
        IntGaugeVec::new(Opts::new("hitless_agent_map_entries", "Entries in a datapath map."), &["node", "map"])?;
    let capacity =
        IntGaugeVec::new(Opts::new("hitless_agent_map_capacity", "Capacity of a datapath map."), &["node", "map"])?;
    reg.register(Box::new(entries.clone()))?;
    reg.register(Box::new(capacity.clone()))?;
    for (map, n, cap) in maps.fill() {
        entries.with_label_values(&[node, map]).set(n as i64);
        capacity.with_label_values(&[node, map]).set(cap as i64);
    }
    let errors = IntCounterVec::new(
        Opts::new("hitless_agent_reconcile_errors_total", "Applies that failed (the state in force was kept)."),
        &["node"],
    )?;
    reg.register(Box::new(errors.clone()))?;
    errors.with_label_values(&[node]).inc_by(state.reconcile_errors.load(Ordering::Relaxed));
    drop(labels);

    let mut out = Vec::new();
    TextEncoder::new().encode(&reg.gather(), &mut out)?;
    let mut text = String::from_utf8_lossy(&out).into_owned();
    if !histograms.is_empty() {
        text.push_str("# HELP hitless_backend_connect_latency_seconds Time from SYN to established, connects from this node to the instance.\n");
        text.push_str("# TYPE hitless_backend_connect_latency_seconds histogram\n");
        text.push_str(&histograms);
    }
    Ok(text)
}

fn per_node_backend(reg: &PromRegistry, name: &str, help: &str) -> Result<IntCounterVec, prometheus::Error> {
    let c = IntCounterVec::new(Opts::new(name, help), &["node", "service", "instance"])?;
    reg.register(Box::new(c.clone()))?;
    Ok(c)
}

/// A Prometheus label value, escaped.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The kernel's log2 histogram as Prometheus buckets (cumulative, in seconds).
fn histogram(out: &mut String, l: &[&str; 4], st: &abi::BackendStats) {
    use std::fmt::Write as _;
    let labels = format!(
        "node=\"{}\",service=\"{}\",instance=\"{}\",version=\"{}\"",
        esc(l[0]),
        esc(l[1]),
        esc(l[2]),
        esc(l[3])
    );
    let name = "hitless_backend_connect_latency_seconds";
    let mut cumulative = 0u64;
    for (b, n) in st.latency.iter().enumerate() {
        cumulative += n;
        if b + 1 < abi::LAT_BUCKETS {
            let le = (1u64 << (b + 1)) as f64 / 1e6;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", st.latency_us_sum as f64 / 1e6);
    let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
}

/// The most of a request the metrics server reads.
const MAX_REQUEST_LINE: u64 = 8 * 1024;

/// Serves `/metrics` on `addr` from a thread; returns the bound address.
pub fn serve(addr: SocketAddr, pin_dir: PathBuf, state: Arc<State>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    info!(%bound, "metrics listening");
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        for conn in listener.incoming().flatten() {
            if let Err(e) = answer(conn, &pin_dir, &state) {
                warn!(error = %e, "metrics request failed");
            }
        }
    })?;
    Ok(bound)
}

fn answer(mut conn: TcpStream, pin_dir: &std::path::Path, state: &State) -> std::io::Result<()> {
    conn.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
    // Only the request line matters, and it is short: a longer one is not read whole.
    let mut line = String::new();
    BufReader::new(Read::take(&conn, MAX_REQUEST_LINE)).read_line(&mut line)?;
    let (status, body) = if line.starts_with("GET /metrics ") || line.starts_with("GET /metrics?") {
        match Maps::open(pin_dir).map_err(|e| e.to_string()).and_then(|m| render(&m, state).map_err(|e| e.to_string()))
        {
            Ok(text) => ("200 OK", text),
            Err(e) => ("503 Service Unavailable", format!("datapath maps unreadable: {e}\n")),
        }
    } else if line.starts_with("GET /ready ") || line.starts_with("GET /ready?") {
        // Ready once the maps hold a registry revision: the datapath steers.
        match Maps::open(pin_dir).and_then(|m| m.revision()) {
            Ok(r) if r > 0 => ("200 OK", format!("ready: the datapath holds registry revision {r}\n")),
            Ok(_) => ("503 Service Unavailable", "not ready: no registry applied yet\n".to_owned()),
            Err(e) => ("503 Service Unavailable", format!("not ready: datapath maps unreadable: {e}\n")),
        }
    } else {
        ("404 Not Found", "try /metrics or /ready\n".to_owned())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body.as_bytes())
}
