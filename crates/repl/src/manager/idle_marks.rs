//! When an idle volume's async targets get an empty commit (a "nudge") so
//! that every target comes to hold a common mark (see
//! `forced_rehome::announce_marks`), and how that is bounded: a target
//! that never holds one (an old peer, a target that keeps failing to
//! persist its marks) would otherwise get an empty commit every tick for
//! ever. Nudges in a row back off, doubling from one tick up to
//! [`MAX_GAP_TICKS`]; the back-off starts over once every target holds a
//! mark or the target list changes.

/// The longest wait between two nudges of one volume, in ticks of the
/// background loop (1 s): a target that never holds a mark costs one
/// empty commit a minute.
pub(super) const MAX_GAP_TICKS: u32 = 60;

/// Ticks to wait after the `nudges`-th nudge in a row before the next:
/// 1, 2, 4, … capped at [`MAX_GAP_TICKS`].
pub(super) fn gap_ticks(nudges: u32) -> u32 {
    let doublings = nudges.saturating_sub(1);
    1u32.checked_shl(doublings)
        .unwrap_or(u32::MAX)
        .min(MAX_GAP_TICKS)
}

/// Whether an idle volume's targets are asked for an empty commit this
/// tick: only while idle (writes move the points anyway), while some
/// target holds no mark yet (nothing changes otherwise), and once the
/// back-off after the last `nudges` nudges in a row (`waited` ticks ago)
/// has passed.
pub(super) fn should_nudge(idle: bool, held_by_all: bool, nudges: u32, waited: u32) -> bool {
    idle && !held_by_all && (nudges == 0 || waited >= gap_ticks(nudges))
}

/// A volume's nudges in a row and the ticks since the last one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Backoff {
    /// Nudges since every target last held a mark (or the target list
    /// last changed).
    nudges: u32,
    /// Ticks since the last nudge.
    waited: u32,
}

impl Backoff {
    /// One tick of the background loop for an idle-or-not volume whose
    /// marks did not move: true when its targets are to be nudged now.
    pub(super) fn tick(&mut self, idle: bool, held_by_all: bool) -> bool {
        self.waited = self.waited.saturating_add(1);
        let now = should_nudge(idle, held_by_all, self.nudges, self.waited);
        if now {
            self.nudges = self.nudges.saturating_add(1);
            self.waited = 0;
        }
        now
    }

    /// One tick spent announcing a mark or a target list instead: time
    /// passes for the back-off; `reset` (every target holds the mark, or
    /// the targets changed) starts it over.
    pub(super) fn announced(self, reset: bool) -> Self {
        if reset {
            Self::default()
        } else {
            Self {
                waited: self.waited.saturating_add(1),
                ..self
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_volume_is_nudged_only_while_idle_without_a_mark_held_by_all_and_past_its_back_off() {
        // (idle, every target holds the newest mark, nudges in a row,
        // ticks since the last) → nudge
        let rows = [
            ((true, false, 0, 0), true),
            ((true, true, 0, 5), false),
            ((false, false, 0, 5), false),
            ((false, true, 0, 5), false),
            // After the first nudge: the next tick.
            ((true, false, 1, 0), false),
            ((true, false, 1, 1), true),
            // After the third: 4 ticks.
            ((true, false, 3, 3), false),
            ((true, false, 3, 4), true),
            // Capped at a minute, however many came before.
            ((true, false, 40, 59), false),
            ((true, false, 40, 60), true),
            ((true, false, u32::MAX, 60), true),
            ((true, true, u32::MAX, u32::MAX), false),
        ];
        for ((idle, held, nudges, waited), want) in rows {
            assert_eq!(
                should_nudge(idle, held, nudges, waited),
                want,
                "idle {idle}, held {held}, nudges {nudges}, waited {waited}"
            );
        }
    }

    #[test]
    fn the_gaps_double_up_to_a_minute() {
        let gaps: Vec<u32> = (1..=9).map(gap_ticks).collect();
        assert_eq!(gaps, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(gap_ticks(u32::MAX), MAX_GAP_TICKS);
    }

    #[test]
    fn a_target_that_never_holds_a_mark_gets_at_most_one_nudge_a_minute() {
        let mut b = Backoff::default();
        let nudged: Vec<u32> = (0..600).filter(|_| b.tick(true, false)).collect();
        // Ticks 0, 1, 3, 7, 15, 31, 63, 123, then every 60th.
        assert_eq!(&nudged[..8], &[0, 1, 3, 7, 15, 31, 63, 123]);
        assert_eq!(nudged.len(), 15, "nudges in 10 minutes: {nudged:?}");
        assert!(
            nudged
                .windows(2)
                .skip(7)
                .all(|w| w[1] - w[0] == MAX_GAP_TICKS)
        );
        // Every target holding a mark starts the back-off over.
        let mut b = b.announced(true);
        assert!(b.tick(true, false));
        // An announcement without that only lets time pass.
        let mut b = b.announced(false);
        assert!(b.tick(true, false));
        assert!(!b.tick(true, false));
    }
}
