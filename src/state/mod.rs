//! State shared by the workers that outlives a connection (DESIGN.md §5): the PASS cache, the
//! greylist and the reputation table, in process, each bounded, and their crash-safe
//! snapshots in `[server] state_dir` (`snapshot`), which the server writes now and then and
//! on shutdown and reads at start. Redis comes with the rest of the state issue.

pub mod greylist;
pub mod pass;
pub mod reputation;
pub mod snapshot;

pub use greylist::{Greylist, GreylistOutcome};
pub use pass::PassCache;
pub use reputation::ReputationTable;
pub use snapshot::{Clocks, StateDir};
