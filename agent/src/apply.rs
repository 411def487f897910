//! One registry revision into the node's maps: the node's isolated outliers get no
//! slots, the writer applies the rest in its safe order, the metrics' labels follow,
//! and the outcome is logged (a failure counts as a reconcile error). Static mode and
//! coordinator sessions both apply through here.

use std::time::Instant;

use tracing::info;

use crate::desired::DesiredService;
use crate::metrics;
use crate::outlier::Outliers;
use crate::registry::Registry;
use crate::writer::{WriteError, Writer};

/// Applies `wanted` (the slot tables of `reg`) as `revision`.
pub fn revision(
    writer: &mut Writer,
    wanted: &[DesiredService],
    reg: &Registry,
    revision: u64,
    metrics: &metrics::State,
    node: &str,
    outliers: &Outliers,
) -> Result<(), WriteError> {
    let started = Instant::now();
    let report = writer.apply(&outliers.overlay(wanted), revision).inspect_err(|_| metrics.error())?;
    // The maps hold the revision; nothing has acknowledged it yet.
    crate::failpoint!("agent.apply.after_write");
    metrics.update(node, reg, writer);
    info!(
        %node,
        revision,
        services = report.services,
        vips = report.vips,
        backends = report.backends,
        tables_swapped = report.tables_swapped,
        writes = report.writes,
        micros = started.elapsed().as_micros() as u64,
        "registry applied"
    );
    Ok(())
}
