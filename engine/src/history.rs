//! The history index of one entity: the log positions of its events still in the log, which
//! `GET /api/events` reads newest first.
//!
//! Invariants:
//! - Positions are pushed in log order, so they strictly increase; the index holds them oldest
//!   first.
//! - It never holds more than [`HISTORY_KEPT_PER_ENTITY`] + [`TRIM_SLACK`] positions, and always
//!   the newest [`HISTORY_KEPT_PER_ENTITY`] pushed that were not forgotten: a query returns at
//!   most that many, so older ones could never be asked for.
//! - One position is held inline (most ids have one event); more are packed as the oldest
//!   position plus LEB128 deltas, one to three bytes each for the gaps a fleet's ids see instead
//!   of eight. A busy id costs ~1–2 KiB, not the 4–8 KiB of plain positions.

use crate::record::LogPosition;

/// Event positions remembered per entity: a history query returns at most this many (newest
/// first), so older positions could never be asked for. Bounds the index to this many per id
/// however long the retention.
pub const HISTORY_KEPT_PER_ENTITY: usize = 500;

/// Positions pushed past [`HISTORY_KEPT_PER_ENTITY`] before the oldest are cut back to it: a
/// cut re-reads the deltas it drops, so it runs once per this many pushes.
pub const TRIM_SLACK: usize = HISTORY_KEPT_PER_ENTITY / 4;

/// See the module docs.
#[derive(Default)]
pub enum History {
    #[default]
    Empty,
    One(LogPosition),
    // Boxed so the enum (one per id) stays 16 bytes; the extra hop is only for ids with more
    // than one event.
    Many(Box<Packed>),
}

/// Two or more positions: the oldest, the newest, and the gaps between them in order.
pub struct Packed {
    oldest: LogPosition,
    newest: LogPosition,
    len: usize,
    /// `len - 1` LEB128 varints, each a position minus the one before it.
    deltas: Vec<u8>,
}

impl History {
    /// Adds `position`, newer than every position held.
    pub fn push(&mut self, position: LogPosition) {
        match self {
            History::Empty => *self = History::One(position),
            History::One(oldest) => {
                debug_assert!(position > *oldest);
                let mut deltas = Vec::with_capacity(8);
                write_varint(&mut deltas, position.wrapping_sub(*oldest));
                *self = History::Many(Box::new(Packed {
                    oldest: *oldest,
                    newest: position,
                    len: 2,
                    deltas,
                }));
            }
            History::Many(packed) => {
                debug_assert!(position > packed.newest);
                if packed.len >= HISTORY_KEPT_PER_ENTITY + TRIM_SLACK {
                    packed.drop_oldest(packed.len - HISTORY_KEPT_PER_ENTITY + 1);
                }
                write_varint(&mut packed.deltas, position.wrapping_sub(packed.newest));
                packed.newest = position;
                packed.len += 1;
            }
        }
    }

    /// The newest `limit` positions, newest first.
    pub fn newest(&self, limit: usize) -> Vec<LogPosition> {
        match self {
            History::Empty => Vec::new(),
            History::One(position) => [*position][..limit.min(1)].to_vec(),
            History::Many(packed) => {
                let mut all = packed.positions();
                all.reverse();
                all.truncate(limit);
                all
            }
        }
    }

    /// Drops the positions below `first_kept` (the log no longer holds them).
    pub fn forget_before(&mut self, first_kept: LogPosition) {
        match self {
            History::Empty => {}
            History::One(position) => {
                if *position < first_kept {
                    *self = History::Empty;
                }
            }
            History::Many(packed) => {
                if packed.newest < first_kept {
                    *self = History::Empty;
                } else if packed.oldest < first_kept {
                    packed.drop_oldest(packed.count_below(first_kept));
                    if packed.len == 1 {
                        *self = History::One(packed.newest);
                    } else if packed.deltas.capacity() > 2 * packed.deltas.len() + 16 {
                        packed.deltas.shrink_to_fit();
                    }
                }
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, History::Empty)
    }

    /// How many positions are held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        match self {
            History::Empty => 0,
            History::One(_) => 1,
            History::Many(packed) => packed.len,
        }
    }
}

impl Packed {
    /// Every position, oldest first.
    fn positions(&self) -> Vec<LogPosition> {
        let mut out = Vec::with_capacity(self.len);
        let mut position = self.oldest;
        out.push(position);
        let mut bytes = &self.deltas[..];
        while !bytes.is_empty() {
            position = position.wrapping_add(read_varint(&mut bytes));
            out.push(position);
        }
        out
    }

    /// How many positions are below `first_kept`.
    fn count_below(&self, first_kept: LogPosition) -> usize {
        let mut below = 0;
        let mut position = self.oldest;
        let mut bytes = &self.deltas[..];
        while position < first_kept {
            below += 1;
            if bytes.is_empty() {
                break;
            }
            position = position.wrapping_add(read_varint(&mut bytes));
        }
        below
    }

    /// Drops the oldest `n` positions (fewer than `len`).
    fn drop_oldest(&mut self, n: usize) {
        debug_assert!(n < self.len);
        let mut bytes = &self.deltas[..];
        let mut oldest = self.oldest;
        for _ in 0..n {
            oldest = oldest.wrapping_add(read_varint(&mut bytes));
        }
        let consumed = self.deltas.len() - bytes.len();
        self.deltas.drain(..consumed);
        self.oldest = oldest;
        self.len -= n;
    }
}

/// Appends `value` as LEB128: seven bits a byte, low bits first, the top bit set on every byte
/// but the last.
fn write_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads one LEB128 value from the front of `bytes` (written by [`write_varint`]).
fn read_varint(bytes: &mut &[u8]) -> u64 {
    let mut value = 0u64;
    let mut shift = 0;
    for (i, &byte) in bytes.iter().enumerate() {
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            *bytes = &bytes[i + 1..];
            return value;
        }
        shift += 7;
    }
    unreachable!("the deltas end with a whole varint");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_stays_16_bytes() {
        assert_eq!(std::mem::size_of::<History>(), 16);
    }

    #[test]
    fn varints_round_trip_every_width() {
        let values = [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            1 << 35,
            u64::MAX - 1,
            u64::MAX,
        ];
        let mut bytes = Vec::new();
        for v in values {
            write_varint(&mut bytes, v);
        }
        let mut rest = &bytes[..];
        for v in values {
            assert_eq!(read_varint(&mut rest), v);
        }
        assert!(rest.is_empty());
    }

    /// The index against a plain list of every position: the newest are kept whatever the gaps
    /// (one to eight varint bytes), forgetting cuts exactly below the first kept, and the held
    /// count stays within its bound.
    #[test]
    fn history_matches_a_plain_list() {
        for gap in [1u64, 100, 70_000, 1 << 20, 1 << 40, 1 << 52] {
            let mut history = History::default();
            let mut all = Vec::new();
            let mut position = 5u64;
            for i in 0..3 * HISTORY_KEPT_PER_ENTITY as u64 {
                position += gap + i % 7;
                history.push(position);
                all.push(position);
                assert!(history.len() <= HISTORY_KEPT_PER_ENTITY + TRIM_SLACK);
                let limit = (i as usize * 37) % 600;
                let want: Vec<LogPosition> = all
                    .iter()
                    .rev()
                    .take(limit.min(history.len()))
                    .copied()
                    .collect();
                assert_eq!(history.newest(limit), want, "gap {gap}, push {i}");
            }
            let held = history.len();
            assert!(held >= HISTORY_KEPT_PER_ENTITY);
            // Forget below cut points between or at positions.
            for back in [300, 120, 11] {
                let first_kept = all[all.len() - back] - 1;
                history.forget_before(first_kept);
                let want: Vec<LogPosition> = all
                    .iter()
                    .rev()
                    .take_while(|&&p| p >= first_kept)
                    .copied()
                    .collect();
                assert_eq!(history.newest(usize::MAX), want, "gap {gap}, back {back}");
            }
            // Forget below the 10th newest: exactly 10 remain.
            let first_kept = all[all.len() - 10];
            history.forget_before(first_kept);
            assert_eq!(
                history.newest(usize::MAX),
                all.iter().rev().take(10).copied().collect::<Vec<_>>()
            );
            history.forget_before(all[all.len() - 1]);
            assert!(matches!(history, History::One(p) if p == position));
            history.forget_before(u64::MAX);
            assert!(history.is_empty());
        }
    }

    #[test]
    fn one_position_is_inline_and_forgetting_nothing_keeps_all() {
        let mut history = History::default();
        history.push(7);
        assert!(matches!(history, History::One(7)));
        assert_eq!(history.newest(0), Vec::<u64>::new());
        history.push(9);
        history.forget_before(7);
        assert_eq!(history.newest(10), [9, 7]);
        history.forget_before(8);
        assert!(matches!(history, History::One(9)));
    }
}
