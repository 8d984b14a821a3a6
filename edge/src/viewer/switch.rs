//! Rendition switching of one viewer's video, sans-IO: which rendition the
//! viewer should get (its [`Target`], and in Auto mode the default one, or
//! the best still flowing when that went silent), when a switch may happen
//! (only at a keyframe of the new rendition, never one older than what the
//! viewer already has), and the timestamp rewrite that keeps the viewer's
//! one video stream continuous across switches (sequence numbers are the
//! viewer's own and continue anyway).
//!
//! The shell (`viewer::Out`) reads the current rendition's feed and, while
//! a switch is pending, the target's; it hands every frame to
//! [`Switch::on_frame`] and acts on [`Switch::poll`]'s commands (join or
//! leave a feed). Inputs carry `now` (the shard's clock) and `now_us` (the
//! wall clock the frames' `ingest_us` are stamped in).

use std::time::{Duration, Instant};

/// A rendition that has sent nothing for this long is silent: Auto falls to
/// the best one still flowing (simulcast encoders drop their top layer
/// when their bandwidth estimate falls) and moves back when it returns.
pub const STALL: Duration = Duration::from_secs(1);
/// How often a viewer off its preferred rendition looks whether it flows
/// again (one registry lookup per rendition).
const RECHECK: Duration = Duration::from_millis(500);
/// How long a switch waits for its keyframe before asking again.
pub const ASK_AGAIN: Duration = Duration::from_secs(1);
/// A keyframe of the new rendition may be this much older (ingest time)
/// than the last frame sent: layers of one picture arrive a few ms apart.
/// Older ones (the replay of a feed's cached group) would show the viewer
/// a jump back in time.
const SLACK_US: u64 = 100_000;
/// The new rendition's own timestamps are kept when they fall within this
/// of the wall-clock prediction (renditions of one stream share its
/// timeline; keeping them keeps A/V sync exact); otherwise the prediction
/// is used (a rendition re-based on its own, e.g. after a takeover).
const KEEP_TIMELINE_US: u64 = 500_000;

/// What a viewer asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The server chooses: the ABR controller's pick when there is one,
    /// else the default rendition, falling back while it is silent.
    Auto,
    /// This rendition, by name.
    Fixed(String),
    /// No video at all.
    AudioOnly,
}

/// One rendition as a viewer may get it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rung {
    /// What viewers pick it by.
    pub name: String,
    /// Its video track.
    pub track: String,
    /// Nominal bitrate, kbit/s (0 unknown).
    pub bitrate_kbps: u32,
    /// Picture size, 0 unknown.
    pub width: u32,
    /// Picture size, 0 unknown.
    pub height: u32,
    /// Frames per second, 0 unknown.
    pub framerate: u32,
}

/// Where a frame came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The rendition being sent.
    Current,
    /// The one being switched to.
    Pending,
}

/// One frame as the switch sees it.
#[derive(Clone, Copy, Debug)]
pub struct In {
    /// Timestamp on its feed's edge timeline (track clock).
    pub ts: u64,
    /// Its feed's wall clock for `ts` (sender reports).
    pub wallclock: Instant,
    /// Ingest wall clock, µs.
    pub ingest_us: u64,
    /// A keyframe.
    pub keyframe: bool,
}

/// What to do with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send it with this timestamp (before the viewer's random offset) and
    /// wall clock.
    Send(u64, Instant),
    /// The pending rendition's keyframe: it becomes the current one (drop
    /// the old feed), then send it like [`Verdict::Send`].
    SwitchAndSend(u64, Instant),
    /// Not for the viewer.
    Drop,
}

/// What the shell should do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Join this rung's feed as the pending rendition (live frames only)
    /// and ask upstream for a keyframe; drop any other pending one.
    Join(usize),
    /// Drop the pending feed.
    Leave,
    /// Ask the pending rendition's feed for a keyframe again: the switch
    /// has waited [`ASK_AGAIN`] for one (a publisher may drop a request —
    /// Chromium ignores one that comes within 300 ms of another for any of
    /// its simulcast layers — and sends none unasked).
    AskAgain,
    /// Audio only: drop the current feed as well.
    StopVideo,
}

/// Which way a switch went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// To a better rendition (or from audio only).
    Up,
    /// To a lower one (or to audio only).
    Down,
}

/// A viewer's rendition state.
#[derive(Debug)]
pub struct Switch {
    ladder: Vec<Rung>,
    clock: u64,
    target: Target,
    /// Auto mode: the controller's pick (rung index), else the default.
    auto_pick: Option<usize>,
    /// Auto mode: the controller found the link below the lowest rendition;
    /// video pauses until it says otherwise.
    auto_audio_only: bool,
    current: Option<usize>,
    pending: Option<usize>,
    /// When the pending rendition's keyframe was last asked for.
    asked: Option<Instant>,
    /// `out ts = feed ts + offset` for the current rendition.
    offset: i128,
    /// `out wall clock = feed wall clock + wall_shift` (µs, signed).
    wall_shift: i128,
    /// The last frame sent: out ts, ingest µs, out wall clock.
    last: Option<(u64, u64, Instant)>,
    /// When the current rendition last delivered a frame.
    heard: Option<Instant>,
    last_check: Option<Instant>,
    switched: Option<(Direction, Option<String>)>,
}

impl Switch {
    /// A viewer of `ladder` (best first) on a `clock` Hz track, in Auto
    /// mode, starting on the default rendition (the [`VIDEO`] track, else the
    /// best). Auto prefers the best one: normally the default.
    ///
    /// [`VIDEO`]: cascade_origin::catalog::VIDEO
    pub fn new(ladder: Vec<Rung>, clock: u32) -> Self {
        let start = ladder
            .iter()
            .position(|r| r.track == cascade_origin::catalog::VIDEO)
            .unwrap_or(0);
        Self {
            ladder,
            clock: u64::from(clock.max(1)),
            target: Target::Auto,
            auto_pick: None,
            auto_audio_only: false,
            current: Some(start),
            pending: None,
            asked: None,
            offset: 0,
            wall_shift: 0,
            last: None,
            heard: None,
            last_check: None,
            switched: None,
        }
    }

    /// Starts on rung `i` instead of the default (before any frame was
    /// sent: the shell joined that rendition's feed first).
    pub fn start_at(&mut self, i: usize) {
        if i < self.ladder.len() && self.last.is_none() {
            self.current = Some(i);
        }
    }

    /// The index of the rendition being sent.
    pub fn current_index(&self) -> Option<usize> {
        self.current
    }

    /// The renditions, best first.
    pub fn renditions(&self) -> &[Rung] {
        &self.ladder
    }

    /// What the viewer asked for.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The rendition being sent (`None`: audio only, or nothing yet).
    pub fn current(&self) -> Option<&Rung> {
        self.current.and_then(|i| self.ladder.get(i))
    }

    /// The rendition being switched to.
    pub fn pending(&self) -> Option<&Rung> {
        self.pending.and_then(|i| self.ladder.get(i))
    }

    /// A new ladder (a rendition was added): the current and pending
    /// renditions keep their place by track; a pending one that is gone is
    /// dropped (the shell then leaves its feed), a fixed target that is
    /// gone becomes Auto.
    pub fn set_ladder(&mut self, ladder: Vec<Rung>) {
        let track_of =
            |i: Option<usize>| i.and_then(|i| self.ladder.get(i)).map(|r| r.track.clone());
        let (current, pending) = (track_of(self.current), track_of(self.pending));
        let pick = self
            .auto_pick
            .and_then(|i| self.ladder.get(i))
            .map(|r| r.name.clone());
        let find = |t: &Option<String>| {
            t.as_ref()
                .and_then(|t| ladder.iter().position(|r| &r.track == t))
        };
        // The current track cannot leave a live stream's catalog (tracks
        // are only added); should it, the default one is the safe place.
        self.current = find(&current).or_else(|| {
            current.as_ref().map(|_| {
                ladder
                    .iter()
                    .position(|r| r.track == cascade_origin::catalog::VIDEO)
                    .unwrap_or(0)
            })
        });
        self.pending = find(&pending);
        self.auto_pick = pick.and_then(|n| ladder.iter().position(|r| r.name == n));
        if let Target::Fixed(name) = &self.target {
            if !ladder.iter().any(|r| &r.name == name) {
                self.target = Target::Auto;
            }
        }
        self.ladder = ladder;
        // Re-decide now rather than at the next RECHECK.
        self.last_check = None;
    }

    /// Sets the target; false (and unchanged) for an unknown name.
    pub fn set_target(&mut self, target: Target) -> bool {
        if let Target::Fixed(name) = &target {
            if self.index(name).is_none() {
                return false;
            }
        }
        self.target = target;
        true
    }

    /// The ABR controller's choice in Auto mode (`None`: the default).
    pub fn set_auto_pick(&mut self, name: Option<&str>) {
        self.auto_pick = name.and_then(|n| self.index(n));
        self.auto_audio_only = false;
    }

    /// The ABR controller's choice in Auto mode: no video at all (the link
    /// carries less than the lowest rendition). [`Switch::set_auto_pick`]
    /// brings video back.
    pub fn set_auto_audio_only(&mut self) {
        self.auto_audio_only = true;
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.ladder.iter().position(|r| r.name == name)
    }

    /// The pending rendition could not be joined (it ended): forget it; the
    /// next [`Switch::poll`] decides again.
    pub fn cancel_pending(&mut self) {
        self.pending = None;
    }

    /// The switch the last [`Switch::on_frame`] made, once: its direction and
    /// the new rendition (`None`: audio only).
    pub fn take_switch(&mut self) -> Option<(Direction, Option<String>)> {
        self.switched.take()
    }

    /// True when the current rendition has been silent for [`STALL`].
    fn silent(&self, now: Instant) -> bool {
        match (self.current, self.heard) {
            (Some(_), Some(at)) => now.saturating_duration_since(at) >= STALL,
            // Nothing heard yet: the viewer just joined; the feed's cached
            // group or the next keyframe is on its way.
            _ => false,
        }
    }

    /// What the viewer should get now. `flowing(i)` says whether rung `i`
    /// delivered a frame within [`STALL`] (a registry lookup: asked only
    /// when the current rendition is silent or the viewer is off its
    /// preferred one).
    fn wanted(&mut self, now: Instant, flowing: &mut dyn FnMut(&Rung) -> bool) -> Option<usize> {
        let preferred = match &self.target {
            Target::AudioOnly => return None,
            Target::Fixed(name) => return self.index(name),
            Target::Auto if self.auto_audio_only => return None,
            Target::Auto => self.auto_pick.unwrap_or(0),
        };
        let current_ok = self.current.is_some() && !self.silent(now);
        if self.current == Some(preferred) && current_ok {
            return Some(preferred);
        }
        // Off the preferred rendition, or it went silent: look (at most
        // every RECHECK) for the best flowing one at or below it.
        let due = self
            .last_check
            .is_none_or(|t| now.saturating_duration_since(t) >= RECHECK);
        if !due {
            return self.pending.or(self.current);
        }
        self.last_check = Some(now);
        let ladder = &self.ladder;
        let best = (preferred..ladder.len()).find(|&i| {
            if Some(i) == self.current && current_ok {
                return true;
            }
            ladder.get(i).is_some_and(&mut *flowing)
        });
        // Nothing flows: stay where we are (a stalled publisher).
        best.or(self.current)
    }

    /// What the shell should do now, if anything.
    pub fn poll(
        &mut self,
        now: Instant,
        flowing: &mut dyn FnMut(&Rung) -> bool,
    ) -> Option<Command> {
        let wanted = self.wanted(now, flowing);
        match wanted {
            None => {
                if self.current.is_some() || self.pending.is_some() {
                    let from = self.current.take();
                    self.pending = None;
                    self.heard = None;
                    if from.is_some() {
                        self.switched = Some((Direction::Down, None));
                    }
                    return Some(Command::StopVideo);
                }
                None
            }
            Some(w) if Some(w) == self.current => {
                // Back on (or never off) the current one: cancel a pending switch.
                self.pending.take().map(|_| Command::Leave)
            }
            Some(w) if Some(w) == self.pending => {
                let due = self
                    .asked
                    .is_none_or(|t| now.saturating_duration_since(t) >= ASK_AGAIN);
                due.then(|| {
                    self.asked = Some(now);
                    Command::AskAgain
                })
            }
            Some(w) => {
                self.pending = Some(w);
                self.asked = Some(now);
                Some(Command::Join(w))
            }
        }
    }

    /// A frame from the current or the pending rendition.
    pub fn on_frame(&mut self, now: Instant, from: Source, f: In) -> Verdict {
        match from {
            Source::Current => {
                if self.current.is_none() {
                    return Verdict::Drop;
                }
                self.heard = Some(now);
                let (ts, wall) = self.map(f);
                self.last = Some((ts, f.ingest_us, wall));
                Verdict::Send(ts, wall)
            }
            Source::Pending => {
                let Some(to) = self.pending else {
                    return Verdict::Drop;
                };
                if !f.keyframe {
                    return Verdict::Drop;
                }
                if let Some((_, last_us, _)) = self.last {
                    if f.ingest_us.saturating_add(SLACK_US) < last_us {
                        return Verdict::Drop;
                    }
                }
                self.rebase(f);
                let direction = match self.current {
                    Some(c) if c < to => Direction::Down,
                    _ => Direction::Up,
                };
                self.current = Some(to);
                self.pending = None;
                self.heard = Some(now);
                self.switched = Some((direction, self.ladder.get(to).map(|r| r.name.clone())));
                let (ts, wall) = self.map(f);
                self.last = Some((ts, f.ingest_us, wall));
                Verdict::SwitchAndSend(ts, wall)
            }
        }
    }

    fn map(&self, f: In) -> (u64, Instant) {
        let ts = u64::try_from((i128::from(f.ts) + self.offset).max(0)).unwrap_or(0);
        (ts, shift(f.wallclock, self.wall_shift))
    }

    /// New offsets for a keyframe of another rendition, continuing after
    /// the last frame sent.
    fn rebase(&mut self, f: In) {
        let Some((last_ts, last_us, last_wall)) = self.last else {
            // Nothing sent yet: its own timeline as it is.
            self.offset = 0;
            self.wall_shift = 0;
            return;
        };
        let clock = i128::from(self.clock);
        let elapsed_us = i128::from(f.ingest_us) - i128::from(last_us);
        let predicted = i128::from(last_ts) + (elapsed_us * clock / 1_000_000).max(1);
        let own = i128::from(f.ts) + self.offset;
        let tolerance = i128::from(KEEP_TIMELINE_US) * clock / 1_000_000;
        let out = if own > i128::from(last_ts) && (own - predicted).abs() <= tolerance {
            own
        } else {
            predicted.max(i128::from(last_ts) + 1)
        };
        self.offset = out - i128::from(f.ts);
        // The out wall clock continues the last frame's by the ts step.
        let step_us = (out - i128::from(last_ts)) * 1_000_000 / clock;
        let wall = shift(last_wall, step_us);
        self.wall_shift = signed_us(wall, f.wallclock);
    }
}

/// `at` moved by `us` (signed), saturating at what `Instant` can hold.
fn shift(at: Instant, us: i128) -> Instant {
    let d = Duration::from_micros(u64::try_from(us.unsigned_abs()).unwrap_or(u64::MAX));
    if us >= 0 {
        at.checked_add(d).unwrap_or(at)
    } else {
        at.checked_sub(d).unwrap_or(at)
    }
}

/// `a − b` in µs, signed.
fn signed_us(a: Instant, b: Instant) -> i128 {
    match a.checked_duration_since(b) {
        Some(d) => i128::try_from(d.as_micros()).unwrap_or(i128::MAX),
        None => -i128::try_from(b.duration_since(a).as_micros()).unwrap_or(i128::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLOCK: u32 = 90_000;
    const FRAME_TS: u64 = 3600;
    const FRAME_US: u64 = 40_000;

    fn ladder() -> Vec<Rung> {
        ["f", "h", "q"]
            .iter()
            .enumerate()
            .map(|(i, n)| Rung {
                name: n.to_string(),
                track: if i == 0 {
                    "video".into()
                } else {
                    format!("video-{n}")
                },
                bitrate_kbps: 2500 >> (2 * i),
                width: 1280 >> i,
                height: 720 >> i,
                framerate: 30,
            })
            .collect()
    }

    /// Frame `k` of a rendition whose feed timeline sits `skew` ticks off.
    fn frame(t0: Instant, k: u64, skew: i64, keyframe: bool) -> In {
        let ts = (k * FRAME_TS).saturating_add_signed(skew);
        In {
            ts,
            wallclock: t0 + Duration::from_micros(ts * 1_000_000 / 90_000),
            ingest_us: 1_000_000_000 + k * FRAME_US,
            keyframe,
        }
    }

    fn at(t0: Instant, k: u64) -> Instant {
        t0 + Duration::from_micros(k * FRAME_US)
    }

    fn sent(v: Verdict) -> Option<(u64, Instant)> {
        match v {
            Verdict::Send(ts, w) | Verdict::SwitchAndSend(ts, w) => Some((ts, w)),
            Verdict::Drop => None,
        }
    }

    fn all_flow(_: &Rung) -> bool {
        true
    }

    #[test]
    fn manual_switch_waits_for_a_keyframe_and_stays_continuous() {
        let t0 = Instant::now();
        let mut s = Switch::new(ladder(), CLOCK);
        let mut out = Vec::new();
        for k in 0..10 {
            out.push(
                sent(s.on_frame(at(t0, k), Source::Current, frame(t0, k, 0, k == 0))).unwrap(),
            );
        }
        assert_eq!(
            s.poll(at(t0, 10), &mut all_flow),
            None,
            "auto, on the default"
        );
        assert!(s.set_target(Target::Fixed("q".into())));
        assert!(
            !s.set_target(Target::Fixed("x".into())),
            "unknown name refused"
        );
        assert_eq!(s.poll(at(t0, 10), &mut all_flow), Some(Command::Join(2)));
        assert_eq!(s.pending().map(|r| r.name.as_str()), Some("q"));
        // The low rendition's timeline sits 45 ms off (its first frame
        // arrived later); its delta frames are not sent, the current keeps
        // playing until q's keyframe.
        for k in 10..15 {
            assert_eq!(
                s.on_frame(at(t0, k), Source::Pending, frame(t0, k, 4050, false)),
                Verdict::Drop
            );
            out.push(sent(s.on_frame(at(t0, k), Source::Current, frame(t0, k, 0, false))).unwrap());
        }
        let v = s.on_frame(at(t0, 15), Source::Pending, frame(t0, 15, 4050, true));
        let Verdict::SwitchAndSend(ts, _) = v else {
            panic!("switch at the keyframe: {v:?}");
        };
        out.push((ts, t0));
        assert_eq!(s.take_switch(), Some((Direction::Down, Some("q".into()))));
        assert_eq!(s.current().map(|r| r.name.as_str()), Some("q"));
        // Same stream timeline: q's own timestamps are kept (A/V sync).
        assert_eq!(ts, 15 * FRAME_TS + 4050);
        // The old feed's frames are dropped from now on; q's continue.
        assert_eq!(s.poll(at(t0, 16), &mut all_flow), None);
        let next =
            sent(s.on_frame(at(t0, 16), Source::Current, frame(t0, 16, 4050, false))).unwrap();
        assert_eq!(next.0, 16 * FRAME_TS + 4050);
        assert!(out.windows(2).all(|w| w[1].0 > w[0].0), "never backwards");
    }

    #[test]
    fn a_rendition_on_another_timeline_continues_by_wall_time() {
        let t0 = Instant::now();
        let mut s = Switch::new(ladder(), CLOCK);
        for k in 0..5 {
            s.on_frame(at(t0, k), Source::Current, frame(t0, k, 0, k == 0));
        }
        let (last_ts, _, last_wall) = s.last.unwrap();
        s.set_target(Target::Fixed("h".into()));
        assert_eq!(s.poll(at(t0, 5), &mut all_flow), Some(Command::Join(1)));
        // h was re-based far away (10 s ahead): its timestamps are not
        // kept, the switch continues one frame interval after the last.
        let v = s.on_frame(at(t0, 5), Source::Pending, frame(t0, 5, 900_000, true));
        let Verdict::SwitchAndSend(ts, wall) = v else {
            panic!("{v:?}")
        };
        assert_eq!(ts, last_ts + FRAME_TS, "one frame later by ingest time");
        let step = wall.duration_since(last_wall);
        assert_eq!(step.as_micros(), 40_000);
        // And the next frame of h follows on from it.
        let next =
            sent(s.on_frame(at(t0, 6), Source::Current, frame(t0, 6, 900_000, false))).unwrap();
        assert_eq!(next.0, ts + FRAME_TS);
        assert_eq!(next.1.duration_since(wall).as_micros(), 40_000);
    }

    #[test]
    fn stale_keyframes_of_the_new_rendition_are_not_used() {
        // A feed just started replays its cached group: its keyframe is a
        // GOP old. Switching on it would show the viewer the past.
        let t0 = Instant::now();
        let mut s = Switch::new(ladder(), CLOCK);
        for k in 0..90 {
            s.on_frame(at(t0, k), Source::Current, frame(t0, k, 0, k == 0));
        }
        s.set_target(Target::Fixed("h".into()));
        s.poll(at(t0, 90), &mut all_flow);
        for k in 30..35 {
            assert_eq!(
                s.on_frame(at(t0, 90), Source::Pending, frame(t0, k, 0, k == 30)),
                Verdict::Drop
            );
        }
        assert!(matches!(
            s.on_frame(at(t0, 91), Source::Pending, frame(t0, 91, 0, true)),
            Verdict::SwitchAndSend(..)
        ));
    }

    #[test]
    fn auto_falls_back_when_the_default_goes_silent_and_returns() {
        let t0 = Instant::now();
        let mut s = Switch::new(ladder(), CLOCK);
        for k in 0..10 {
            s.on_frame(at(t0, k), Source::Current, frame(t0, k, 0, k == 0));
        }
        // The top layer stops. Within STALL nothing happens and nothing is
        // looked up.
        let looked = std::cell::Cell::new(0);
        let mut f_stopped = |r: &Rung| {
            looked.set(looked.get() + 1);
            r.name != "f"
        };
        assert_eq!(s.poll(at(t0, 30), &mut f_stopped), None);
        assert_eq!(looked.get(), 0);
        // After a second of silence: the best flowing one.
        let later = at(t0, 9) + STALL;
        assert_eq!(s.poll(later, &mut f_stopped), Some(Command::Join(1)));
        let k = 40;
        let v = s.on_frame(later, Source::Pending, frame(t0, k, 0, true));
        assert!(matches!(v, Verdict::SwitchAndSend(ts, _) if ts == k * FRAME_TS));
        assert_eq!(s.take_switch(), Some((Direction::Down, Some("h".into()))));
        // While f is silent, h stays; looked up at most every RECHECK.
        let mut t = later;
        for k in 41..50 {
            t = at(t0, k) + STALL;
            s.on_frame(t, Source::Current, frame(t0, k, 0, false));
            assert_eq!(s.poll(t, &mut |r: &Rung| r.name != "f"), None);
        }
        // f returns: join it, switch at its keyframe (up).
        t += RECHECK;
        assert_eq!(s.poll(t, &mut all_flow), Some(Command::Join(0)));
        s.on_frame(t, Source::Current, frame(t0, 50, 0, false));
        assert!(matches!(
            s.on_frame(t, Source::Pending, frame(t0, 51, 0, true)),
            Verdict::SwitchAndSend(..)
        ));
        assert_eq!(s.take_switch(), Some((Direction::Up, Some("f".into()))));
        assert_eq!(s.current().map(|r| r.name.as_str()), Some("f"));
    }

    #[test]
    fn a_switch_waiting_for_its_keyframe_asks_again_each_second() {
        // The publisher dropped the first request (Chromium ignores one
        // within 300 ms of another): without asking again the viewer would
        // wait on the old rendition for good.
        let t0 = Instant::now();
        let mut s = Switch::new(ladder(), CLOCK);
        s.on_frame(t0, Source::Current, frame(t0, 0, 0, true));
        s.set_target(Target::Fixed("q".into()));
        assert_eq!(s.poll(t0, &mut all_flow), Some(Command::Join(2)));
        let mut t = t0;
        let mut asked = 0;
        for k in 1..=60 {
            t = at(t0, k);
            s.on_frame(t, Source::Current, frame(t0, k, 0, false));
            // q's frames without a keyframe do not switch.
            let v = s.on_frame(t, Source::Pending, frame(t0, k, 0, false));
            assert_eq!(v, Verdict::Drop);
            match s.poll(t, &mut all_flow) {
                Some(Command::AskAgain) => asked += 1,
                None => {}
                other => panic!("{other:?} at frame {k}"),
            }
        }
        // 60 frames of 40 ms: 2.4 s, asked again at 1 s and 2 s.
        assert_eq!(asked, 2);
        assert!(matches!(
            s.on_frame(t, Source::Pending, frame(t0, 61, 0, true)),
            Verdict::SwitchAndSend(..)
        ));
        // Switched: nothing more to ask.
        assert_eq!(s.poll(t + ASK_AGAIN * 3, &mut all_flow), None);
    }

    #[test]
    fn nothing_flowing_keeps_the_current_and_pending_can_be_cancelled() {
        let t0 = Instant::now();
        let mut s = Switch::new(ladder(), CLOCK);
        s.on_frame(t0, Source::Current, frame(t0, 0, 0, true));
        let later = t0 + STALL * 2;
        assert_eq!(s.poll(later, &mut |_: &Rung| false), None);
        // A manual pick, then back to auto before its keyframe came.
        s.set_target(Target::Fixed("q".into()));
        assert_eq!(s.poll(later, &mut all_flow), Some(Command::Join(2)));
        s.set_target(Target::Auto);
        s.on_frame(later, Source::Current, frame(t0, 60, 0, false));
        assert_eq!(s.poll(later, &mut all_flow), Some(Command::Leave));
        assert!(s.pending().is_none());
        assert_eq!(
            s.on_frame(later, Source::Pending, frame(t0, 61, 0, true)),
            Verdict::Drop
        );
    }

    #[test]
    fn audio_only_stops_video_and_resumes_at_a_keyframe() {
        let t0 = Instant::now();
        let mut s = Switch::new(ladder(), CLOCK);
        for k in 0..5 {
            s.on_frame(at(t0, k), Source::Current, frame(t0, k, 0, k == 0));
        }
        s.set_target(Target::AudioOnly);
        assert_eq!(s.poll(at(t0, 5), &mut all_flow), Some(Command::StopVideo));
        assert_eq!(s.take_switch(), Some((Direction::Down, None)));
        assert!(s.current().is_none());
        assert_eq!(
            s.on_frame(at(t0, 5), Source::Current, frame(t0, 5, 0, false)),
            Verdict::Drop
        );
        assert_eq!(s.poll(at(t0, 6), &mut all_flow), None);
        // Back to auto, 3 s later: the default at its next keyframe, its
        // timestamps jump forward only.
        s.set_target(Target::Auto);
        assert_eq!(s.poll(at(t0, 95), &mut all_flow), Some(Command::Join(0)));
        assert_eq!(
            s.on_frame(at(t0, 95), Source::Pending, frame(t0, 95, 0, false)),
            Verdict::Drop
        );
        let v = s.on_frame(at(t0, 96), Source::Pending, frame(t0, 96, 0, true));
        assert_eq!(sent(v).map(|x| x.0), Some(96 * FRAME_TS));
        assert_eq!(s.take_switch(), Some((Direction::Up, Some("f".into()))));
    }

    #[test]
    fn a_better_rendition_than_the_default_is_auto_s_choice() {
        // A layer that started after go-live is bigger than `video`: the
        // viewer starts on `video` and Auto moves it up.
        let mut l = ladder();
        l[0].track = "video-f".into();
        l[1].track = "video".into();
        let t0 = Instant::now();
        let mut s = Switch::new(l, CLOCK);
        assert_eq!(s.current().map(|r| r.name.as_str()), Some("h"));
        s.on_frame(t0, Source::Current, frame(t0, 0, 0, true));
        assert_eq!(s.poll(t0, &mut all_flow), Some(Command::Join(0)));
        let v = s.on_frame(at(t0, 3), Source::Pending, frame(t0, 3, 0, true));
        assert!(matches!(v, Verdict::SwitchAndSend(..)));
        assert_eq!(s.take_switch(), Some((Direction::Up, Some("f".into()))));
    }

    #[test]
    fn a_rendition_added_later_becomes_auto_s_choice() {
        // Live with h and q (`video` = h); f arrives later.
        let t0 = Instant::now();
        let mut two = ladder()[1..].to_vec();
        two[0].track = "video".into();
        let mut s = Switch::new(two, CLOCK);
        s.on_frame(t0, Source::Current, frame(t0, 0, 0, true));
        assert_eq!(s.poll(t0, &mut all_flow), None);
        let mut three = ladder();
        three[0].track = "video-f".into();
        three[1].track = "video".into();
        s.set_ladder(three);
        assert_eq!(s.current().map(|r| r.name.as_str()), Some("h"));
        assert_eq!(s.poll(at(t0, 1), &mut all_flow), Some(Command::Join(0)));
        assert_eq!(s.pending().map(|r| r.track.as_str()), Some("video-f"));
    }

    #[test]
    fn the_controllers_pick_is_the_auto_target() {
        let t0 = Instant::now();
        let mut s = Switch::new(ladder(), CLOCK);
        s.on_frame(t0, Source::Current, frame(t0, 0, 0, true));
        s.set_auto_pick(Some("h"));
        assert_eq!(s.poll(t0, &mut all_flow), Some(Command::Join(1)));
        s.set_auto_pick(None);
        s.on_frame(t0, Source::Current, frame(t0, 1, 0, false));
        assert_eq!(s.poll(t0 + RECHECK, &mut all_flow), Some(Command::Leave));
    }

    #[test]
    fn the_controller_may_pause_video_in_auto_and_bring_it_back() {
        let t0 = Instant::now();
        let mut s = Switch::new(ladder(), CLOCK);
        s.on_frame(t0, Source::Current, frame(t0, 0, 0, true));
        s.set_auto_audio_only();
        assert_eq!(s.poll(t0, &mut all_flow), Some(Command::StopVideo));
        assert!(s.current().is_none());
        assert_eq!(s.take_switch(), Some((Direction::Down, None)));
        // Still Auto: a manual choice is not what paused it.
        assert_eq!(s.target(), &Target::Auto);
        s.set_auto_pick(Some("q"));
        assert_eq!(s.poll(t0 + RECHECK, &mut all_flow), Some(Command::Join(2)));
    }
}
