//! Prometheus metrics (DESIGN.md §4, §8): counters each worker keeps for itself, the figures
//! other parts already keep (connection caps, tarpit places, the resolver), and the thread that
//! serves them at `GET /metrics` when `[metrics] listen` is set.
//!
//! - **Counting** (`counters.rs`): each worker has a [`WorkerCounters`] that only it writes,
//!   with relaxed atomic adds and no lock; a label from an operator's set (a zone, a downstream
//!   server, a scanner) takes one of a fixed number of slots the first time it is seen. Nothing
//!   is counted when `[metrics] listen` is off: the worker holds no counters then.
//! - **Scraping** (`exposition.rs`): the metrics thread sums every worker's counters, asks the
//!   server for its gauges ([`Gauges`]) and encodes everything with `prometheus-client` in the
//!   OpenMetrics text format, which Prometheus reads natively.
//! - **Serving** (`http.rs`): a minimal HTTP/1.1 listener on a thread of its own, one
//!   connection at a time, bounded request size and read time.
//!
//! Labels come only from bounded sets: the code's own names (verdicts, results, reasons) and
//! the operator's configuration (zones, downstream servers, scanner names). Nothing a client
//! sends (its address, HELO, sender, recipients) ever becomes a label. `docs/metrics.md` lists
//! every metric.

mod counters;
mod exposition;
mod http;

pub(crate) use self::counters::{DownstreamError, Refused, WorkerCounters};
pub(crate) use self::exposition::{Gauges, Metrics};
pub(crate) use self::http::MetricsServer;
