//! The client side of the relay: the downstream handshake (sans-IO, driven by the session) and,
//! in `src/server/`, the sockets that carry it.

pub mod dialog;
