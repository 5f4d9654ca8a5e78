//! Address blocks (`192.0.2.0/24`, `2001:db8::/32`), as the lists, the rules and
//! `[server] proxy_protocol_from` write them: parsed from the operator's text, matched against
//! client addresses. No I/O.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// The expected form, quoted by the error for an input that is no address at all.
const CIDR_HINT: &str = r#"expected an address or block such as "192.0.2.0/24" or "2001:db8::/32""#;

/// An address block such as `192.0.2.0/24` or `2001:db8::/32`; a bare address is a /32 or /128.
/// Parsed with [`str::parse`]; an address with host bits set (`192.0.2.1/24`) is refused, since
/// it usually means a typo in the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// Network address (host bits zero).
    pub addr: IpAddr,
    /// Prefix length, ≤ 32 for IPv4 and ≤ 128 for IPv6.
    pub prefix: u8,
}

/// Why a string is not a [`Cidr`]; the message quotes the input and the expected form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CidrError(String);

impl Cidr {
    /// Whether `ip` lies in this block. An IPv4-mapped IPv6 address (`::ffff:192.0.2.7`, what a
    /// dual-stack socket reports for an IPv4 client) is matched as the IPv4 address it carries.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            IpAddr::V4(_) => ip,
        };
        self.addr.is_ipv4() == ip.is_ipv4() && mask(ip, self.prefix) == self.addr
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// A CIDR block or a bare address (a /32 or /128).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |why: String| CidrError(format!("invalid CIDR {s:?}: {why}"));
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr = IpAddr::from_str(addr).map_err(|_| invalid(CIDR_HINT.to_owned()))?;
        let max = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        let prefix = match prefix {
            None => max,
            // Canonical digits only: "/024" or "/+24" are refused rather than read as 24.
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && n.to_string() == p => n,
                _ => return Err(invalid(format!("prefix length must be 0 to {max}"))),
            },
        };
        let network = mask(addr, prefix);
        if network != addr {
            return Err(invalid(format!(
                "host bits are set; did you mean {network}/{prefix}?"
            )));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl fmt::Display for CidrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CidrError {}

/// `addr` with every bit after the first `prefix` cleared.
fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            // checked_shl: a shift by the full width (prefix 0) is None, i.e. an all-zero mask.
            let bits = u32::MAX
                .checked_shl(32u32.saturating_sub(u32::from(prefix)))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & bits))
        }
        IpAddr::V6(v6) => {
            let bits = u128::MAX
                .checked_shl(128u32.saturating_sub(u32::from(prefix)))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & bits))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let ok: &[(&str, &str, u8)] = &[
            ("192.0.2.0/24", "192.0.2.0", 24),
            ("192.0.2.7", "192.0.2.7", 32),
            ("0.0.0.0/0", "0.0.0.0", 0),
            ("2001:db8::/32", "2001:db8::", 32),
            ("::1", "::1", 128),
            ("::/0", "::", 0),
        ];
        for (input, addr, prefix) in ok {
            assert_eq!(
                input.parse::<Cidr>(),
                Ok(Cidr {
                    addr: addr.parse().unwrap(),
                    prefix: *prefix
                }),
                "{input}"
            );
        }
        let bad: &[(&str, &str)] = &[
            (
                "192.0.2.1/24",
                "host bits are set; did you mean 192.0.2.0/24?",
            ),
            (
                "2001:db8::1/32",
                "host bits are set; did you mean 2001:db8::/32?",
            ),
            ("192.0.2.0/33", "prefix length must be 0 to 32"),
            ("2001:db8::/129", "prefix length must be 0 to 128"),
            ("192.0.2.0/024", "prefix length must be 0 to 32"),
            ("192.0.2.0/", "prefix length must be 0 to 32"),
            ("192.0.2.0/-1", "prefix length must be 0 to 32"),
            ("example.org/24", CIDR_HINT),
            ("", CIDR_HINT),
        ];
        for (input, why) in bad {
            assert_eq!(
                input.parse::<Cidr>(),
                Err(CidrError(format!("invalid CIDR {input:?}: {why}"))),
                "{input}"
            );
        }
    }
}
