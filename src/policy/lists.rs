//! Local allow and deny lists (DESIGN.md §3.1).

use std::net::IpAddr;
use std::path::PathBuf;

use crate::config::ConfigError;

/// One list (allow or deny), compiled from all its files.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct List {}

/// Which list matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListMatch {
    /// On the allow list.
    Allow,
    /// On the deny list.
    Deny,
}

/// The allow and deny lists together; allow wins when both match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListSet {
    /// `[lists] allow`
    pub allow: List,
    /// `[lists] deny`
    pub deny: List,
}

impl List {
    /// Parses the texts of a list's files (path, contents), in order. Every bad line is an
    /// error naming `path:line` (empty key).
    pub fn parse(files: &[(PathBuf, String)]) -> Result<List, Vec<ConfigError>> {
        let _ = files;
        Ok(List {})
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        0
    }

    /// Whether the list has no entry.
    pub fn is_empty(&self) -> bool {
        true
    }

    /// Whether `ip` is listed (an IP entry or inside a CIDR entry).
    pub fn contains_ip(&self, ip: IpAddr) -> bool {
        let _ = ip;
        false
    }

    /// Whether `name` is listed: equal to an entry or under it, case-insensitive, trailing dot
    /// ignored.
    pub fn contains_domain(&self, name: &str) -> bool {
        let _ = name;
        false
    }
}

impl ListSet {
    /// The match for an address, allow first.
    pub fn check_ip(&self, ip: IpAddr) -> Option<ListMatch> {
        if self.allow.contains_ip(ip) {
            Some(ListMatch::Allow)
        } else if self.deny.contains_ip(ip) {
            Some(ListMatch::Deny)
        } else {
            None
        }
    }

    /// The match for a domain (verified rDNS name, HELO, sender domain), allow first.
    pub fn check_domain(&self, name: &str) -> Option<ListMatch> {
        if self.allow.contains_domain(name) {
            Some(ListMatch::Allow)
        } else if self.deny.contains_domain(name) {
            Some(ListMatch::Deny)
        } else {
            None
        }
    }
}
