//! The client side of the relay: the downstream handshake (sans-IO, driven by the session), the
//! nonblocking connect the server performs for it, and the rustls client configuration for
//! STARTTLS; `src/server/` owns the sockets.

pub mod connect;
pub mod dialog;
pub mod relay;
pub mod tls;
pub mod warnings;
