//! Which renditions of a subscribed stream a node asks its upstream for,
//! sans-IO: a rendition is selected while something here reads it (a
//! viewer's feed, a downstream relay link) and for [`LINGER`] after the
//! last reader left, so a viewer switching back and forth, or a reader
//! that comes and goes in a moment, does not make the upstream stop and
//! restart the rendition. Tracks without a rendition are always sent and
//! never named. Until the first change nothing is sent, and the upstream
//! sends everything: a fresh subscription starts with every rendition
//! flowing for [`LINGER`], so the first viewer's Auto choice plays at once.
//!
//! ```text
//! in:  update(now, [(track, is_rendition, readers)])
//! out: Some(Change { select, dropped }) when the selection changed
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// How long a rendition stays selected after its last reader left.
pub(crate) const LINGER: Duration = Duration::from_secs(2);

/// How often the receiving side looks at its readers: a switch to a
/// rendition that is held back waits this much longer, plus a round trip.
pub(crate) const TICK: Duration = Duration::from_millis(100);

/// A new selection to tell the upstream.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Change {
    /// Every rendition to send from now on.
    pub(crate) select: Vec<String>,
    /// Renditions no longer sent: their local cache is stale from now on.
    pub(crate) dropped: Vec<String>,
}

/// The selection state of one subscribed stream.
pub(crate) struct Selection {
    /// Each rendition and when it last had a reader (or the start).
    last_read: BTreeMap<String, Instant>,
    /// What the upstream was told; `None` before the first `Select`.
    told: Option<BTreeSet<String>>,
}

impl Selection {
    /// A fresh subscription: its renditions count as read from the first
    /// [`Selection::update`] on.
    pub(crate) fn new() -> Self {
        Self {
            last_read: BTreeMap::new(),
            told: None,
        }
    }

    /// The renditions held back now (selected before, or sent by default,
    /// and not any more).
    pub(crate) fn held(&self) -> usize {
        match &self.told {
            Some(t) => self.last_read.keys().filter(|k| !t.contains(*k)).count(),
            None => 0,
        }
    }

    /// The current tracks and their readers; returns what to tell the
    /// upstream when the selection changed.
    pub(crate) fn update<'a>(
        &mut self,
        now: Instant,
        tracks: impl IntoIterator<Item = (&'a str, bool, usize)>,
    ) -> Option<Change> {
        let mut seen = BTreeSet::new();
        for (name, rendition, readers) in tracks {
            if !rendition {
                continue;
            }
            seen.insert(name.to_string());
            let last = self.last_read.entry(name.to_string()).or_insert(now);
            if readers > 0 {
                *last = now;
            }
        }
        // Renditions gone from the catalog are forgotten.
        self.last_read.retain(|k, _| seen.contains(k));
        let wanted: BTreeSet<String> = self
            .last_read
            .iter()
            .filter(|(_, &t)| now.saturating_duration_since(t) < LINGER)
            .map(|(k, _)| k.clone())
            .collect();
        let before = match &self.told {
            Some(t) => t.clone(),
            // The upstream sends everything until told otherwise.
            None => self.last_read.keys().cloned().collect(),
        };
        if self.told.is_some() && wanted == before {
            return None;
        }
        if self.told.is_none() && wanted.len() == self.last_read.len() {
            return None;
        }
        let dropped = before.difference(&wanted).cloned().collect();
        self.told = Some(wanted.clone());
        Some(Change {
            select: wanted.into_iter().collect(),
            dropped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ladder(readers: [usize; 3]) -> Vec<(&'static str, bool, usize)> {
        vec![
            ("video", true, readers[0]),
            ("video-h", true, readers[1]),
            ("video-q", true, readers[2]),
            ("audio", false, 0),
        ]
    }

    #[test]
    fn everything_flows_until_a_rendition_is_unread_for_the_linger() {
        let t0 = Instant::now();
        let mut s = Selection::new();
        assert_eq!(s.update(t0, ladder([1, 0, 0])), None);
        assert_eq!(s.update(t0 + LINGER / 2, ladder([1, 0, 0])), None);
        assert_eq!(s.held(), 0);
        let c = s.update(t0 + LINGER, ladder([1, 0, 0])).unwrap();
        assert_eq!(c.select, vec!["video"]);
        assert_eq!(c.dropped, vec!["video-h", "video-q"]);
        assert_eq!(s.held(), 2);
        // Nothing changes: nothing to say.
        assert_eq!(s.update(t0 + LINGER * 2, ladder([1, 0, 0])), None);
    }

    #[test]
    fn a_new_reader_selects_at_once_and_the_last_one_leaving_lingers() {
        let t0 = Instant::now();
        let mut s = Selection::new();
        assert_eq!(s.update(t0, ladder([1, 0, 0])), None);
        s.update(t0 + LINGER, ladder([1, 0, 0])).unwrap();
        let t = t0 + LINGER * 3;
        let c = s.update(t, ladder([1, 0, 1])).unwrap();
        assert_eq!(c.select, vec!["video", "video-q"]);
        assert!(c.dropped.is_empty());
        // The viewer switched to q and left the top: it stays for LINGER.
        assert_eq!(s.update(t + TICK, ladder([0, 0, 1])), None);
        assert_eq!(s.update(t + LINGER - TICK, ladder([0, 0, 1])), None);
        let c = s.update(t + LINGER, ladder([0, 0, 1])).unwrap();
        assert_eq!(c.select, vec!["video-q"]);
        assert_eq!(c.dropped, vec!["video"]);
        // A reader that comes and goes within the linger costs nothing.
        let t = t + LINGER * 2;
        s.update(t, ladder([0, 1, 1])).unwrap();
        assert_eq!(s.update(t + TICK, ladder([0, 0, 1])), None);
        assert_eq!(s.update(t + TICK * 2, ladder([0, 1, 1])), None);
    }

    #[test]
    fn no_renditions_no_selection_and_nobody_reading_selects_none() {
        let t0 = Instant::now();
        let mut s = Selection::new();
        let plain = [("video", false, 0), ("audio", false, 3)];
        assert_eq!(s.update(t0, plain), None);
        assert_eq!(s.update(t0 + LINGER * 5, plain), None);
        let mut s = Selection::new();
        s.update(t0, ladder([0, 0, 0]));
        let c = s.update(t0 + LINGER, ladder([0, 0, 0])).unwrap();
        assert!(c.select.is_empty());
        assert_eq!(c.dropped.len(), 3);
    }

    #[test]
    fn renditions_leaving_the_catalog_are_forgotten_and_new_ones_start_selected() {
        let t0 = Instant::now();
        let mut s = Selection::new();
        assert_eq!(s.update(t0, ladder([1, 0, 0])), None);
        s.update(t0 + LINGER, ladder([1, 0, 0])).unwrap();
        // A late simulcast layer appears: selected until it lingers out.
        let mut l = ladder([1, 0, 0]);
        l.push(("video-x", true, 0));
        let t = t0 + LINGER * 2;
        let c = s.update(t, l.clone()).unwrap();
        assert_eq!(c.select, vec!["video", "video-x"]);
        let c = s.update(t + LINGER, l).unwrap();
        assert_eq!(c.select, vec!["video"]);
        // h and q leave the catalog: no longer counted as held.
        assert_eq!(s.update(t + LINGER * 2, [("video", true, 1)]), None);
        assert_eq!(s.held(), 0);
    }
}
