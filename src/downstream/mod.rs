//! The client side of the relay: the downstream handshake (sans-IO, driven by the session) and
//! the nonblocking connect the server performs for it; `src/server/` owns the sockets.

pub mod connect;
pub mod dialog;
