//! What every worker shares with the others: the connection caps, tarpit places, the state
//! front, the failed-handshake record, the downstream servers' health, the stop flag, the
//! configuration in force and the transparent listeners' addresses. Its own
//! file so the connection driver and the worker loop both use it without importing each other.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use super::limits::Limits;
use super::load::Load;
use super::reload::Reloads;
use super::tls_failures::TlsFailures;
use crate::downstream::health::Health;
use crate::state::Store;

/// What every worker shares with the others (each holds clones of the `Arc`s).
#[derive(Clone, Debug)]
pub(crate) struct Shared {
    /// The connection caps.
    pub(crate) limits: Arc<Limits>,
    /// Tarpit places and stress mode.
    pub(crate) load: Arc<Load>,
    /// The PASS cache, greylisting, reputation and (with Redis) connection rates: in process
    /// or shared.
    pub(crate) store: Arc<Store>,
    /// Clients whose STARTTLS handshake failed recently: not offered STARTTLS.
    pub(crate) tls_failures: Arc<TlsFailures>,
    /// Which downstream servers are down, and whose turn it is (DESIGN.md §8); every session
    /// gets it, and an exporter reads it through [`Health::snapshot`].
    pub(crate) health: Arc<Health>,
    /// Set when the server is asked to stop.
    pub(crate) stopping: Arc<AtomicBool>,
    /// The configuration in force, replaced on SIGHUP.
    pub(crate) reloads: Arc<Reloads>,
    /// The transparent listeners' addresses (real ports): a transparent connection to one of
    /// them, as to any address of this host, is refused (DESIGN.md §9). The other listeners
    /// need no list: bound without `IP_TRANSPARENT`, their addresses are the host's own.
    pub(crate) transparent_listeners: Arc<[SocketAddr]>,
    /// `[transparent] spoof_source` as the server started (a restart-only key: the
    /// capability it needs is kept across the privilege drop, or not, at start).
    pub(crate) spoof_source: bool,
}
