//! The session's reactions: to control messages from the peer, to events
//! from its stream tasks, to local commands, and to local streams to uplink.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use super::{
    Command, Event, Pending, Session, MAX_PENDING, MAX_PUBLICATIONS, MAX_SUBSCRIPTIONS,
    RESOLVE_TIMEOUT, RETRY,
};
use crate::model::catalog::Catalog;
use crate::registry::Registry;
use crate::relay::recv::{Incoming, Linger};
use crate::relay::send::Outgoing;
use crate::relay::wire::Message;
use crate::{Error, Result};

/// A protocol label safe to put on the wire (what the registry recorded
/// comes from local code, but the peer validates it strictly).
fn protocol_label(p: String) -> String {
    let ok =
        (1..=16).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        p
    } else {
        "relay".to_string()
    }
}

impl Session {
    pub(super) async fn on_message(&mut self, msg: Message) -> Result<()> {
        match msg {
            Message::Publish {
                id,
                stream,
                protocol,
                catalog,
            } => {
                let id = self.peer_id(id)?;
                let registry = self
                    .serve
                    .clone()
                    .ok_or_else(|| Error::Protocol("publish not accepted here".into()))?;
                if self.incoming.len() >= MAX_PUBLICATIONS {
                    return Err(Error::Protocol("too many publications".into()));
                }
                tracing::info!(%stream, %protocol, id, "peer publishes");
                let publisher = registry.publish(&stream, catalog, &protocol)?;
                let incoming = Incoming::spawn(
                    id,
                    publisher,
                    self.routes.clone(),
                    self.events_tx.clone(),
                    None,
                );
                self.incoming.insert(id, incoming);
            }
            Message::CatalogUpdate { id, catalog } => {
                if let Some(i) = self.incoming.get(&id) {
                    i.set_catalog(catalog);
                }
            }
            Message::Subscribe { id, stream, resume } => {
                let id = self.peer_id(id)?;
                let registry = match self.serve.clone() {
                    Some(r) if self.outgoing.len() + self.resolving.len() < MAX_SUBSCRIPTIONS => r,
                    _ => return self.write(&Message::NotFound { id }).await,
                };
                self.resolving.insert(id, resume);
                let events = self.events_tx.clone();
                tokio::spawn(async move {
                    let found =
                        tokio::time::timeout(RESOLVE_TIMEOUT, registry.subscribe_relay(&stream))
                            .await;
                    let subscriber = found.ok().and_then(|r| r.ok());
                    let _ = events.send(Event::Resolved { id, subscriber }).await;
                });
            }
            Message::SubscribeOk {
                id,
                catalog,
                protocol,
            } => self.on_subscribe_ok(id, catalog, protocol).await?,
            Message::NotFound { id } => {
                if let Some(p) = self.pending.remove(&id) {
                    self.pending_names.remove(&p.name);
                    for w in p.waiters {
                        let _ = w.send(Err(Error::NotLive));
                    }
                    if let Some(until) = p.retry_until.filter(|&t| Instant::now() + RETRY < t) {
                        tracing::debug!(stream = %p.name, "not back upstream yet: retrying");
                        let events = self.events_tx.clone();
                        let (registry, name) = (p.registry, p.name);
                        tokio::spawn(async move {
                            tokio::time::sleep(RETRY).await;
                            let _ = events
                                .send(Event::Retry {
                                    registry,
                                    name,
                                    until,
                                })
                                .await;
                        });
                    }
                }
            }
            Message::Unsubscribe { id } => {
                // Also ends a publication the peer no longer takes (another
                // publisher took the stream over there).
                self.outgoing.remove(&id);
                self.resolving.remove(&id);
                self.uplinked.retain(|_, v| *v != id);
            }
            Message::KeyframeRequest { id, track } => {
                if let Some(o) = self.outgoing.get(&id) {
                    o.request_keyframe(track);
                }
            }
            Message::Ended { id } => {
                if self.incoming.remove(&id).is_some() {
                    tracing::debug!(id, "peer ended a stream");
                }
                self.subscribed.retain(|_, v| v.0 != id);
            }
            Message::Hello { .. }
            | Message::Challenge { .. }
            | Message::Auth { .. }
            | Message::AuthOk => {
                return Err(Error::Protocol("handshake message after handshake".into()));
            }
        }
        Ok(())
    }

    async fn on_subscribe_ok(&mut self, id: u64, catalog: Catalog, protocol: String) -> Result<()> {
        let Some(p) = self.pending.remove(&id) else {
            // Nobody waits any more (or never did): let the peer stop.
            return self.write(&Message::Unsubscribe { id }).await;
        };
        self.pending_names.remove(&p.name);
        match p.registry.publish(&p.name, catalog, &protocol) {
            Ok(publisher) => {
                let linger = Linger {
                    registry: p.registry.clone(),
                    name: p.name.clone(),
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
                self.subscribed
                    .insert(p.name.clone(), (id, p.registry.clone()));
                tracing::info!(stream = %p.name, id, "subscribed upstream");
                for w in p.waiters {
                    let _ = w.send(Ok(()));
                }
                Ok(())
            }
            Err(e) => {
                for w in p.waiters {
                    let _ = w.send(Err(Error::NotLive));
                }
                tracing::warn!(stream = %p.name, error = %e, "cannot publish fetched stream");
                self.write(&Message::Unsubscribe { id }).await
            }
        }
    }

    pub(super) async fn on_event(&mut self, ev: Event) -> Result<()> {
        match ev {
            Event::Catalog { id, catalog } => {
                if self.outgoing.contains_key(&id) {
                    self.write(&Message::CatalogUpdate { id, catalog }).await?;
                }
            }
            Event::Ended { id } => {
                if self.outgoing.remove(&id).is_some() {
                    self.uplinked.retain(|_, v| *v != id);
                    self.write(&Message::Ended { id }).await?;
                }
            }
            Event::Keyframe { id, track } => {
                if self.incoming.contains_key(&id) {
                    self.write(&Message::KeyframeRequest { id, track }).await?;
                }
            }
            Event::Idle { id } => {
                if self.incoming.remove(&id).is_some() {
                    self.subscribed.retain(|_, v| v.0 != id);
                    self.write(&Message::Unsubscribe { id }).await?;
                }
            }
            Event::Gone { id } => {
                // Taken over locally: tell the peer to stop sending it.
                if self.incoming.remove(&id).is_some() {
                    self.subscribed.retain(|_, v| v.0 != id);
                    self.write(&Message::Unsubscribe { id }).await?;
                }
            }
            Event::Retry {
                registry,
                name,
                until,
            } => {
                // Only while the held-over stream still has readers.
                if registry.is_live(&name) && registry.subscribers(&name) > 0 {
                    self.subscribe(registry, name, None, Some(until)).await?;
                }
            }
            Event::Resolved { id, subscriber } => {
                let Some(resume) = self.resolving.remove(&id) else {
                    return Ok(());
                };
                match subscriber {
                    Some(s) => {
                        let msg = Message::SubscribeOk {
                            id,
                            catalog: s.catalog(),
                            protocol: protocol_label(s.protocol()),
                        };
                        self.write(&msg).await?;
                        let out = Outgoing::spawn(
                            id,
                            s,
                            self.conn.clone(),
                            self.seq.clone(),
                            self.events_tx.clone(),
                            resume,
                        );
                        self.outgoing.insert(id, out);
                    }
                    None => self.write(&Message::NotFound { id }).await?,
                }
            }
        }
        Ok(())
    }

    pub(super) async fn on_command(&mut self, cmd: Command) -> Result<()> {
        let Command::Subscribe {
            registry,
            name,
            reply,
        } = cmd;
        if reply.is_closed() {
            return Ok(());
        }
        self.subscribe(registry, name, Some(reply), None).await
    }

    /// Subscribes upstream unless already subscribed or asked; `reply`
    /// hears the outcome.
    pub(super) async fn subscribe(
        &mut self,
        registry: Arc<Registry>,
        name: String,
        reply: Option<oneshot::Sender<Result<()>>>,
        retry_until: Option<Instant>,
    ) -> Result<()> {
        if let Some((id, _)) = self.subscribed.get(&name) {
            if self.incoming.contains_key(id) && registry.is_live(&name) {
                if let Some(r) = reply {
                    let _ = r.send(Ok(()));
                }
                return Ok(());
            }
        }
        if let Some(p) = self
            .pending_names
            .get(&name)
            .and_then(|id| self.pending.get_mut(id))
        {
            p.waiters.extend(reply);
            return Ok(());
        }
        if self.pending.len() >= MAX_PENDING {
            if let Some(r) = reply {
                let _ = r.send(Err(Error::NotLive));
            }
            return Ok(());
        }
        let id = self.alloc_id();
        self.write(&Message::Subscribe {
            id,
            stream: name.clone(),
            // A re-subscription: our viewers already saw the current group.
            resume: retry_until.is_some(),
        })
        .await?;
        self.pending_names.insert(name.clone(), id);
        self.pending.insert(
            id,
            Pending {
                registry,
                name,
                waiters: reply.into_iter().collect(),
                retry_until,
            },
        );
        Ok(())
    }

    pub(super) async fn uplink_all(&mut self, registry: &Arc<Registry>) -> Result<()> {
        for name in registry.names() {
            self.uplink_one(registry, &name).await?;
        }
        Ok(())
    }

    /// Publishes a local stream to the peer unless it already is.
    pub(super) async fn uplink_one(&mut self, registry: &Arc<Registry>, name: &str) -> Result<()> {
        let sent = self.uplinked.get(name).and_then(|id| self.outgoing.get(id));
        if sent.is_some_and(Outgoing::is_live) {
            return Ok(());
        }
        let Ok(Ok(subscriber)) =
            tokio::time::timeout(RESOLVE_TIMEOUT, registry.subscribe_relay(name)).await
        else {
            return Ok(());
        };
        if self.outgoing.len() >= MAX_SUBSCRIPTIONS {
            tracing::warn!(
                stream = name,
                "too many streams on the uplink: not forwarding"
            );
            return Ok(());
        }
        let id = self.alloc_id();
        let msg = Message::Publish {
            id,
            stream: name.to_string(),
            protocol: protocol_label(subscriber.protocol()),
            catalog: subscriber.catalog(),
        };
        self.write(&msg).await?;
        tracing::info!(stream = name, id, "publishing upstream");
        let resume = self.resume_uplink.remove(name);
        let out = Outgoing::spawn(
            id,
            subscriber,
            self.conn.clone(),
            self.seq.clone(),
            self.events_tx.clone(),
            resume,
        );
        self.outgoing.insert(id, out);
        self.uplinked.insert(name.to_string(), id);
        Ok(())
    }
}
