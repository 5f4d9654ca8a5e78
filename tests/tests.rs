//! Integration tests: the real server on loopback with a real downstream SMTP listener.
