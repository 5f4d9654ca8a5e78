//! mio tokens: which source an event is for.
//!
//! Layout of the 64-bit token: fixed sources (the waker, listeners) have the upper 32 bits zero;
//! a connection socket has its [`ConnKey`]'s generation there (never 0, see the slab), its slot
//! in bits 1..32 and in bit 0 which of the connection's two sockets the event is for. So a late
//! event for a closed connection carries an old generation and finds nothing.

use mio::Token;

use super::slab::ConnKey;
use crate::smtp::Side;

#[cfg(not(target_pointer_width = "64"))]
compile_error!("tarmac packs a 32-bit generation and a 31-bit slot into a mio Token (usize)");

/// The worker's `mio::Waker`: shutdown requests (and later DNS answers).
pub(crate) const WAKER: Token = Token(0);

/// Largest slot a token can carry (31 bits). The worker refuses a connection whose slot would be
/// larger, which needs two billion open connections in one worker.
const MAX_SLOT: u32 = (1 << 31) - 1;

/// What an event's token names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// The worker's waker.
    Waker,
    /// The worker's `n`-th listener.
    Listener(usize),
    /// One socket of a connection.
    Conn(ConnKey, Side),
}

/// The token of the worker's `n`-th listener.
pub(crate) fn listener(n: usize) -> Token {
    Token(n.saturating_add(1))
}

/// Whether `key` can be carried in a token.
pub(crate) fn fits(key: ConnKey) -> bool {
    key.slot <= MAX_SLOT && key.generation != 0
}

/// The token of one socket of connection `key`; `key` must pass [`fits`].
pub(crate) fn conn(key: ConnKey, side: Side) -> Token {
    let side = match side {
        Side::Client => 0,
        Side::Downstream => 1,
    };
    Token(((key.generation as usize) << 32) | (((key.slot & MAX_SLOT) as usize) << 1) | side)
}

/// What `token` names.
pub(crate) fn decode(token: Token) -> Source {
    let generation = (token.0 >> 32) as u32;
    if generation == 0 {
        return match token.0 {
            0 => Source::Waker,
            n => Source::Listener(n - 1),
        };
    }
    let slot = ((token.0 >> 1) as u32) & MAX_SLOT;
    let side = if token.0 & 1 == 0 {
        Side::Client
    } else {
        Side::Downstream
    };
    Source::Conn(ConnKey { slot, generation }, side)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_tokens_round_trip() {
        for key in [
            ConnKey {
                slot: 0,
                generation: 1,
            },
            ConnKey {
                slot: 5,
                generation: 9,
            },
            ConnKey {
                slot: MAX_SLOT,
                generation: u32::MAX,
            },
        ] {
            assert!(fits(key));
            for side in [Side::Client, Side::Downstream] {
                assert_eq!(decode(conn(key, side)), Source::Conn(key, side));
            }
        }
    }

    #[test]
    fn fixed_tokens_never_look_like_connections() {
        assert_eq!(decode(WAKER), Source::Waker);
        assert_eq!(decode(listener(0)), Source::Listener(0));
        assert_eq!(decode(listener(7)), Source::Listener(7));
        let first = conn(
            ConnKey {
                slot: 0,
                generation: 1,
            },
            Side::Client,
        );
        assert!(first.0 > listener(u32::MAX as usize - 1).0);
    }

    #[test]
    fn oversized_slot_does_not_fit() {
        assert!(!fits(ConnKey {
            slot: MAX_SLOT + 1,
            generation: 1
        }));
        assert!(!fits(ConnKey {
            slot: 0,
            generation: 0
        }));
    }
}
