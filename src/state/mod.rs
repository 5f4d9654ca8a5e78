//! State shared by the workers that outlives a connection (DESIGN.md §5): the PASS cache, the
//! greylist, the reputation table and the connection-rate buckets, in process or in Redis.
//! Workers ask through the [`Store`] front (`store`) in the words of `op`; it answers from the
//! in-process tables (`local` over `pass`, `greylist`, `reputation`) or hands the question to the
//! Redis thread (`redis`), which falls back on `local`. With
//! the local backend the tables have crash-safe snapshots in `[server] state_dir`
//! (`snapshot`), which the server writes now and then and on shutdown and reads at start.

pub(crate) mod greylist;
pub(crate) mod local;
pub(crate) mod op;
pub(crate) mod pass;
pub mod redis;
pub(crate) mod reputation;
pub mod snapshot;
pub(crate) mod snapshots;
pub(crate) mod store;

pub use greylist::{Greylist, GreylistOutcome, GreylistTimes};
pub use local::Local;
pub use op::{StateAnswer, StateOp, StoreStats, Waiter};
pub use pass::PassCache;
pub use reputation::ReputationTable;
pub use snapshot::{Clocks, StateDir};
pub use store::Store;
