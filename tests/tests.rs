//! Integration tests: the real server on loopback with a real downstream SMTP listener.

// The runtime end to end: relaying, limits, shutdown, hostile input.
mod server;
