//! The relay link protocol without I/O: id parity, the peer's publications
//! and subscriptions, our own subscriptions waiting for an answer, retries
//! after a lost link, orphans, and the uplink's announcements.
//!
//! ```text
//! in:  handle_message(now, msg) | handle_report | handle_fetch | handle_announce
//!      | handle_resolved / handle_attached (answers to actions) | handle_timeout(now)
//! out: poll_action() -> Write | Resolve | Accept | Attach | StartSending | ... ;
//!      poll_timeout() -> the next retry
//! ```
//!
//! The session (`session`) is the shell: it performs each action on quinn,
//! the registry and its stream tasks, and feeds the outcomes back. The data
//! path (one unidirectional stream per group) stays in `send` and `recv`:
//! it is a set of per-stream tasks the core only starts and stops by id.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::wire::{check_catalog, valid_label, Heard, Message};
use crate::model::catalog::Catalog;
use crate::{ProtocolError, Result};

/// Streams the peer may publish to us on one link.
const MAX_PUBLICATIONS: usize = 256;
/// Streams the peer may subscribe to on one link.
const MAX_SUBSCRIPTIONS: usize = 1024;
/// Our own subscriptions awaiting an answer.
const MAX_PENDING: usize = 256;
/// Pause between re-subscription attempts after a lost link.
pub(crate) const RETRY: Duration = Duration::from_millis(500);
/// The label sent for a stream whose own label breaks [`valid_label`]: the
/// registry's label comes from local code, but the peer checks it strictly.
const FALLBACK_LABEL: &str = "relay";

/// Which end of the link this is; decides the id parity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    Accepted,
    Connected,
}

/// A local stream to send to the peer: the shell's handle on it (`S`) and
/// what the peer is told about it.
pub(crate) struct Source<S> {
    pub(crate) handle: S,
    pub(crate) catalog: Catalog,
    pub(crate) protocol: String,
}

/// What the shell's stream tasks report about a publication or subscription.
#[derive(Debug, PartialEq)]
pub(crate) enum Report {
    /// A stream we send changed its catalog.
    Catalog { id: u64, catalog: Catalog },
    /// A stream we send ended.
    Ended { id: u64 },
    /// A local reader of a stream we receive wants a keyframe.
    Keyframe { id: u64, track: String },
    /// A stream we receive has had no readers for the grace period.
    Idle { id: u64 },
    /// A stream we receive was taken over locally or closed.
    Gone { id: u64 },
    /// The renditions local readers of a stream we receive read now.
    Select { id: u64, tracks: Vec<String> },
    /// When the renditions we hold back from the peer last had a frame.
    Heard { id: u64, tracks: Vec<Heard> },
}

/// What the shell must do. `R` is where a fetched stream is published (a
/// registry), `W` waits for a fetch's answer, `S` is a local stream to send.
#[derive(Debug, PartialEq)]
pub(crate) enum Action<R, W, S> {
    /// Write a control message to the peer.
    Write(Message),
    /// The peer subscribes to `stream`: look for it, then answer with
    /// [`Link::handle_resolved`].
    Resolve { id: u64, stream: String },
    /// Send `source` to the peer as publication or subscription `id`. With
    /// `resume` the peer has the current group already.
    StartSending { id: u64, source: S, resume: bool },
    /// Stop sending `id` (the peer unsubscribed, or the stream ended).
    StopSending { id: u64 },
    /// The peer publishes `stream`: publish it locally, fed from `id`. A
    /// failure ends the link.
    Accept {
        id: u64,
        stream: String,
        protocol: String,
        catalog: Catalog,
    },
    /// Our subscription `id` was accepted: publish `name` in `target`, fed
    /// from `id`, and report the outcome with [`Link::handle_attached`]
    /// before polling again.
    Attach {
        id: u64,
        target: R,
        name: String,
        catalog: Catalog,
        protocol: String,
    },
    /// Stop feeding the local stream of `id`.
    StopReceiving { id: u64 },
    /// A catalog update for the stream we receive as `id`.
    SetCatalog { id: u64, catalog: Catalog },
    /// The peer wants a keyframe of `track` of the stream we send as `id`.
    RequestKeyframe { id: u64, track: String },
    /// The peer reads only these renditions of the stream we send as `id`.
    SelectTracks { id: u64, tracks: Vec<String> },
    /// Held-back renditions of the stream we receive as `id` still flow at
    /// the source.
    Heard { id: u64, tracks: Vec<Heard> },
    /// Answer a fetch: whether the stream is now live locally.
    Answer { waiter: W, live: bool },
    /// A stream held over from a lost link may be back upstream: if it
    /// still has readers, call [`Link::handle_resubscribe`].
    Retry {
        target: R,
        name: String,
        until: Instant,
    },
    /// The peer (below us) reported its load and that of the nodes below
    /// it: for the node's cluster table, which checks for a loop.
    Load(Vec<crate::cluster::Report>),
    /// The peer (our upstream) sent its path and table.
    Cluster {
        path: Vec<String>,
        nodes: Vec<crate::cluster::Report>,
    },
    /// A stream was refused for a fault of its own (its catalog breaks the
    /// relay's caps); the link and its other streams carry on. Log it.
    Refused {
        /// The stream's name, or its id when the name is not known here.
        stream: String,
        /// What is wrong with it.
        reason: String,
        /// True when the peer sent it, false when it is ours and is not
        /// forwarded.
        by_peer: bool,
    },
}

/// What a lost link leaves for the next one.
#[derive(Debug, PartialEq)]
pub(crate) struct Leftover<R> {
    /// Our subscriptions, to subscribe again after reconnecting.
    pub(crate) resubscribe: Vec<(R, String)>,
    /// Streams this link published, to resume at the next keyframe.
    pub(crate) uplinked: HashSet<String>,
}

/// One of our subscriptions awaiting its answer.
struct Pending<R, W> {
    target: R,
    name: String,
    waiters: Vec<W>,
    /// For a re-subscription after a lost link: keep asking until then
    /// (the upstream may be back before its own publisher is).
    retry_until: Option<Instant>,
}

struct Retry<R> {
    at: Instant,
    target: R,
    name: String,
    until: Instant,
}

/// The protocol state of one authenticated link, the same on both ends.
pub(crate) struct Link<R, W, S> {
    side: Side,
    /// This side serves a registry: it takes the peer's publications and
    /// subscriptions.
    serves: bool,
    next_id: u64,
    /// Ids we send (peer subscriptions we serve, and our publications).
    sending: HashSet<u64>,
    /// Ids we receive (peer publications, and our subscriptions).
    receiving: HashSet<u64>,
    /// Peer subscriptions waiting for their stream, with their `resume` flag.
    resolving: HashMap<u64, bool>,
    pending: HashMap<u64, Pending<R, W>>,
    pending_names: HashMap<String, u64>,
    /// Accepted subscriptions whose local publication the shell is making.
    attaching: HashMap<u64, Pending<R, W>>,
    /// Our subscriptions by name: id and where they are published.
    subscribed: HashMap<String, (u64, R)>,
    /// Our publications by name.
    uplinked: HashMap<String, u64>,
    /// Streams the previous (lost) link already published: the peer has
    /// seen their current group, so they resume at the next keyframe.
    resume_uplink: HashSet<String>,
    retries: Vec<Retry<R>>,
    actions: VecDeque<Action<R, W, S>>,
}

/// `protocol` if it follows the label rule, else [`FALLBACK_LABEL`].
fn label(protocol: String) -> String {
    if valid_label(&protocol) {
        protocol
    } else {
        FALLBACK_LABEL.to_string()
    }
}

impl<R: Clone, W, S> Link<R, W, S> {
    /// A fresh link. `serves`: this side takes the peer's publications and
    /// subscriptions. `resume_uplink`: what the lost link before it published.
    pub(crate) fn new(side: Side, serves: bool, resume_uplink: HashSet<String>) -> Self {
        Self {
            side,
            serves,
            // Ids never clash: the connecting side uses even, the accepting odd.
            next_id: if side == Side::Connected { 0 } else { 1 },
            sending: HashSet::new(),
            receiving: HashSet::new(),
            resolving: HashMap::new(),
            pending: HashMap::new(),
            pending_names: HashMap::new(),
            attaching: HashMap::new(),
            subscribed: HashMap::new(),
            uplinked: HashMap::new(),
            resume_uplink,
            retries: Vec::new(),
            actions: VecDeque::new(),
        }
    }

    /// The next thing to do; call after every `handle_*` until `None`.
    #[must_use]
    pub(crate) fn poll_action(&mut self) -> Option<Action<R, W, S>> {
        self.actions.pop_front()
    }

    /// When [`Link::handle_timeout`] is due next.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.retries.iter().map(|r| r.at).min()
    }

    /// Fires the retries due at `now`.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retries)
            .into_iter()
            .partition(|r| r.at <= now);
        self.retries = later;
        for r in due {
            self.actions.push_back(Action::Retry {
                target: r.target,
                name: r.name,
                until: r.until,
            });
        }
    }

    /// A control message from the peer. An error is the peer's violation:
    /// the link ends.
    pub(crate) fn handle_message(&mut self, now: Instant, msg: Message) -> Result<()> {
        match msg {
            Message::Publish {
                id,
                stream,
                protocol,
                catalog,
            } => {
                let id = self.peer_id(id)?;
                if !self.serves {
                    return Err(ProtocolError::PublishRefused.into());
                }
                if self.receiving.len() >= MAX_PUBLICATIONS {
                    return Err(ProtocolError::TooManyPublications {
                        max: MAX_PUBLICATIONS,
                    }
                    .into());
                }
                if let Err(e) = check_catalog(&catalog) {
                    // That stream only: tell the peer to stop sending it.
                    self.refused(stream, &e, true);
                    self.write(Message::Unsubscribe { id });
                    return Ok(());
                }
                tracing::info!(%stream, %protocol, id, "peer publishes");
                self.receiving.insert(id);
                self.actions.push_back(Action::Accept {
                    id,
                    stream,
                    protocol,
                    catalog,
                });
            }
            Message::CatalogUpdate { id, catalog } => {
                if !self.receiving.contains(&id) {
                    return Ok(());
                }
                match check_catalog(&catalog) {
                    Ok(()) => self.actions.push_back(Action::SetCatalog { id, catalog }),
                    Err(e) => {
                        // End that stream here and at the peer.
                        let name = self.subscribed_name(id);
                        self.refused(name, &e, true);
                        self.receiving.remove(&id);
                        self.subscribed.retain(|_, v| v.0 != id);
                        self.actions.push_back(Action::StopReceiving { id });
                        self.write(Message::Unsubscribe { id });
                    }
                }
            }
            Message::Subscribe { id, stream, resume } => {
                let id = self.peer_id(id)?;
                let room = self.sending.len() + self.resolving.len() < MAX_SUBSCRIPTIONS;
                if !(self.serves && room) {
                    self.write(Message::NotFound { id });
                    return Ok(());
                }
                self.resolving.insert(id, resume);
                self.actions.push_back(Action::Resolve { id, stream });
            }
            Message::SubscribeOk {
                id,
                catalog,
                protocol,
            } => self.on_subscribe_ok(id, catalog, protocol),
            Message::NotFound { id } => self.on_not_found(now, id),
            Message::Unsubscribe { id } => {
                // Also ends a publication the peer no longer takes (another
                // publisher took the stream over there).
                self.stop_sending(id);
                self.resolving.remove(&id);
            }
            Message::KeyframeRequest { id, track } => {
                if self.sending.contains(&id) {
                    self.actions
                        .push_back(Action::RequestKeyframe { id, track });
                }
            }
            Message::Select { id, tracks } => {
                if self.sending.contains(&id) {
                    self.actions.push_back(Action::SelectTracks { id, tracks });
                }
            }
            Message::Heard { id, tracks } => {
                if self.receiving.contains(&id) {
                    self.actions.push_back(Action::Heard { id, tracks });
                }
            }
            Message::Ended { id } => {
                if self.receiving.remove(&id) {
                    tracing::debug!(id, "peer ended a stream");
                    self.actions.push_back(Action::StopReceiving { id });
                }
                self.subscribed.retain(|_, v| v.0 != id);
            }
            // Load reports go up (from the connecting side), tables come
            // down: the other way round is a confused peer.
            Message::Load { nodes } if self.side == Side::Accepted => {
                self.actions.push_back(Action::Load(nodes));
            }
            Message::Cluster { path, nodes } if self.side == Side::Connected => {
                self.actions.push_back(Action::Cluster { path, nodes });
            }
            m @ (Message::Load { .. } | Message::Cluster { .. }) => {
                return Err(ProtocolError::UnexpectedMessage {
                    expected: "load reports upwards, cluster tables downwards",
                    got: m.kind(),
                }
                .into());
            }
            m @ (Message::Hello { .. }
            | Message::Challenge { .. }
            | Message::Auth { .. }
            | Message::AuthOk { .. }) => {
                return Err(ProtocolError::UnexpectedMessage {
                    expected: "a message after the handshake",
                    got: m.kind(),
                }
                .into());
            }
        }
        Ok(())
    }

    fn on_subscribe_ok(&mut self, id: u64, catalog: Catalog, protocol: String) {
        let Some(p) = self.pending.remove(&id) else {
            // Nobody waits any more (or never did): let the peer stop.
            self.write(Message::Unsubscribe { id });
            return;
        };
        self.pending_names.remove(&p.name);
        if let Err(e) = check_catalog(&catalog) {
            // As if not found, without retrying: the next fetch asks again.
            self.refused(p.name, &e, true);
            for waiter in p.waiters {
                self.actions.push_back(Action::Answer {
                    waiter,
                    live: false,
                });
            }
            self.write(Message::Unsubscribe { id });
            return;
        }
        self.actions.push_back(Action::Attach {
            id,
            target: p.target.clone(),
            name: p.name.clone(),
            catalog,
            protocol,
        });
        self.attaching.insert(id, p);
    }

    fn on_not_found(&mut self, now: Instant, id: u64) {
        let Some(p) = self.pending.remove(&id) else {
            return;
        };
        self.pending_names.remove(&p.name);
        for waiter in p.waiters {
            self.actions.push_back(Action::Answer {
                waiter,
                live: false,
            });
        }
        if let Some(until) = p.retry_until.filter(|&t| now + RETRY < t) {
            tracing::debug!(stream = %p.name, "not back upstream yet: retrying");
            self.retries.push(Retry {
                at: now + RETRY,
                target: p.target,
                name: p.name,
                until,
            });
        }
    }

    /// The outcome of an [`Action::Attach`]: whether the fetched stream is
    /// now published locally.
    pub(crate) fn handle_attached(&mut self, id: u64, ok: bool) {
        let Some(p) = self.attaching.remove(&id) else {
            return;
        };
        if ok {
            self.receiving.insert(id);
            tracing::info!(stream = %p.name, id, "subscribed upstream");
            self.subscribed.insert(p.name, (id, p.target));
        }
        for waiter in p.waiters {
            self.actions.push_back(Action::Answer { waiter, live: ok });
        }
        if !ok {
            self.write(Message::Unsubscribe { id });
        }
    }

    /// The outcome of an [`Action::Resolve`]: the stream found, if any.
    pub(crate) fn handle_resolved(&mut self, id: u64, found: Option<Source<S>>) {
        // Gone when the peer unsubscribed meanwhile.
        let Some(resume) = self.resolving.remove(&id) else {
            return;
        };
        let found = match found.map(|s| (check_catalog(&s.catalog), s)) {
            Some((Err(e), _)) => {
                // Ours breaks the caps: the peer would refuse it.
                self.refused(format!("id {id}"), &e, false);
                None
            }
            Some((Ok(()), s)) => Some(s),
            None => None,
        };
        match found {
            Some(source) => {
                self.write(Message::SubscribeOk {
                    id,
                    catalog: source.catalog,
                    protocol: label(source.protocol),
                });
                self.sending.insert(id);
                self.actions.push_back(Action::StartSending {
                    id,
                    source: source.handle,
                    resume,
                });
            }
            None => self.write(Message::NotFound { id }),
        }
    }

    /// A report from a stream task.
    pub(crate) fn handle_report(&mut self, report: Report) {
        match report {
            Report::Catalog { id, catalog } => {
                if !self.sending.contains(&id) {
                    return;
                }
                match check_catalog(&catalog) {
                    Ok(()) => self.write(Message::CatalogUpdate { id, catalog }),
                    Err(e) => {
                        // The peer would refuse it: end that stream there.
                        let name = self
                            .uplinked
                            .iter()
                            .find(|(_, v)| **v == id)
                            .map_or_else(|| format!("id {id}"), |(n, _)| n.clone());
                        self.refused(name, &e, false);
                        if self.stop_sending(id) {
                            self.write(Message::Ended { id });
                        }
                    }
                }
            }
            Report::Ended { id } => {
                if self.stop_sending(id) {
                    self.write(Message::Ended { id });
                }
            }
            Report::Keyframe { id, track } => {
                if self.receiving.contains(&id) {
                    self.write(Message::KeyframeRequest { id, track });
                }
            }
            Report::Select { id, tracks } => {
                if self.receiving.contains(&id) {
                    self.write(Message::Select { id, tracks });
                }
            }
            Report::Heard { id, tracks } => {
                if self.sending.contains(&id) {
                    self.write(Message::Heard { id, tracks });
                }
            }
            // Idle: nobody reads it. Gone: taken over locally. Either way
            // tell the peer to stop sending it.
            Report::Idle { id } | Report::Gone { id } => {
                if self.receiving.remove(&id) {
                    self.subscribed.retain(|_, v| v.0 != id);
                    self.actions.push_back(Action::StopReceiving { id });
                    self.write(Message::Unsubscribe { id });
                }
            }
        }
    }

    /// The local node wants `name` from the peer, published in `target`;
    /// `waiter` hears the outcome. `live`: `name` is live in `target` now.
    pub(crate) fn handle_fetch(&mut self, target: R, name: String, waiter: W, live: bool) {
        self.subscribe(target, name, Some(waiter), None, live);
    }

    /// Subscribes again to a stream held over from a lost link (at link up,
    /// or on [`Action::Retry`]), retrying on `NotFound` until `until`.
    /// `live`: `name` is live in `target` now.
    pub(crate) fn handle_resubscribe(
        &mut self,
        target: R,
        name: String,
        until: Instant,
        live: bool,
    ) {
        self.subscribe(target, name, None, Some(until), live);
    }

    /// Subscribes upstream unless already subscribed or asked.
    fn subscribe(
        &mut self,
        target: R,
        name: String,
        waiter: Option<W>,
        retry_until: Option<Instant>,
        live: bool,
    ) {
        if let Some((id, _)) = self.subscribed.get(&name) {
            if self.receiving.contains(id) && live {
                if let Some(waiter) = waiter {
                    self.actions
                        .push_back(Action::Answer { waiter, live: true });
                }
                return;
            }
        }
        if let Some(p) = self
            .pending_names
            .get(&name)
            .and_then(|id| self.pending.get_mut(id))
        {
            p.waiters.extend(waiter);
            return;
        }
        if self.pending.len() >= MAX_PENDING {
            if let Some(waiter) = waiter {
                self.actions.push_back(Action::Answer {
                    waiter,
                    live: false,
                });
            }
            return;
        }
        let id = self.alloc_id();
        self.write(Message::Subscribe {
            id,
            stream: name.clone(),
            // A re-subscription: our viewers already saw the current group.
            resume: retry_until.is_some(),
        });
        self.pending_names.insert(name.clone(), id);
        self.pending.insert(
            id,
            Pending {
                target,
                name,
                waiters: waiter.into_iter().collect(),
                retry_until,
            },
        );
    }

    /// The id `name` is published to the peer under, if it is; the shell
    /// checks whether that stream is still live before announcing it again.
    pub(crate) fn uplinked(&self, name: &str) -> Option<u64> {
        self.uplinked.get(name).copied()
    }

    /// Publishes the local stream `name` to the peer.
    pub(crate) fn handle_announce(&mut self, name: &str, source: Source<S>) {
        if let Err(e) = check_catalog(&source.catalog) {
            // Validated before sending: the peer would refuse it anyway.
            self.refused(name.to_string(), &e, false);
            return;
        }
        if self.sending.len() >= MAX_SUBSCRIPTIONS {
            tracing::warn!(
                stream = name,
                "too many streams on the uplink: not forwarding"
            );
            return;
        }
        let id = self.alloc_id();
        self.write(Message::Publish {
            id,
            stream: name.to_string(),
            protocol: label(source.protocol),
            catalog: source.catalog,
        });
        tracing::info!(stream = name, id, "publishing upstream");
        let resume = self.resume_uplink.remove(name);
        self.sending.insert(id);
        self.actions.push_back(Action::StartSending {
            id,
            source: source.handle,
            resume,
        });
        self.uplinked.insert(name.to_string(), id);
    }

    /// Takes what the next link needs from this lost one. The streams it
    /// received stay with the shell, which holds them for the grace period.
    pub(crate) fn orphans(&mut self) -> Leftover<R> {
        self.receiving.clear();
        Leftover {
            resubscribe: self
                .subscribed
                .drain()
                .map(|(name, (_, target))| (target, name))
                .collect(),
            uplinked: self.uplinked.drain().map(|(name, _)| name).collect(),
        }
    }

    /// Forgets a stream we send; true if it was one.
    fn stop_sending(&mut self, id: u64) -> bool {
        self.uplinked.retain(|_, v| *v != id);
        if !self.sending.remove(&id) {
            return false;
        }
        self.actions.push_back(Action::StopSending { id });
        true
    }

    fn refused(&mut self, stream: String, e: &ProtocolError, by_peer: bool) {
        self.actions.push_back(Action::Refused {
            stream,
            reason: e.to_string(),
            by_peer,
        });
    }

    /// The name of our subscription `id`, or the id when it is none.
    fn subscribed_name(&self, id: u64) -> String {
        self.subscribed
            .iter()
            .find(|(_, v)| v.0 == id)
            .map_or_else(|| format!("id {id}"), |(n, _)| n.clone())
    }

    fn write(&mut self, msg: Message) {
        self.actions.push_back(Action::Write(msg));
    }

    fn alloc_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 2;
        id
    }

    /// Checks an id the peer picked for a new publication or subscription.
    fn peer_id(&self, id: u64) -> Result<u64, ProtocolError> {
        if id % 2 == self.next_id % 2 {
            return Err(ProtocolError::WrongIdParity(id));
        }
        if self.receiving.contains(&id)
            || self.sending.contains(&id)
            || self.resolving.contains_key(&id)
        {
            return Err(ProtocolError::IdInUse(id));
        }
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::wire::MAX_LABEL;
    use crate::Error;

    /// Registries are named, waiters numbered, local streams named.
    type TestLink = Link<&'static str, u32, &'static str>;
    type TestAction = Action<&'static str, u32, &'static str>;

    fn drain(link: &mut TestLink) -> Vec<TestAction> {
        std::iter::from_fn(|| link.poll_action()).collect()
    }

    fn writes(actions: &[TestAction]) -> Vec<&Message> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Write(m) => Some(m),
                _ => None,
            })
            .collect()
    }

    fn source(protocol: &str) -> Source<&'static str> {
        Source {
            handle: "local",
            catalog: Catalog::default(),
            protocol: protocol.into(),
        }
    }

    fn publish(id: u64, stream: &str) -> Message {
        Message::Publish {
            id,
            stream: stream.into(),
            protocol: "whip".into(),
            catalog: Catalog::default(),
        }
    }

    fn subscribe(id: u64, stream: &str) -> Message {
        Message::Subscribe {
            id,
            stream: stream.into(),
            resume: false,
        }
    }

    fn subscribe_ok(id: u64) -> Message {
        Message::SubscribeOk {
            id,
            catalog: Catalog::default(),
            protocol: "whip".into(),
        }
    }

    fn violation(r: Result<()>) -> ProtocolError {
        match r {
            Err(Error::Protocol(e)) => e,
            other => panic!("expected a protocol violation, got {other:?}"),
        }
    }

    /// A client link with `name` fetched from the peer and attached.
    fn fetched(now: Instant, name: &str) -> (TestLink, u64) {
        let mut link = TestLink::new(Side::Connected, false, HashSet::new());
        link.handle_fetch("edge", name.into(), 1, false);
        let Some(Action::Write(Message::Subscribe { id, .. })) = link.poll_action() else {
            panic!("no subscribe");
        };
        link.handle_message(now, subscribe_ok(id)).unwrap();
        drain(&mut link);
        link.handle_attached(id, true);
        drain(&mut link);
        (link, id)
    }

    #[test]
    fn selections_go_up_and_heard_comes_down_for_live_ids_only() {
        let now = Instant::now();
        // Subscriber side: our readers' selection goes to the peer.
        let (mut edge, id) = fetched(now, "cam");
        let tracks = vec!["video-q".to_string()];
        edge.handle_report(Report::Select {
            id,
            tracks: tracks.clone(),
        });
        edge.handle_report(Report::Select {
            id: id + 2,
            tracks: tracks.clone(),
        });
        assert_eq!(
            drain(&mut edge),
            vec![Action::Write(Message::Select {
                id,
                tracks: tracks.clone()
            })]
        );
        let heard = vec![Heard {
            track: "video".into(),
            ingest_us: 7,
        }];
        let msg = |id| Message::Heard {
            id,
            tracks: heard.clone(),
        };
        edge.handle_message(now, msg(id)).unwrap();
        edge.handle_message(now, msg(id + 2)).unwrap();
        assert_eq!(
            drain(&mut edge),
            vec![Action::Heard {
                id,
                tracks: heard.clone()
            }]
        );

        // Sender side: a selection reaches the stream we send.
        let mut origin = TestLink::new(Side::Accepted, true, HashSet::new());
        origin.handle_message(now, subscribe(0, "cam")).unwrap();
        origin.handle_resolved(0, Some(source("whip")));
        drain(&mut origin);
        let select = |id| Message::Select {
            id,
            tracks: tracks.clone(),
        };
        origin.handle_message(now, select(0)).unwrap();
        origin.handle_message(now, select(4)).unwrap();
        origin.handle_report(Report::Heard {
            id: 0,
            tracks: heard.clone(),
        });
        origin.handle_report(Report::Heard {
            id: 4,
            tracks: heard.clone(),
        });
        assert_eq!(
            drain(&mut origin),
            vec![
                Action::SelectTracks {
                    id: 0,
                    tracks: tracks.clone()
                },
                Action::Write(msg(0)),
            ]
        );
    }

    #[test]
    fn load_goes_up_and_cluster_comes_down_only() {
        let now = Instant::now();
        let report = crate::cluster::Report {
            node: "0a".into(),
            ..Default::default()
        };
        let mut server = TestLink::new(Side::Accepted, true, HashSet::new());
        let mut client = TestLink::new(Side::Connected, false, HashSet::new());
        let load = Message::Load {
            nodes: vec![report.clone()],
        };
        let cluster = Message::Cluster {
            path: vec!["0b".into()],
            nodes: vec![report.clone()],
        };
        server.handle_message(now, load.clone()).unwrap();
        assert_eq!(drain(&mut server), vec![Action::Load(vec![report.clone()])]);
        client.handle_message(now, cluster.clone()).unwrap();
        assert_eq!(
            drain(&mut client),
            vec![Action::Cluster {
                path: vec!["0b".into()],
                nodes: vec![report]
            }]
        );
        assert!(matches!(
            violation(server.handle_message(now, cluster)),
            ProtocolError::UnexpectedMessage { got: "cluster", .. }
        ));
        assert!(matches!(
            violation(client.handle_message(now, load)),
            ProtocolError::UnexpectedMessage { got: "load", .. }
        ));
    }

    #[test]
    fn each_side_allocates_its_own_parity() {
        let mut client = TestLink::new(Side::Connected, false, HashSet::new());
        let mut server = TestLink::new(Side::Accepted, true, HashSet::new());
        for n in 0..3 {
            client.handle_announce(&format!("s{n}"), source("whip"));
            server.handle_announce(&format!("s{n}"), source("whip"));
        }
        let ids = |link: &mut TestLink| -> Vec<u64> {
            writes(&drain(link))
                .iter()
                .filter_map(|m| match m {
                    Message::Publish { id, .. } => Some(*id),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(ids(&mut client), vec![0, 2, 4]);
        assert_eq!(ids(&mut server), vec![1, 3, 5]);
    }

    #[test]
    fn peer_ids_of_our_parity_or_in_use_are_violations() {
        let now = Instant::now();
        let mut server = TestLink::new(Side::Accepted, true, HashSet::new());
        let e = violation(server.handle_message(now, publish(1, "s")));
        assert!(matches!(e, ProtocolError::WrongIdParity(1)));
        server.handle_message(now, publish(2, "s")).unwrap();
        let e = violation(server.handle_message(now, publish(2, "t")));
        assert!(matches!(e, ProtocolError::IdInUse(2)));
        // A subscription still being resolved holds its id too.
        server.handle_message(now, subscribe(4, "t")).unwrap();
        let e = violation(server.handle_message(now, subscribe(4, "t")));
        assert!(matches!(e, ProtocolError::IdInUse(4)));
        let mut client = TestLink::new(Side::Connected, false, HashSet::new());
        let e = violation(client.handle_message(now, subscribe(0, "s")));
        assert!(matches!(e, ProtocolError::WrongIdParity(0)));
    }

    #[test]
    fn peer_publications_are_accepted_only_when_serving() {
        let now = Instant::now();
        let mut server = TestLink::new(Side::Accepted, true, HashSet::new());
        server.handle_message(now, publish(0, "cam")).unwrap();
        assert_eq!(
            drain(&mut server),
            vec![Action::Accept {
                id: 0,
                stream: "cam".into(),
                protocol: "whip".into(),
                catalog: Catalog::default(),
            }]
        );
        // Catalog updates reach a known publication, not an unknown id.
        server
            .handle_message(
                now,
                Message::CatalogUpdate {
                    id: 0,
                    catalog: Catalog::default(),
                },
            )
            .unwrap();
        server
            .handle_message(
                now,
                Message::CatalogUpdate {
                    id: 8,
                    catalog: Catalog::default(),
                },
            )
            .unwrap();
        assert_eq!(
            drain(&mut server),
            vec![Action::SetCatalog {
                id: 0,
                catalog: Catalog::default()
            }]
        );
        let mut client = TestLink::new(Side::Connected, false, HashSet::new());
        let e = violation(client.handle_message(now, publish(1, "cam")));
        assert!(matches!(e, ProtocolError::PublishRefused));
    }

    #[test]
    fn too_many_peer_publications_end_the_link() {
        let now = Instant::now();
        let mut server = TestLink::new(Side::Accepted, true, HashSet::new());
        for n in 0..MAX_PUBLICATIONS as u64 {
            server.handle_message(now, publish(n * 2, "s")).unwrap();
        }
        let e = violation(server.handle_message(now, publish(MAX_PUBLICATIONS as u64 * 2, "s")));
        assert!(matches!(e, ProtocolError::TooManyPublications { max: 256 }));
    }

    #[test]
    fn handshake_messages_after_the_handshake_are_violations() {
        let mut link = TestLink::new(Side::Accepted, true, HashSet::new());
        let e = violation(link.handle_message(Instant::now(), Message::AuthOk { proof: [0; 32] }));
        assert!(matches!(
            e,
            ProtocolError::UnexpectedMessage { got: "auth_ok", .. }
        ));
    }

    #[test]
    fn peer_subscriptions_are_resolved_then_served_or_refused() {
        let now = Instant::now();
        let mut server = TestLink::new(Side::Accepted, true, HashSet::new());
        server
            .handle_message(
                now,
                Message::Subscribe {
                    id: 0,
                    stream: "cam".into(),
                    resume: true,
                },
            )
            .unwrap();
        assert_eq!(
            drain(&mut server),
            vec![Action::Resolve {
                id: 0,
                stream: "cam".into()
            }]
        );
        server.handle_resolved(0, Some(source("rtmp")));
        assert_eq!(
            drain(&mut server),
            vec![
                Action::Write(Message::SubscribeOk {
                    id: 0,
                    catalog: Catalog::default(),
                    protocol: "rtmp".into(),
                }),
                Action::StartSending {
                    id: 0,
                    source: "local",
                    resume: true
                },
            ]
        );
        // Keyframe requests reach the stream we send; then the peer leaves.
        let key = Message::KeyframeRequest {
            id: 0,
            track: "video".into(),
        };
        server.handle_message(now, key).unwrap();
        server
            .handle_message(now, Message::Unsubscribe { id: 0 })
            .unwrap();
        assert_eq!(
            drain(&mut server),
            vec![
                Action::RequestKeyframe {
                    id: 0,
                    track: "video".into()
                },
                Action::StopSending { id: 0 },
            ]
        );
        // Not found locally.
        server.handle_message(now, subscribe(2, "gone")).unwrap();
        drain(&mut server);
        server.handle_resolved(2, None);
        assert_eq!(
            drain(&mut server),
            vec![Action::Write(Message::NotFound { id: 2 })]
        );
        // Unsubscribed while resolving: the late answer is dropped.
        server.handle_message(now, subscribe(4, "cam")).unwrap();
        server
            .handle_message(now, Message::Unsubscribe { id: 4 })
            .unwrap();
        drain(&mut server);
        server.handle_resolved(4, Some(source("whip")));
        assert!(drain(&mut server).is_empty());
        // A side that serves nothing answers at once.
        let mut client = TestLink::new(Side::Connected, false, HashSet::new());
        client.handle_message(now, subscribe(1, "cam")).unwrap();
        assert_eq!(
            drain(&mut client),
            vec![Action::Write(Message::NotFound { id: 1 })]
        );
    }

    #[test]
    fn pending_subscription_answers_every_waiter() {
        let now = Instant::now();
        let mut link = TestLink::new(Side::Connected, false, HashSet::new());
        link.handle_fetch("edge", "cam".into(), 1, false);
        // A second fetch of the same stream joins the first.
        link.handle_fetch("edge", "cam".into(), 2, false);
        assert_eq!(
            drain(&mut link),
            vec![Action::Write(Message::Subscribe {
                id: 0,
                stream: "cam".into(),
                resume: false
            })]
        );
        link.handle_message(now, subscribe_ok(0)).unwrap();
        assert_eq!(
            drain(&mut link),
            vec![Action::Attach {
                id: 0,
                target: "edge",
                name: "cam".into(),
                catalog: Catalog::default(),
                protocol: "whip".into(),
            }]
        );
        link.handle_attached(0, true);
        assert_eq!(
            drain(&mut link),
            vec![
                Action::Answer {
                    waiter: 1,
                    live: true
                },
                Action::Answer {
                    waiter: 2,
                    live: true
                },
            ]
        );
        // Subscribed and live: a later fetch is answered without asking.
        link.handle_fetch("edge", "cam".into(), 3, true);
        assert_eq!(
            drain(&mut link),
            vec![Action::Answer {
                waiter: 3,
                live: true
            }]
        );
        // Keyframe requests of local readers go upstream.
        link.handle_report(Report::Keyframe {
            id: 0,
            track: "video".into(),
        });
        link.handle_report(Report::Keyframe {
            id: 6,
            track: "video".into(),
        });
        assert_eq!(
            drain(&mut link),
            vec![Action::Write(Message::KeyframeRequest {
                id: 0,
                track: "video".into()
            })]
        );
    }

    #[test]
    fn pending_subscription_fails_on_not_found_or_local_refusal() {
        let now = Instant::now();
        let mut link = TestLink::new(Side::Connected, false, HashSet::new());
        link.handle_fetch("edge", "cam".into(), 1, false);
        link.handle_fetch("edge", "cam".into(), 2, false);
        drain(&mut link);
        link.handle_message(now, Message::NotFound { id: 0 })
            .unwrap();
        assert_eq!(
            drain(&mut link),
            vec![
                Action::Answer {
                    waiter: 1,
                    live: false
                },
                Action::Answer {
                    waiter: 2,
                    live: false
                },
            ]
        );
        // A fetch that never asked again schedules nothing.
        assert_eq!(link.poll_timeout(), None);
        // Found upstream, but the local registry refused it.
        link.handle_fetch("edge", "cam".into(), 3, false);
        drain(&mut link);
        link.handle_message(now, subscribe_ok(2)).unwrap();
        drain(&mut link);
        link.handle_attached(2, false);
        assert_eq!(
            drain(&mut link),
            vec![
                Action::Answer {
                    waiter: 3,
                    live: false
                },
                Action::Write(Message::Unsubscribe { id: 2 }),
            ]
        );
        // An answer nobody waits for is turned down.
        link.handle_message(now, subscribe_ok(40)).unwrap();
        assert_eq!(
            drain(&mut link),
            vec![Action::Write(Message::Unsubscribe { id: 40 })]
        );
    }

    #[test]
    fn pending_subscriptions_are_bounded() {
        let mut link = TestLink::new(Side::Connected, false, HashSet::new());
        for n in 0..MAX_PENDING {
            link.handle_fetch("edge", format!("s{n}"), 0, false);
        }
        drain(&mut link);
        link.handle_fetch("edge", "one-more".into(), 7, false);
        assert_eq!(
            drain(&mut link),
            vec![Action::Answer {
                waiter: 7,
                live: false
            }]
        );
    }

    #[test]
    fn resubscription_retries_until_its_deadline() {
        let t0 = Instant::now();
        let until = t0 + Duration::from_secs(2);
        let mut link = TestLink::new(Side::Connected, false, HashSet::new());
        link.handle_resubscribe("edge", "cam".into(), until, true);
        assert_eq!(
            drain(&mut link),
            vec![Action::Write(Message::Subscribe {
                id: 0,
                stream: "cam".into(),
                // Our viewers saw the current group before the link broke.
                resume: true
            })]
        );
        link.handle_message(t0, Message::NotFound { id: 0 })
            .unwrap();
        assert!(drain(&mut link).is_empty());
        assert_eq!(link.poll_timeout(), Some(t0 + RETRY));
        link.handle_timeout(t0 + RETRY - Duration::from_millis(1));
        assert!(drain(&mut link).is_empty());
        link.handle_timeout(t0 + RETRY);
        assert_eq!(
            drain(&mut link),
            vec![Action::Retry {
                target: "edge",
                name: "cam".into(),
                until
            }]
        );
        assert_eq!(link.poll_timeout(), None);
        // The shell still has readers: ask again, same deadline.
        link.handle_resubscribe("edge", "cam".into(), until, true);
        drain(&mut link);
        // Too close to the deadline for another round: give up.
        let late = until - RETRY;
        link.handle_message(late, Message::NotFound { id: 2 })
            .unwrap();
        assert!(drain(&mut link).is_empty());
        assert_eq!(link.poll_timeout(), None);
    }

    #[test]
    fn lost_link_leaves_what_the_next_one_resumes() {
        let t0 = Instant::now();
        let (mut lost, id) = fetched(t0, "cam");
        lost.handle_announce("ingest-1", source("rtmp"));
        drain(&mut lost);
        let left = lost.orphans();
        assert_eq!(left.resubscribe, vec![("edge", "cam".to_string())]);
        assert_eq!(left.uplinked, HashSet::from(["ingest-1".to_string()]));
        // The old link forgot them: reports for its ids do nothing.
        lost.handle_report(Report::Idle { id });
        assert!(drain(&mut lost).is_empty());

        let mut next = TestLink::new(Side::Connected, false, left.uplinked);
        for (target, name) in left.resubscribe {
            next.handle_resubscribe(target, name, t0 + Duration::from_secs(5), true);
        }
        next.handle_announce("ingest-1", source("rtmp"));
        next.handle_announce("ingest-2", source("rtmp"));
        let actions = drain(&mut next);
        let resumed: Vec<(u64, bool)> = actions
            .iter()
            .filter_map(|a| match a {
                Action::StartSending { id, resume, .. } => Some((*id, *resume)),
                _ => None,
            })
            .collect();
        // The peer has seen the current group of what the lost link sent.
        assert_eq!(resumed, vec![(2, true), (4, false)]);
        assert_eq!(
            writes(&actions)[0],
            &Message::Subscribe {
                id: 0,
                stream: "cam".into(),
                resume: true
            }
        );
    }

    #[test]
    fn streams_we_receive_end_by_report_or_by_the_peer() {
        let now = Instant::now();
        // Idle (or taken over locally): unsubscribe and forget it.
        for report in [Report::Idle { id: 0 }, Report::Gone { id: 0 }] {
            let (mut link, id) = fetched(now, "cam");
            link.handle_report(report);
            assert_eq!(
                drain(&mut link),
                vec![
                    Action::StopReceiving { id },
                    Action::Write(Message::Unsubscribe { id }),
                ]
            );
            // No longer subscribed: the next fetch asks again.
            link.handle_fetch("edge", "cam".into(), 9, true);
            assert!(matches!(
                link.poll_action(),
                Some(Action::Write(Message::Subscribe { id: 2, .. }))
            ));
        }
        // Ended at its source.
        let (mut link, id) = fetched(now, "cam");
        link.handle_message(now, Message::Ended { id }).unwrap();
        assert_eq!(drain(&mut link), vec![Action::StopReceiving { id }]);
        assert!(link.orphans().resubscribe.is_empty());
    }

    #[test]
    fn streams_we_send_end_by_report_or_by_the_peer() {
        let now = Instant::now();
        let mut link = TestLink::new(Side::Connected, false, HashSet::new());
        link.handle_announce("a", source("whip"));
        link.handle_announce("b", source("whip"));
        drain(&mut link);
        assert_eq!(link.uplinked("a"), Some(0));
        link.handle_report(Report::Catalog {
            id: 0,
            catalog: Catalog::default(),
        });
        link.handle_report(Report::Ended { id: 0 });
        // Taken over at the peer by another publisher.
        link.handle_message(now, Message::Unsubscribe { id: 2 })
            .unwrap();
        assert_eq!(
            drain(&mut link),
            vec![
                Action::Write(Message::CatalogUpdate {
                    id: 0,
                    catalog: Catalog::default()
                }),
                Action::StopSending { id: 0 },
                Action::Write(Message::Ended { id: 0 }),
                Action::StopSending { id: 2 },
            ]
        );
        assert_eq!(link.uplinked("a"), None);
        assert_eq!(link.uplinked("b"), None);
        // Reports about ids no longer sent are dropped.
        link.handle_report(Report::Ended { id: 0 });
        assert!(drain(&mut link).is_empty());
    }

    /// A catalog over the track cap (17 media lines of a WHIP offer).
    fn too_many_tracks() -> Catalog {
        let track = crate::model::catalog::TrackInfo {
            name: "video".into(),
            codec: crate::model::catalog::Codec::H264,
            fmtp: String::new(),
            channels: None,
            bframes: false,
            rendition: None,
        };
        Catalog {
            tracks: vec![track; crate::relay::wire::MAX_TRACKS + 1],
        }
    }

    fn refused(stream: &str, by_peer: bool) -> TestAction {
        Action::Refused {
            stream: stream.into(),
            reason: "catalog lists 17 tracks, at most 16".into(),
            by_peer,
        }
    }

    #[test]
    fn a_bad_catalog_from_the_peer_ends_that_stream_not_the_link() {
        let now = Instant::now();
        let mut server = TestLink::new(Side::Accepted, true, HashSet::new());
        server.handle_message(now, publish(0, "good")).unwrap();
        drain(&mut server);
        let bad = Message::Publish {
            id: 2,
            stream: "bad".into(),
            protocol: "whip".into(),
            catalog: too_many_tracks(),
        };
        server.handle_message(now, bad).unwrap();
        assert_eq!(
            drain(&mut server),
            vec![
                refused("bad", true),
                Action::Write(Message::Unsubscribe { id: 2 })
            ]
        );
        // A live stream whose catalog grows past the cap ends alone.
        let update = Message::CatalogUpdate {
            id: 0,
            catalog: too_many_tracks(),
        };
        server.handle_message(now, update.clone()).unwrap();
        assert_eq!(
            drain(&mut server),
            vec![
                refused("id 0", true),
                Action::StopReceiving { id: 0 },
                Action::Write(Message::Unsubscribe { id: 0 }),
            ]
        );
        server.handle_message(now, update).unwrap();
        assert!(drain(&mut server).is_empty(), "already ended");
        // Other streams keep coming.
        server.handle_message(now, publish(4, "next")).unwrap();
        assert!(matches!(
            drain(&mut server).as_slice(),
            [Action::Accept { id: 4, .. }]
        ));

        // An answer to our subscription with a bad catalog: not live.
        let mut client = TestLink::new(Side::Connected, false, HashSet::new());
        client.handle_fetch("edge", "cam".into(), 1, false);
        drain(&mut client);
        let ok = Message::SubscribeOk {
            id: 0,
            catalog: too_many_tracks(),
            protocol: "whip".into(),
        };
        client.handle_message(now, ok).unwrap();
        assert_eq!(
            drain(&mut client),
            vec![
                refused("cam", true),
                Action::Answer {
                    waiter: 1,
                    live: false
                },
                Action::Write(Message::Unsubscribe { id: 0 }),
            ]
        );
        assert_eq!(client.poll_timeout(), None, "no retry");
    }

    #[test]
    fn a_bad_local_catalog_is_never_sent() {
        let mut link = TestLink::new(Side::Connected, false, HashSet::new());
        let bad = Source {
            handle: "local",
            catalog: too_many_tracks(),
            protocol: "whip".into(),
        };
        link.handle_announce("bad", bad);
        link.handle_announce("good", source("whip"));
        let actions = drain(&mut link);
        assert_eq!(actions[0], refused("bad", false));
        assert!(matches!(
            writes(&actions).as_slice(),
            [Message::Publish { id: 0, .. }]
        ));
        // A sent stream whose catalog grows past the cap ends at the peer.
        link.handle_report(Report::Catalog {
            id: 0,
            catalog: too_many_tracks(),
        });
        assert_eq!(
            drain(&mut link),
            vec![
                refused("good", false),
                Action::StopSending { id: 0 },
                Action::Write(Message::Ended { id: 0 }),
            ]
        );
        // Asked for by the peer: not found.
        let mut server = TestLink::new(Side::Accepted, true, HashSet::new());
        server
            .handle_message(Instant::now(), subscribe(0, "bad"))
            .unwrap();
        drain(&mut server);
        let bad = Source {
            handle: "local",
            catalog: too_many_tracks(),
            protocol: "whip".into(),
        };
        server.handle_resolved(0, Some(bad));
        assert_eq!(
            drain(&mut server),
            vec![
                refused("id 0", false),
                Action::Write(Message::NotFound { id: 0 })
            ]
        );
    }

    #[test]
    fn labels_follow_the_wire_rule() {
        assert_eq!(label("whip".into()), "whip");
        assert_eq!(label("a".repeat(MAX_LABEL)), "a".repeat(MAX_LABEL));
        assert_eq!(label(String::new()), FALLBACK_LABEL);
        assert_eq!(label("a".repeat(MAX_LABEL + 1)), FALLBACK_LABEL);
        assert_eq!(label("rtmp push".into()), FALLBACK_LABEL);
        assert!(valid_label(FALLBACK_LABEL));
        // What the session sends always encodes, even from an unlabelled
        // local stream (the registry's label starts empty).
        let mut server = TestLink::new(Side::Accepted, true, HashSet::new());
        server
            .handle_message(Instant::now(), subscribe(0, "cam"))
            .unwrap();
        drain(&mut server);
        server.handle_resolved(0, Some(source("")));
        server.handle_announce("cam", source(&"x".repeat(40)));
        let actions = drain(&mut server);
        let sent = writes(&actions);
        assert_eq!(sent.len(), 2);
        for msg in sent {
            match msg {
                Message::SubscribeOk { protocol, .. } | Message::Publish { protocol, .. } => {
                    assert_eq!(protocol, FALLBACK_LABEL);
                }
                other => panic!("unexpected {other:?}"),
            }
            assert!(msg.encode().is_ok());
        }
    }
}
