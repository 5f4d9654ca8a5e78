//! State shared by the workers that outlives a connection (DESIGN.md §5): the PASS cache, the
//! greylist and the connection-rate buckets, in process or in Redis. Workers ask through the
//! [`Store`] front (`store`), which answers from the in-process tables (`pass`, `greylist`)
//! or hands the question to the Redis thread (`redis`). Reputation and snapshots come with the
//! rest of the state issue.

pub mod greylist;
pub mod pass;
pub mod redis;
pub mod store;

pub use greylist::{Greylist, GreylistOutcome};
pub use pass::PassCache;
pub use store::{GreylistTimes, Local, StateAnswer, StateOp, Store, StoreStats, Waiter};
