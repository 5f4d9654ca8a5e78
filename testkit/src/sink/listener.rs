//! The accept thread: one thread per accepted connection, each running the session script to
//! its end. `Sink::stop` wakes it by shutting the listening socket down.

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::Duration;

use super::SinkSession;
use super::record::Shared;
use super::session::Connection;

/// Pause after a failed accept (e.g. out of file descriptors) so the thread does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(20);

pub(super) fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                log::warn!("sink: accept failed: {err}");
                thread::sleep(ACCEPT_ERROR_PAUSE);
                continue;
            }
        };
        let mut index = 0;
        shared.update(|state| {
            index = state.sessions.len();
            state.sessions.push(SinkSession::default());
        });
        let conn_shared = Arc::clone(shared);
        let spawned = thread::Builder::new()
            .name(format!("sink-conn-{index}"))
            .spawn(move || serve(stream, &conn_shared, index));
        if let Err(err) = spawned {
            log::warn!("sink: cannot spawn a connection thread: {err}");
            shared.update_session(index, |session| session.closed = true);
        }
    }
}

/// Runs one connection to its end and marks its session closed, whatever happened.
fn serve(stream: TcpStream, shared: &Shared, index: usize) {
    let result = Connection::new(stream, shared, index).and_then(|mut conn| conn.run());
    if let Err(err) = result {
        log::debug!("sink: connection {index}: {err}");
    }
    shared.update_session(index, |session| session.closed = true);
}
