//! A generation-tagged slab: the worker's table of connections.
//!
//! A removed slot is reused by the next insert, but with a new generation, so a [`ConnKey`] held
//! by a late readiness event, an old timer entry, or a DNS or state answer for a connection that
//! is gone no longer finds anything, instead of finding the stranger now living in its slot.

use std::fmt;

/// Names one occupant of a slab slot. Generations start at 1 and skip 0 when they wrap, so no
/// key ever has generation 0; the worker relies on that to keep connection tokens apart from its
/// fixed tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ConnKey {
    /// Index into the slab.
    pub(crate) slot: u32,
    /// Which occupant of that slot.
    pub(crate) generation: u32,
}

impl ConnKey {
    /// The key as one number, for carrying through another thread (the resolver's waiters).
    pub(crate) fn to_u64(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.slot)
    }

    /// The key [`ConnKey::to_u64`] packed.
    pub(crate) fn from_u64(packed: u64) -> ConnKey {
        ConnKey {
            slot: packed as u32,
            generation: (packed >> 32) as u32,
        }
    }
}

impl fmt::Display for ConnKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.slot, self.generation)
    }
}

/// Values addressed by [`ConnKey`]; freed slots are reused last-in first-out.
#[derive(Debug)]
pub(crate) struct Slab<T> {
    entries: Vec<Entry<T>>,
    /// Free slot indices; the most recently freed is reused first (its memory is warm).
    free: Vec<u32>,
    len: usize,
}

#[derive(Debug)]
struct Entry<T> {
    generation: u32,
    value: Option<T>,
}

impl<T> Slab<T> {
    /// An empty slab.
    pub(crate) fn new() -> Slab<T> {
        Slab {
            entries: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }

    /// Stores `value` and returns its key, or gives the value back when all `u32` slots are
    /// taken (a worker runs out of file descriptors long before that).
    pub(crate) fn insert(&mut self, value: T) -> Result<ConnKey, T> {
        if let Some(slot) = self.free.pop() {
            if let Some(entry) = self.entries.get_mut(slot as usize) {
                entry.value = Some(value);
                self.len += 1;
                return Ok(ConnKey {
                    slot,
                    generation: entry.generation,
                });
            }
        }
        let Ok(slot) = u32::try_from(self.entries.len()) else {
            return Err(value);
        };
        self.entries.push(Entry {
            generation: 1,
            value: Some(value),
        });
        self.len += 1;
        Ok(ConnKey {
            slot,
            generation: 1,
        })
    }

    /// Takes the value out and retires its key; `None` for a stale or unknown key.
    pub(crate) fn remove(&mut self, key: ConnKey) -> Option<T> {
        let entry = self.entries.get_mut(key.slot as usize)?;
        if entry.generation != key.generation {
            return None;
        }
        let value = entry.value.take()?;
        entry.generation = match entry.generation.wrapping_add(1) {
            0 => 1,
            next => next,
        };
        self.free.push(key.slot);
        self.len -= 1;
        Some(value)
    }

    /// Every occupied slot, in slot order.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (ConnKey, &mut T)> {
        self.entries
            .iter_mut()
            .zip(0u32..)
            .filter_map(|(entry, slot)| {
                let generation = entry.generation;
                let value = entry.value.as_mut()?;
                Some((ConnKey { slot, generation }, value))
            })
    }

    /// The value for `key`; `None` once it was removed, even if the slot holds a newer value.
    pub(crate) fn get(&self, key: ConnKey) -> Option<&T> {
        let entry = self.entries.get(key.slot as usize)?;
        if entry.generation != key.generation {
            return None;
        }
        entry.value.as_ref()
    }

    /// Like [`Slab::get`], mutable.
    pub(crate) fn get_mut(&mut self, key: ConnKey) -> Option<&mut T> {
        let entry = self.entries.get_mut(key.slot as usize)?;
        if entry.generation != key.generation {
            return None;
        }
        entry.value.as_mut()
    }

    /// How many values are stored.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether no value is stored.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_get_remove() {
        let mut slab = Slab::new();
        let a = slab.insert("a").unwrap();
        let b = slab.insert("b").unwrap();
        assert_eq!(slab.len(), 2);
        assert_eq!(slab.get(a), Some(&"a"));
        assert_eq!(slab.get(b), Some(&"b"));
        assert_eq!(slab.remove(a), Some("a"));
        assert_eq!(slab.len(), 1);
        assert_eq!(slab.get(a), None);
        assert_eq!(slab.remove(a), None);
        assert_eq!(slab.len(), 1);
        *slab.get_mut(b).unwrap() = "B";
        assert_eq!(slab.get(b), Some(&"B"));
    }

    #[test]
    fn reused_slot_gets_a_new_generation() {
        let mut slab = Slab::new();
        let old = slab.insert(1).unwrap();
        assert_eq!(
            old,
            ConnKey {
                slot: 0,
                generation: 1
            }
        );
        slab.remove(old).unwrap();
        let new = slab.insert(2).unwrap();
        assert_eq!(
            new,
            ConnKey {
                slot: 0,
                generation: 2
            }
        );
        assert_eq!(slab.get(old), None);
        assert_eq!(slab.get_mut(old), None);
        assert_eq!(slab.remove(old), None);
        assert_eq!(slab.get(new), Some(&2));
        assert_eq!(slab.len(), 1);
    }

    #[test]
    fn last_freed_slot_is_reused_first() {
        let mut slab = Slab::new();
        let keys: Vec<_> = (0..4).map(|i| slab.insert(i).unwrap()).collect();
        slab.remove(keys[1]).unwrap();
        slab.remove(keys[3]).unwrap();
        assert_eq!(slab.insert(10).unwrap().slot, 3);
        assert_eq!(slab.insert(11).unwrap().slot, 1);
        assert_eq!(slab.insert(12).unwrap().slot, 4);
        assert_eq!(slab.len(), 5);
    }

    #[test]
    fn unknown_slot_is_none() {
        let mut slab: Slab<u8> = Slab::new();
        let key = ConnKey {
            slot: 7,
            generation: 1,
        };
        assert_eq!(slab.get(key), None);
        assert_eq!(slab.remove(key), None);
        assert!(slab.is_empty());
    }

    #[test]
    fn generation_skips_zero_when_it_wraps() {
        let mut slab = Slab::new();
        let key = slab.insert(()).unwrap();
        slab.entries[0].generation = u32::MAX;
        let key = ConnKey {
            generation: u32::MAX,
            ..key
        };
        slab.remove(key).unwrap();
        assert_eq!(
            slab.insert(()).unwrap(),
            ConnKey {
                slot: 0,
                generation: 1
            }
        );
    }

    #[test]
    fn iter_mut_visits_occupied_slots_with_their_keys() {
        let mut slab = Slab::new();
        let a = slab.insert(1).unwrap();
        let b = slab.insert(2).unwrap();
        let c = slab.insert(3).unwrap();
        slab.remove(b).unwrap();
        for (_, v) in slab.iter_mut() {
            *v *= 10;
        }
        let seen: Vec<_> = slab.iter_mut().map(|(k, v)| (k, *v)).collect();
        assert_eq!(seen, vec![(a, 10), (c, 30)]);
    }
}
