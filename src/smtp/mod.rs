//! The sans-IO SMTP core: command parser, reply type, data/dot codec and the session state
//! machine. Nothing in here touches a socket or reads a clock: bytes and `Instant`s come in,
//! replies, relayed bytes, actions and deadlines come out (DESIGN.md §5).

pub mod command;
pub mod data;
pub(crate) mod log_text;
pub mod proxy;
pub mod question;
pub(crate) mod received;
pub mod reply;
pub mod session;
mod tarpit;

pub use command::{Command, CommandError};
pub use data::{DataDecoder, DataViolation};
pub use question::{Answer, Question};
pub use reply::{EnhancedCode, Reply};
pub use session::{
    Action, DownstreamEvent, LinkId, Peer, Report, Session, Shutdown, Side, TlsVersion, Via,
    loop_refusal, too_many_connections,
};
