//! The sans-IO state machine of one RTSP pull: when to connect, how long
//! each RTSP step may take, when a connection counts as stalled, how long to
//! back off, when an on-demand pull disconnects and when the stream is
//! unpublished. No sockets, no clock: every input carries `now`; the shell
//! (`rtsp/shell.rs`) performs the [`Action`]s and calls back at
//! [`Pull::poll_timeout`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// First retry delay after a failure.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest retry delay: doubling stops here (1, 2, 4, 8, 16, 30 s).
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// DESCRIBE, SETUP and PLAY must each answer within this, and the first
/// frame must follow PLAY within it.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// No frame for this long on a live connection: the camera stalled.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that delivered frames this long resets the backoff, so a
/// camera that reboots once a day reconnects after 1 s, while one that
/// drops every few seconds is not hammered.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// The stream stays published (viewers keep their sessions) this long
/// after the last frame while the pull reconnects; then it ends.
pub const HOLD: Duration = Duration::from_secs(30);
/// On-demand: a viewer's request keeps the pull wanted this long while it
/// waits for the stream to go live (the subscribe waits as long).
pub const START_WAIT: Duration = Duration::from_secs(10);
/// On-demand default: disconnect this long after the last viewer left.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// What `/api/pulls` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Not connected and not trying (on demand, no viewer).
    Idle,
    /// Connecting: DESCRIBE, SETUP, PLAY, waiting for the first frame.
    Connecting,
    /// Frames are flowing.
    Live,
    /// The last attempt failed; a retry is scheduled.
    Error,
}

impl State {
    /// The lowercase word of INTERFACE.md.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Connecting => "connecting",
            Self::Live => "live",
            Self::Error => "error",
        }
    }
}

/// How far a connection attempt got, reported by the shell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// DESCRIBE answered with a usable presentation.
    Described,
    /// Every chosen stream is SET UP.
    SetUp,
    /// PLAY answered.
    Playing,
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start a new connection attempt (attempt id to tag its reports).
    Connect(u64),
    /// Drop the current connection (if any).
    Disconnect,
    /// End the published stream (its viewers end too).
    Unpublish,
}

/// Where the connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// No connection; maybe a retry at `retry_at`.
    Down,
    /// Waiting for `next` until `deadline`.
    Step {
        next: &'static str,
        deadline: Instant,
    },
    /// Frames flowing; the last one at `last_frame`.
    Live { since: Instant, last_frame: Instant },
}

/// One pull's state machine.
#[derive(Debug)]
pub struct Pull {
    on_demand: bool,
    grace: Duration,
    phase: Phase,
    state: State,
    error: Option<String>,
    backoff: Duration,
    retry_at: Option<Instant>,
    attempt: u64,
    /// On demand: a viewer asked (or is waiting) until then.
    wanted_until: Option<Instant>,
    /// On demand: the last time a reader was counted.
    last_reader: Option<Instant>,
    /// The stream is published (the shell owns the publisher).
    published: bool,
    /// The last frame ever (for [`HOLD`]).
    last_frame: Option<Instant>,
    reconnects: u64,
    actions: VecDeque<Action>,
}

impl Pull {
    /// A pull; always-on pulls connect at once.
    pub fn new(now: Instant, on_demand: bool, grace: Duration) -> Self {
        let mut p = Self {
            on_demand,
            grace,
            phase: Phase::Down,
            state: State::Idle,
            error: None,
            backoff: BACKOFF_MIN,
            retry_at: None,
            attempt: 0,
            wanted_until: None,
            last_reader: None,
            published: false,
            last_frame: None,
            reconnects: 0,
            actions: VecDeque::new(),
        };
        if !on_demand {
            p.connect(now);
        }
        p
    }

    /// The state for the API.
    pub fn state(&self) -> State {
        self.state
    }

    /// The last error, kept until the pull goes live again.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Connection attempts made after a failure (for the reconnect counter).
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// The id of the current attempt: reports tagged otherwise are stale.
    pub fn attempt(&self) -> u64 {
        self.attempt
    }

    /// A viewer asked for the stream (a registry miss). Starts an idle
    /// on-demand pull; a pull in backoff keeps its schedule.
    pub fn request(&mut self, now: Instant) {
        if !self.on_demand {
            return;
        }
        self.wanted_until = Some(now + START_WAIT);
        self.last_reader = Some(now);
        if self.state == State::Idle {
            self.backoff = BACKOFF_MIN;
            self.connect(now);
        }
    }

    /// The shell's periodic count of the stream's readers (viewers and relay
    /// subscribers). On demand, no reader for `grace` disconnects.
    pub fn handle_readers(&mut self, now: Instant, readers: usize) {
        if readers > 0 {
            self.last_reader = Some(now);
        }
        self.check_idle(now);
    }

    /// The connection progressed. Reports of an old attempt are ignored.
    pub fn handle_step(&mut self, now: Instant, attempt: u64, step: Step) {
        if attempt != self.attempt || !matches!(self.phase, Phase::Step { .. }) {
            return;
        }
        let next = match step {
            Step::Described => "SETUP",
            Step::SetUp => "PLAY",
            Step::Playing => "the first frame",
        };
        self.phase = Phase::Step {
            next,
            deadline: now + STEP_TIMEOUT,
        };
    }

    /// The connection delivered a frame (the shell may batch: `now` is the
    /// time of the newest). The first one makes the pull live.
    pub fn handle_frame(&mut self, now: Instant, attempt: u64) {
        if attempt != self.attempt {
            return;
        }
        self.last_frame = Some(now);
        match &mut self.phase {
            Phase::Live { since, last_frame } => {
                *last_frame = now;
                if now.saturating_duration_since(*since) >= HEALTHY_AFTER {
                    self.backoff = BACKOFF_MIN;
                }
            }
            Phase::Step { .. } => {
                self.phase = Phase::Live {
                    since: now,
                    last_frame: now,
                };
                self.state = State::Live;
                self.error = None;
                self.published = true;
                // The waiting viewers subscribe now; from here the readers
                // count, and `grace` runs from the last one.
                if self.wanted_until.take().is_some() {
                    self.last_reader = Some(now);
                }
            }
            Phase::Down => {}
        }
    }

    /// The connection failed (RTSP error, refused, closed, bad media).
    pub fn handle_error(&mut self, now: Instant, attempt: u64, error: String) {
        if attempt != self.attempt || self.phase == Phase::Down {
            return;
        }
        self.fail(now, error);
    }

    /// Deadlines: step timeouts, stalls, retries, on-demand grace, hold.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::Step { next, deadline } if now >= deadline => {
                let secs = STEP_TIMEOUT.as_secs();
                self.fail(now, format!("timeout: no answer to {next} within {secs} s"));
            }
            Phase::Live { last_frame, .. } if now >= last_frame + STALL_TIMEOUT => {
                let secs = STALL_TIMEOUT.as_secs();
                self.fail(now, format!("stalled: no frame for {secs} s"));
            }
            Phase::Down if self.retry_at.is_some_and(|t| now >= t) => {
                self.retry_at = None;
                self.reconnects += 1;
                self.connect(now);
            }
            _ => {}
        }
        self.check_idle(now);
        if self.published
            && self.state != State::Live
            && self.last_frame.is_some_and(|t| now >= t + HOLD)
        {
            self.published = false;
            self.actions.push_back(Action::Unpublish);
        }
    }

    /// The next thing for the shell to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When to call [`Pull::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let phase = match self.phase {
            Phase::Step { deadline, .. } => Some(deadline),
            Phase::Live { last_frame, .. } => Some(last_frame + STALL_TIMEOUT),
            Phase::Down => self.retry_at,
        };
        let hold = (self.published && self.state != State::Live)
            .then_some(self.last_frame)
            .flatten()
            .map(|t| t + HOLD);
        let idle = self.idle_deadline();
        [phase, hold, idle].into_iter().flatten().min()
    }

    /// On demand and not idle: when the pull will disconnect for lack of
    /// readers (the shell counts readers every second, which moves it).
    fn idle_deadline(&self) -> Option<Instant> {
        if !self.on_demand || self.state == State::Idle {
            return None;
        }
        let last = self.last_reader?;
        let wanted = self.wanted_until.unwrap_or(last);
        Some((last + self.grace).max(wanted))
    }

    fn check_idle(&mut self, now: Instant) {
        if self.idle_deadline().is_some_and(|t| now >= t) {
            self.go_idle();
        }
    }

    /// On demand, nobody watching: disconnect, unpublish, stop retrying.
    fn go_idle(&mut self) {
        if self.phase != Phase::Down {
            self.actions.push_back(Action::Disconnect);
        }
        if self.published {
            self.published = false;
            self.actions.push_back(Action::Unpublish);
        }
        self.phase = Phase::Down;
        self.state = State::Idle;
        self.retry_at = None;
        self.wanted_until = None;
        self.backoff = BACKOFF_MIN;
    }

    fn connect(&mut self, now: Instant) {
        self.attempt += 1;
        self.phase = Phase::Step {
            next: "DESCRIBE",
            deadline: now + STEP_TIMEOUT,
        };
        // A live stream being reconnected stays "error" (with its reason)
        // until frames flow again; a first attempt shows "connecting".
        if self.error.is_none() {
            self.state = State::Connecting;
        }
        self.actions.push_back(Action::Connect(self.attempt));
    }

    fn fail(&mut self, now: Instant, error: String) {
        self.actions.push_back(Action::Disconnect);
        self.phase = Phase::Down;
        self.state = State::Error;
        self.error = Some(error);
        self.retry_at = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn drain(p: &mut Pull) -> Vec<Action> {
        std::iter::from_fn(|| p.poll_action()).collect()
    }

    /// Runs timeouts up to `until` the way the shell does.
    fn run_until(p: &mut Pull, until: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        while let Some(t) = p.poll_timeout().filter(|t| *t <= until) {
            p.handle_timeout(t);
            out.extend(drain(p));
        }
        out
    }

    #[test]
    fn always_on_connects_and_goes_live_on_the_first_frame() {
        let t0 = Instant::now();
        let mut p = Pull::new(t0, false, DEFAULT_GRACE);
        assert_eq!(drain(&mut p), vec![Action::Connect(1)]);
        assert_eq!(p.state(), State::Connecting);
        p.handle_step(t0 + s(1), 1, Step::Described);
        p.handle_step(t0 + s(2), 1, Step::SetUp);
        p.handle_step(t0 + s(3), 1, Step::Playing);
        assert_eq!(p.state(), State::Connecting);
        p.handle_frame(t0 + s(3), 1);
        assert_eq!((p.state(), p.error()), (State::Live, None));
        assert_eq!(p.poll_timeout(), Some(t0 + s(3) + STALL_TIMEOUT));
    }

    #[test]
    fn each_step_has_its_own_deadline() {
        let t0 = Instant::now();
        let mut p = Pull::new(t0, false, DEFAULT_GRACE);
        drain(&mut p);
        // DESCRIBE answered after 9 s: SETUP gets a fresh 10 s.
        p.handle_step(t0 + s(9), 1, Step::Described);
        assert!(run_until(&mut p, t0 + s(18)).is_empty());
        let a = run_until(&mut p, t0 + s(19));
        assert_eq!(a, vec![Action::Disconnect]);
        assert_eq!(p.state(), State::Error);
        assert_eq!(p.error(), Some("timeout: no answer to SETUP within 10 s"));
    }

    #[test]
    fn a_describe_that_never_ends_times_out_and_backs_off_doubling_to_30s() {
        let t0 = Instant::now();
        let mut p = Pull::new(t0, false, DEFAULT_GRACE);
        drain(&mut p);
        let mut connects = vec![t0];
        // Nothing ever answers: record when each attempt starts.
        while connects.len() < 9 {
            let now = p.poll_timeout().unwrap();
            p.handle_timeout(now);
            for a in drain(&mut p) {
                if let Action::Connect(_) = a {
                    connects.push(now);
                }
            }
        }
        let gaps: Vec<u64> = connects
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs() - STEP_TIMEOUT.as_secs())
            .collect();
        assert_eq!(gaps, vec![1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(p.reconnects(), 8);
        assert!(p.error().unwrap().contains("DESCRIBE"));
        assert_eq!(p.state(), State::Error, "stays error while retrying");
    }

    #[test]
    fn a_stall_is_an_error_and_reconnects_after_backoff() {
        let t0 = Instant::now();
        let mut p = Pull::new(t0, false, DEFAULT_GRACE);
        drain(&mut p);
        p.handle_step(t0, 1, Step::Described);
        p.handle_step(t0, 1, Step::SetUp);
        p.handle_step(t0, 1, Step::Playing);
        p.handle_frame(t0 + s(1), 1);
        p.handle_frame(t0 + s(4), 1);
        assert!(run_until(&mut p, t0 + s(8)).is_empty());
        assert_eq!(run_until(&mut p, t0 + s(9)), vec![Action::Disconnect]);
        assert_eq!(p.error(), Some("stalled: no frame for 5 s"));
        // 1 s later a new attempt; frames of the old one are ignored.
        assert_eq!(run_until(&mut p, t0 + s(10)), vec![Action::Connect(2)]);
        p.handle_frame(t0 + s(10), 1);
        assert_eq!(p.state(), State::Error);
        p.handle_step(t0 + s(10), 2, Step::Described);
        p.handle_step(t0 + s(10), 2, Step::SetUp);
        p.handle_step(t0 + s(10), 2, Step::Playing);
        p.handle_frame(t0 + s(11), 2);
        assert_eq!((p.state(), p.error()), (State::Live, None));
    }

    #[test]
    fn backoff_resets_after_a_healthy_connection_only() {
        let t0 = Instant::now();
        let mut p = Pull::new(t0, false, DEFAULT_GRACE);
        drain(&mut p);
        // Fail twice: backoff is now 4 s.
        p.handle_error(t0, 1, "refused".into());
        run_until(&mut p, t0 + s(1));
        p.handle_error(t0 + s(1), 2, "refused".into());
        run_until(&mut p, t0 + s(3));
        assert_eq!(p.attempt(), 3);
        p.handle_step(t0 + s(3), 3, Step::Playing);
        // Live 2 s then dropped: not healthy, next backoff is 4 s.
        p.handle_frame(t0 + s(3), 3);
        p.handle_frame(t0 + s(5), 3);
        p.handle_error(t0 + s(5), 3, "closed".into());
        assert_eq!(p.poll_timeout(), Some(t0 + s(9)));
        run_until(&mut p, t0 + s(9));
        // Live 12 s then dropped: healthy, next backoff is 1 s.
        p.handle_step(t0 + s(9), 4, Step::Playing);
        for i in 9..=21 {
            p.handle_frame(t0 + s(i), 4);
        }
        p.handle_error(t0 + s(21), 4, "closed".into());
        assert_eq!(p.poll_timeout(), Some(t0 + s(22)));
    }

    #[test]
    fn stale_reports_are_ignored() {
        let t0 = Instant::now();
        let mut p = Pull::new(t0, false, DEFAULT_GRACE);
        drain(&mut p);
        p.handle_error(t0, 7, "old".into());
        p.handle_step(t0, 7, Step::Playing);
        assert_eq!(p.state(), State::Connecting);
        assert!(drain(&mut p).is_empty());
    }

    #[test]
    fn the_stream_is_held_across_a_reconnect_then_unpublished() {
        let t0 = Instant::now();
        let mut p = Pull::new(t0, false, DEFAULT_GRACE);
        drain(&mut p);
        p.handle_step(t0, 1, Step::Playing);
        p.handle_frame(t0, 1);
        p.handle_error(t0, 1, "closed".into());
        // Retries keep failing; the stream stays published for HOLD.
        let mut unpublished = None;
        while unpublished.is_none() {
            let now = p.poll_timeout().unwrap();
            p.handle_timeout(now);
            for a in drain(&mut p) {
                match a {
                    Action::Unpublish => unpublished = Some(now),
                    Action::Connect(n) => p.handle_error(now, n, "refused".into()),
                    Action::Disconnect => {}
                }
            }
        }
        assert_eq!(unpublished, Some(t0 + HOLD));
        // Retries go on after that.
        assert!(p.poll_timeout().is_some());
        assert_eq!(p.state(), State::Error);
    }

    #[test]
    fn on_demand_waits_for_a_viewer_and_leaves_after_grace() {
        let t0 = Instant::now();
        let grace = s(10);
        let mut p = Pull::new(t0, true, grace);
        assert!(drain(&mut p).is_empty());
        assert_eq!((p.state(), p.poll_timeout()), (State::Idle, None));
        p.request(t0 + s(5));
        assert_eq!(drain(&mut p), vec![Action::Connect(1)]);
        p.handle_step(t0 + s(6), 1, Step::Playing);
        p.handle_frame(t0 + s(7), 1);
        // One viewer for 20 s, counted every second.
        for i in 7..=27 {
            p.handle_frame(t0 + s(i), 1);
            p.handle_readers(t0 + s(i), 1);
            assert!(drain(&mut p).is_empty(), "at {i}");
        }
        // Gone: frames keep coming for the grace, then the pull stops.
        for i in 28..=36 {
            p.handle_frame(t0 + s(i), 1);
            p.handle_readers(t0 + s(i), 0);
            assert!(drain(&mut p).is_empty(), "at {i}");
        }
        p.handle_frame(t0 + s(37), 1);
        p.handle_readers(t0 + s(37), 0);
        assert_eq!(drain(&mut p), vec![Action::Disconnect, Action::Unpublish]);
        assert_eq!((p.state(), p.poll_timeout()), (State::Idle, None));
        // The next viewer starts it again; once live, a quick leave is
        // cut after the grace, not after the start wait.
        p.request(t0 + s(60));
        assert_eq!(drain(&mut p), vec![Action::Connect(2)]);
        p.handle_step(t0 + s(60), 2, Step::Playing);
        p.handle_frame(t0 + s(61), 2);
        p.handle_readers(t0 + s(62), 1);
        for i in 63..=71 {
            p.handle_frame(t0 + s(i), 2);
            p.handle_readers(t0 + s(i), 0);
        }
        assert!(drain(&mut p).is_empty());
        p.handle_readers(t0 + s(72), 0);
        assert_eq!(drain(&mut p), vec![Action::Disconnect, Action::Unpublish]);
    }

    #[test]
    fn on_demand_waiting_viewer_is_not_cut_by_grace() {
        let t0 = Instant::now();
        let mut p = Pull::new(t0, true, s(1));
        p.request(t0);
        drain(&mut p);
        // Connecting takes 8 s; no reader is counted yet (it is waiting).
        for i in 1..=8 {
            p.handle_readers(t0 + s(i), 0);
            assert!(drain(&mut p).is_empty(), "at {i}");
        }
        assert_eq!(p.state(), State::Connecting);
        // A failed on-demand pull with nobody left goes idle after the wait.
        p.handle_error(t0 + s(8), 1, "refused".into());
        drain(&mut p);
        let a = run_until(&mut p, t0 + s(10));
        assert_eq!(a, vec![Action::Connect(2), Action::Disconnect]);
        assert_eq!(p.state(), State::Idle);
        assert_eq!(p.poll_timeout(), None);
    }

    #[test]
    fn always_on_ignores_readers_and_requests() {
        let t0 = Instant::now();
        let mut p = Pull::new(t0, false, s(1));
        drain(&mut p);
        p.handle_step(t0, 1, Step::Playing);
        p.handle_frame(t0, 1);
        for i in 1..100 {
            p.handle_frame(t0 + s(i), 1);
            p.handle_readers(t0 + s(i), 0);
            p.request(t0 + s(i));
        }
        assert!(drain(&mut p).is_empty());
        assert_eq!(p.state(), State::Live);
    }
}
