//! The `snapshot` target: state snapshot files.

use std::time::{Duration, Instant, UNIX_EPOCH};

use tarmac::state::snapshot::{self as state_snapshot, Clocks, Kind, Writer};
use tarmac::state::{Greylist, GreylistTimes, PassCache, ReputationTable};

use super::base_config;

/// Loads a state snapshot file into a fresh table.
///
/// Input: byte 0 bits 0–1 pick the table (0 PASS cache, 1 greylist, 2 and 3 reputation); with
/// bit 7 clear the rest is the whole file, so the framing checks (header, end line, count,
/// hash) are what is exercised; with it set, each line of the rest becomes an entry of a file
/// framed correctly, so the entry parsers are reached.
///
/// Properties: no panic; a refused file leaves the table empty (all or nothing); a loaded one
/// holds at most the entries it reported kept; saving what loaded and loading that again
/// gives a table of the same size.
pub fn snapshot(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let kind = match selector & 0x03 {
        0 => Kind::Pass,
        1 => Kind::Greylist,
        _ => Kind::Reputation,
    };
    let bytes = if selector & 0x80 == 0 {
        rest.to_vec()
    } else {
        let mut writer = Writer::new(kind);
        for line in rest.split(|&b| b == b'\n') {
            writer.entry(format_args!("{}", String::from_utf8_lossy(line)));
        }
        writer.finish()
    };
    let _ = state_snapshot::entries(kind, &bytes);
    let clocks = Clocks::new(
        Instant::now(),
        UNIX_EPOCH + Duration::from_millis(1_795_438_862_000),
    );
    let config = base_config();
    let sizes = |first: usize, kept: Option<usize>, second: Option<usize>| match kept {
        None => assert_eq!(first, 0, "a refused {kind:?} snapshot loaded entries"),
        Some(kept) => {
            assert!(first <= kept, "{first} entries held, {kept} reported kept");
            assert_eq!(
                second,
                Some(first),
                "{kind:?}: save and load changed the table"
            );
        }
    };
    match kind {
        Kind::Pass => {
            let fresh = || PassCache::new(config.tarpit.pass_ttl);
            let table = fresh();
            let kept = table.restore(&bytes, &clocks).ok().map(|r| r.kept);
            let again = fresh();
            let second = again
                .restore(&table.snapshot(&clocks), &clocks)
                .ok()
                .map(|_| again.len());
            sizes(table.len(), kept, second);
        }
        Kind::Greylist => {
            let greylist = &GreylistTimes::of(&config.greylist);
            let table = Greylist::new(clocks.now());
            let kept = table
                .restore(&bytes, &clocks, greylist)
                .ok()
                .map(|r| r.kept);
            let again = Greylist::new(clocks.now());
            let saved = table.snapshot(&clocks, greylist);
            let second = again
                .restore(&saved, &clocks, greylist)
                .ok()
                .map(|_| again.len());
            sizes(table.len(), kept, second);
        }
        Kind::Reputation => {
            let half_life = config.reputation.half_life;
            let table = ReputationTable::new();
            let kept = table
                .restore(&bytes, &clocks, half_life)
                .ok()
                .map(|r| r.kept);
            let again = ReputationTable::new();
            let saved = table.snapshot(&clocks, half_life);
            let second = again
                .restore(&saved, &clocks, half_life)
                .ok()
                .map(|_| again.len());
            sizes(table.len(), kept, second);
        }
    }
}
