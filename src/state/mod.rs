//! State shared by the workers that outlives a connection (DESIGN.md §5): the PASS cache, the
//! greylist and the reputation table, in process. Snapshots and Redis come with the rest of the
//! state issue.

pub mod greylist;
pub mod pass;
pub mod reputation;

pub use greylist::{Greylist, GreylistOutcome};
pub use pass::PassCache;
pub use reputation::ReputationTable;
