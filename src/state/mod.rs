//! State shared by the workers that outlives a connection (DESIGN.md §5). For now in process
//! only: the PASS cache and the greylist. Reputation, snapshots and Redis come with the rest of
//! the state issue.

pub mod greylist;
pub mod pass;

pub use greylist::{Greylist, GreylistOutcome};
pub use pass::PassCache;
