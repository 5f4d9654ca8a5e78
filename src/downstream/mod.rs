//! The client side of the relay: tarmac connecting to the downstream MTA.
//!
//! The SMTP dialogue with the downstream (banner, EHLO, XCLIENT, relaying) lives in the sans-IO
//! session; this module holds the socket-level pieces the server drives for it.

pub mod connect;
