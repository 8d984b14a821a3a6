//! The shell's half of each exchange with the core: performing its actions
//! (control writes, stream tasks, registry calls) and feeding it events
//! from stream tasks, local commands and local streams to uplink.

use std::sync::Arc;

use super::{Command, Event, Fetch, Session, RESOLVE_TIMEOUT};
use crate::metrics::RELAY_STREAMS_REFUSED;
use crate::registry::{Registry, Subscriber};
use crate::relay::link::{Action, Source};
use crate::relay::recv::{Incoming, Linger};
use crate::relay::send::Outgoing;
use crate::{Error, ProtocolError, Result};

/// What the peer is told about a local stream.
fn source(subscriber: Subscriber) -> Source<Subscriber> {
    Source {
        catalog: subscriber.catalog(),
        protocol: subscriber.protocol(),
        handle: subscriber,
    }
}

impl Session {
    /// Performs the core's actions until it has none left; an action may
    /// feed the core again and so add more.
    pub(super) async fn perform_actions(&mut self) -> Result<()> {
        while let Some(action) = self.core.poll_action() {
            self.perform(action).await?;
        }
        Ok(())
    }

    async fn perform(&mut self, action: Action<Arc<Registry>, Fetch, Subscriber>) -> Result<()> {
        match action {
            Action::Write(msg) => self.write(&msg).await?,
            Action::Resolve { id, stream } => self.resolve(id, stream),
            Action::StartSending { id, source, resume } => {
                let out = Outgoing::spawn(
                    id,
                    source,
                    self.conn.clone(),
                    self.seq.clone(),
                    self.events_tx.clone(),
                    resume,
                );
                self.outgoing.insert(id, out);
            }
            Action::StopSending { id } => {
                self.outgoing.remove(&id);
            }
            Action::Accept {
                id,
                stream,
                protocol,
                catalog,
            } => {
                // invariant: the core accepts publications only when serving.
                let registry = self.serve.clone().ok_or(ProtocolError::PublishRefused)?;
                let publisher = registry.publish_relayed(&stream, catalog, &protocol)?;
                let incoming = Incoming::spawn(
                    id,
                    publisher,
                    self.routes.clone(),
                    self.events_tx.clone(),
                    None,
                );
                self.incoming.insert(id, incoming);
            }
            Action::Attach {
                id,
                target,
                name,
                catalog,
                protocol,
            } => match target.publish_relayed(&name, catalog, &protocol) {
                Ok(publisher) => {
                    let linger = Linger {
                        registry: target,
                        name,
                        grace: self.linger,
                    };
                    let incoming = Incoming::spawn(
                        id,
                        publisher,
                        self.routes.clone(),
                        self.events_tx.clone(),
                        Some(linger),
                    );
                    self.incoming.insert(id, incoming);
                    self.core.handle_attached(id, true);
                }
                Err(e) => {
                    tracing::warn!(stream = %name, error = %e, "cannot publish fetched stream");
                    self.core.handle_attached(id, false);
                }
            },
            Action::StopReceiving { id } => {
                self.incoming.remove(&id);
            }
            Action::SetCatalog { id, catalog } => {
                if let Some(i) = self.incoming.get(&id) {
                    i.set_catalog(catalog);
                }
            }
            Action::RequestKeyframe { id, track } => {
                if let Some(o) = self.outgoing.get(&id) {
                    o.request_keyframe(track);
                }
            }
            Action::SelectTracks { id, tracks } => {
                if let Some(o) = self.outgoing.get(&id) {
                    o.select(tracks);
                }
            }
            Action::Heard { id, tracks } => {
                if let Some(i) = self.incoming.get(&id) {
                    i.heard(tracks);
                }
            }
            Action::Answer { waiter, live } => {
                let _ = waiter.send(if live { Ok(()) } else { Err(Error::NotLive) });
            }
            Action::Refused {
                stream,
                reason,
                by_peer,
            } => {
                metrics::counter!(RELAY_STREAMS_REFUSED, "reason" => "catalog").increment(1);
                if by_peer {
                    tracing::warn!(%stream, %reason, "peer's stream refused, the link stays up");
                } else {
                    tracing::warn!(%stream, %reason, "stream not forwarded over the relay");
                }
            }
            Action::Load(nodes) => {
                let now = std::time::Instant::now();
                let peer = nodes.first().map(|r| r.node.clone());
                self.node.handle_load(now, nodes)?;
                self.peer_node = peer.map(|id| (id, now));
                if !self.peer_reports {
                    // Answer the first report at once: the peer learns its
                    // path (and any loop) within a round trip.
                    self.peer_reports = true;
                    self.send_cluster(now).await?;
                }
            }
            Action::Cluster { path, nodes } => {
                self.node
                    .handle_cluster(std::time::Instant::now(), path, nodes)?;
            }
            Action::Retry {
                target,
                name,
                until,
            } => {
                // Only while the held-over stream still has readers.
                if target.is_live(&name) && target.subscribers(&name) > 0 {
                    self.core.handle_resubscribe(target, name, until, true);
                }
            }
        }
        Ok(())
    }

    /// Looks for the stream of the peer's subscription `id` in the background
    /// (a cascading node fetches it from its own upstream first).
    fn resolve(&mut self, id: u64, stream: String) {
        let Some(registry) = self.serve.clone() else {
            // The core resolves only when serving; answer "not found" anyway.
            self.core.handle_resolved(id, None);
            return;
        };
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let found =
                tokio::time::timeout(RESOLVE_TIMEOUT, registry.subscribe_relay(&stream)).await;
            let subscriber = found.ok().and_then(|r| r.ok());
            let _ = events.send(Event::Resolved { id, subscriber }).await;
        });
    }

    pub(super) fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Stream(report) => self.core.handle_report(report),
            Event::Resolved { id, subscriber } => {
                self.core.handle_resolved(id, subscriber.map(source));
            }
        }
    }

    pub(super) fn on_command(&mut self, cmd: Command) {
        let Command::Subscribe {
            registry,
            name,
            reply,
        } = cmd;
        if reply.is_closed() {
            return;
        }
        let live = registry.is_live(&name);
        self.core.handle_fetch(registry, name, reply, live);
    }

    pub(super) async fn uplink_all(&mut self, registry: &Arc<Registry>) -> Result<()> {
        for name in registry.names() {
            self.uplink_one(registry, &name).await?;
        }
        Ok(())
    }

    /// Publishes a local stream to the peer unless it already is.
    pub(super) async fn uplink_one(&mut self, registry: &Arc<Registry>, name: &str) -> Result<()> {
        let sent = self
            .core
            .uplinked(name)
            .and_then(|id| self.outgoing.get(&id));
        if sent.is_some_and(Outgoing::is_live) {
            return Ok(());
        }
        let Ok(Ok(subscriber)) =
            tokio::time::timeout(RESOLVE_TIMEOUT, registry.subscribe_relay(name)).await
        else {
            return Ok(());
        };
        self.core.handle_announce(name, source(subscriber));
        self.perform_actions().await
    }
}
