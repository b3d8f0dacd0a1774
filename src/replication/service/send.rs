//! Sending: a loop per member that backfills it, then sends it this server's own events
//! from its cursor and, when they changed, the registry-wide settings.

use std::sync::Arc;
use std::time::Duration;

use super::*;

impl Replication {
    pub(super) async fn send_loop(self: Arc<Self>, name: String) {
        let mut wake = self.registry.subscribe_with_context();
        let mut moved = self.settings_moves.subscribe();
        let mut backoff = Duration::from_millis(500);
        loop {
            if self.halt.is_cancelled() {
                return;
            }
            let step = self.send_some(&name).await;
            let pause = match step {
                Ok(true) => {
                    backoff = Duration::from_millis(500);
                    continue;
                }
                Ok(false) => {
                    backoff = Duration::from_millis(500);
                    Duration::from_secs(1)
                }
                Err(e) => {
                    tracing::warn!(replica = %name, error = %e, "replicating");
                    let (n, msg) = (name.clone(), e.to_string());
                    let _ = self.db(move |s| s.set_error(&n, &msg)).await;
                    let b = backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    b
                }
            };
            tokio::select! {
                _ = self.halt.cancelled() => return,
                _ = wake.recv() => {}
                _ = moved.changed() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Sends the member one batch (of its backfill, or of events); true when there may be
    /// more right away. Gone from the group: nothing.
    async fn send_some(&self, name: &str) -> Result<bool, ReplicationError> {
        let n = name.to_string();
        let (g, m) = self.db(move |s| Ok((s.group()?, s.member(&n)?))).await?;
        let (Some(g), Some(m)) = (g, m) else {
            return Ok(false);
        };
        // The settings go first, whatever else waits: a token revoked or a trust policy set
        // does not wait behind a backfill or a stream of pushes. A refusal is reported
        // and holds nothing else up.
        self.settings_to(&g, &m.member).await;
        if !m.backfilled {
            return self.backfill_some(&g, &m).await;
        }
        let events = self
            .registry
            .events_after(m.cursor, BATCH)
            .await
            .map_err(|e| ReplicationError::Refused(e.to_string()))?;
        let Some(last) = events.last().map(|(seq, _)| *seq) else {
            return Ok(false);
        };
        if events[0].0 > m.cursor + 1 {
            // Events it has not had were pruned (away longer than the outbox keeps
            // them; a prune keeps the newest, so this shows even when nothing happened
            // since): it gets everything held here again instead.
            tracing::warn!(replica = %m.member.name, after = m.cursor, "events it missed were pruned: backfilling it again");
            let (n, now) = (
                name.to_string(),
                self.registry.last_event_seq().await.unwrap_or(last),
            );
            self.db(move |s| s.restart_backfill(&n, now)).await?;
            return Ok(true);
        }
        // Only what this server accepted: each replica sends its own.
        let own: Vec<StoredEvent> = events
            .into_iter()
            .map(|(_, e)| e)
            .filter(|e| e.replicated_from.is_none() && e.hlc.is_some())
            .collect();
        if !own.is_empty() {
            let batch = Batch {
                from: g.me.name.clone(),
                events: own,
            };
            self.peer_post(&m.member, "events", &batch, &g.secret)
                .await
                .map_err(ReplicationError::Peer)?;
        }
        let n = name.to_string();
        self.db(move |s| s.set_cursor(&n, last)).await?;
        Ok(true)
    }

    /// Sends the member the settings when it is time to look at them again (see
    /// [`SETTINGS_EVERY`]); a refusal is shown with its last error until they are taken.
    async fn settings_to(&self, g: &Group, to: &Member) {
        let now = std::time::Instant::now();
        let was = self
            .settings_sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&to.name)
            .cloned()
            .unwrap_or_default();
        // Looked at again when it is time, or at once when they moved here since (but
        // not ahead of a refusal's wait).
        let moved = *self.settings_moves.borrow();
        if was.next.is_some_and(|t| t > now) && (was.refused.is_some() || was.moved == moved) {
            return;
        }
        let is = match self.send_config(g, to, was.taken.as_deref()).await {
            Ok(taken) => SettingsSent {
                taken: taken.or(was.taken),
                next: Some(now + SETTINGS_EVERY),
                backoff: SETTINGS_EVERY,
                refused: None,
                moved,
            },
            Err(e) => {
                tracing::warn!(replica = %to.name, error = %e, "replicating the settings");
                let wait = was.backoff.max(SETTINGS_EVERY);
                SettingsSent {
                    next: Some(now + wait),
                    backoff: (wait * 2).min(MAX_BACKOFF),
                    refused: Some(format!("the settings: {e}")),
                    moved,
                    ..was
                }
            }
        };
        self.settings_sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(to.name.clone(), is);
    }

    /// Sends the member the registry-wide settings with their clocks unless their state is
    /// `taken`, the one it last took; the state it has taken now, if any.
    async fn send_config(
        &self,
        g: &Group,
        to: &Member,
        taken: Option<&str>,
    ) -> Result<Option<String>, ReplicationError> {
        let rs = self.store.clone();
        let digest =
            tokio::task::spawn_blocking(move || crate::replication::config::state_digest(&rs))
                .await
                .map_err(|e| ReplicationError::Refused(e.to_string()))??;
        if taken == Some(digest.as_str()) {
            return Ok(None); // the clocks are as last sent: nothing to read
        }
        let items = self
            .on_settings(|at, rs| {
                let held = crate::replication::config::holdings(at)?;
                crate::replication::config::items(rs, &held)
            })
            .await?;
        if items.is_empty() {
            return Ok(None);
        }
        let body = ConfigBatch {
            from: g.me.name.clone(),
            items,
        };
        self.peer_post(to, "config", &body, &g.secret)
            .await
            .map_err(ReplicationError::Peer)?;
        Ok(Some(digest))
    }

    /// Sends the next part of everything this server holds (each manifest with its tags
    /// and their winning times) to a member that joined.
    async fn backfill_some(&self, g: &Group, m: &MemberState) -> Result<bool, ReplicationError> {
        let store = self.registry.store().clone();
        let rs = self.store.clone();
        let me = g.me.name.clone();
        let (after, known_total) = (m.backfill_after.clone(), m.backfill_total);
        let (events, total, last) = tokio::task::spawn_blocking(move || {
            // Counted once a backfill (for its progress).
            let total = match known_total {
                Some(t) => t as usize,
                None => {
                    let mut n = 0;
                    for repo in store.list_repositories(None, None)? {
                        n += store.list_manifests(&repo)?.map_or(0, |m| m.len());
                    }
                    n
                }
            };
            // The next manifests in (repository, digest) order after the last sent: what
            // is deleted or pushed meanwhile moves nothing else out of its turn.
            let mut picked = Vec::new();
            let (mut repo, mut after_digest) = match after {
                Some((r, d)) => (Some(r), Some(d)),
                None => (
                    store.list_repositories(Some(1), None)?.into_iter().next(),
                    None,
                ),
            };
            while let Some(r) = repo.take() {
                let mut mans = store.list_manifests(&r)?.unwrap_or_default();
                mans.sort_by(|a, b| a.digest.cmp(&b.digest));
                for man in mans
                    .into_iter()
                    .filter(|m| after_digest.as_ref().is_none_or(|d| m.digest > *d))
                {
                    picked.push((r.clone(), man));
                    if picked.len() == BATCH {
                        break;
                    }
                }
                if picked.len() == BATCH {
                    break;
                }
                repo = store
                    .list_repositories(Some(1), Some(&r))?
                    .into_iter()
                    .next();
                after_digest = None;
            }
            let last = picked.last().map(|(r, m)| (r.clone(), m.digest.clone()));
            let all = picked;
            let mut events = Vec::new();
            for (repo, man) in all {
                let made = Stamp {
                    hlc: Hlc {
                        ms: (man.created.max(0) as u64) * 1000,
                        n: 0,
                    },
                    origin: me.clone(),
                };
                let mut stamps = vec![(None, made.clone())];
                for t in &man.tags {
                    let s = match rs.tag_clock(&repo, t)? {
                        Some((s, Some(d))) if d == man.digest => s,
                        // A tag from before the group: its time here is the manifest's,
                        // kept so that both sides of a backfill compare the same times.
                        None => {
                            rs.offer_tag(&repo, t, &made, Some(&man.digest))?;
                            made.clone()
                        }
                        Some(_) => made.clone(),
                    };
                    stamps.push((Some(t.clone()), s));
                }
                for (tag, s) in stamps {
                    events.push(held_event(
                        RegistryEvent {
                            action: EventAction::Push,
                            repository: repo.clone(),
                            tag,
                            digest: man.digest.clone(),
                            media_type: man.media_type.clone(),
                            size: man.size,
                        },
                        s,
                        &me,
                    ));
                }
            }
            Ok::<_, ReplicationError>((events, total, last))
        })
        .await
        .map_err(|e| ReplicationError::Refused(e.to_string()))??;
        // Each manifest is one untagged event, then one per tag.
        let manifests = events.iter().filter(|e| e.event.tag.is_none()).count() as u64;
        if !events.is_empty() {
            let batch = Batch {
                from: g.me.name.clone(),
                events,
            };
            self.peer_post(&m.member, "events", &batch, &g.secret)
                .await
                .map_err(ReplicationError::Peer)?;
        }
        let sent = (m.backfill_done + manifests).min(total as u64);
        // Fewer than a whole batch: nothing after it.
        let done = manifests < BATCH as u64;
        if done {
            self.send_deletes(g, &m.member).await?;
        }
        let n = m.member.name.clone();
        self.db(move |s| {
            let after = last.as_ref().map(|(r, d)| (r.as_str(), d.as_str()));
            s.set_backfill(
                &n,
                if done { total as u64 } else { sent },
                total as u64,
                after,
                done,
            )
        })
        .await?;
        if done {
            tracing::info!(replica = %m.member.name, manifests = total, "backfill done");
        }
        Ok(!done)
    }

    /// The end of a backfill: the deletes kept here (manifests' tombstones, deleted
    /// tags), each with its time, so a member that was away longer than the outbox keeps
    /// events takes those it missed (the last-writer rule drops the others).
    async fn send_deletes(&self, g: &Group, to: &Member) -> Result<(), ReplicationError> {
        let gone = self.db(|s| s.deletes()).await?;
        let me = g.me.name.clone();
        let events: Vec<StoredEvent> = gone
            .into_iter()
            .map(|d| {
                held_event(
                    RegistryEvent {
                        action: EventAction::Delete,
                        repository: d.repo,
                        tag: d.tag,
                        digest: d.digest.unwrap_or_default(),
                        media_type: String::new(),
                        size: 0,
                    },
                    d.stamp,
                    &me,
                )
            })
            .collect();
        for part in events.chunks(DELETES_AT_ONCE) {
            let batch = Batch {
                from: g.me.name.clone(),
                events: part.to_vec(),
            };
            self.peer_post(to, "events", &batch, &g.secret)
                .await
                .map_err(ReplicationError::Peer)?;
        }
        Ok(())
    }
}

/// A change held here, sent as an event stamped with its winning time (and, when another
/// member made it, that member's name).
fn held_event(event: RegistryEvent, s: Stamp, me: &str) -> StoredEvent {
    StoredEvent {
        id: uuid::Uuid::new_v4().to_string(),
        timestamp: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        event,
        context: RequestContext::default(),
        hlc: Some(s.hlc.to_string()),
        replicated_from: (s.origin != me).then_some(s.origin),
    }
}
