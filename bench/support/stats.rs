//! Figures from repeated rounds. The benches that compare two or more legs interleave their
//! rounds (one of each, then again) and report each leg's median, so drift in machine load hits
//! every leg alike and one disturbed round does not move the figure.

use std::time::Duration;

/// The median of `values` (the upper one of an even count); panics on none, as a bench that
/// ran no round has no figure.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values
        .get(values.len() / 2)
        .copied()
        .expect("at least one round")
}

/// `n` done in `elapsed`, per second.
pub fn per_second(n: usize, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}
