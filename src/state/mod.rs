//! State shared by the workers that outlives a connection (DESIGN.md §5). For now in-process
//! only: the PASS cache. Greylisting, reputation, snapshots and Redis come with the state issue.

pub mod pass;

pub use pass::PassCache;
