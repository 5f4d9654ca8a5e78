//! The client side of the relay: the relay itself (`relay`: one session's downstream
//! connection, sans-IO, driven by the session), the handshake inside it (`dialog`), the
//! nonblocking connect the server performs for it, the rustls client configuration for
//! STARTTLS, the multiplexing mode's pool of idle connections (`pool`), and which servers are
//! up and which one a new connection goes to (`health`); `src/server/` owns the sockets.

pub(crate) mod connect;
pub mod dialog;
pub mod health;
pub(crate) mod pool;
pub(crate) mod relay;
pub mod tls;
pub(crate) mod warnings;
