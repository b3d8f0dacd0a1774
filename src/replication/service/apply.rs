//! Applying what other members send: pulls by digest (several of a batch at once),
//! tags by the last-writer rule, deletes with tombstones; and the indexer, which takes
//! this server's own tag changes and settings changes into their clocks.

use std::sync::Arc;
use std::time::Duration;

use super::*;

impl Replication {
    /// Takes this server's own changes of the registry-wide settings into their clocks.
    pub(super) async fn scan_config(&self) -> Result<(), ReplicationError> {
        let Some(g) = self.db(|s| s.group()).await? else {
            return Ok(());
        };
        let changed = self
            .on_settings(move |at, rs| {
                let held = crate::replication::config::holdings(at)?;
                crate::replication::config::scan(rs, &held, &g.me.name)
            })
            .await?;
        if changed {
            self.settings_moved();
        }
        Ok(())
    }

    /// Applies a member's batch, in order; the first failure stops it (the sender tries
    /// the batch again: applying is idempotent).
    pub(super) async fn apply_batch(
        &self,
        from: &Member,
        events: Vec<StoredEvent>,
    ) -> Result<usize, ReplicationError> {
        // Pulls first, outside the lock: they may take long (big layers), and what they
        // bring is untagged content until the ordered pass below settles tags.
        self.prefetch(from, &events).await;
        let _one = self.apply.lock().await;
        self.index_local().await?;
        let mut n = 0;
        for e in events {
            self.apply_one(from, e).await?;
            n += 1;
        }
        Ok(n)
    }

    /// Pulls, several at once, the manifests of a batch's pushes that will be applied
    /// (not deleted since, not older than their tag's winner): applying them in order
    /// then finds them here. A failure here is met again, and reported, in order.
    async fn prefetch(&self, from: &Member, events: &[StoredEvent]) {
        use futures_util::StreamExt as _;
        let mut wanted = Vec::new();
        for e in events
            .iter()
            .filter(|e| e.event.action == EventAction::Push)
        {
            let Some(hlc) = e.hlc.as_deref().and_then(|h| h.parse::<Hlc>().ok()) else {
                continue;
            };
            let s = Stamp {
                hlc,
                origin: e
                    .replicated_from
                    .clone()
                    .unwrap_or_else(|| from.name.clone()),
            };
            let (repo, digest, tag) = (
                e.event.repository.clone(),
                e.event.digest.clone(),
                e.event.tag.clone(),
            );
            let (r, d, st) = (repo.clone(), digest.clone(), s.clone());
            let pass = self
                .db(move |rs| {
                    if rs.tombstone(&r, &d)?.is_some_and(|t| t > st) {
                        return Ok(false);
                    }
                    Ok(match tag {
                        Some(t) => crate::replication::wins(
                            &st,
                            rs.tag_clock(&r, &t)?.as_ref().map(|(k, _)| k),
                        ),
                        None => true,
                    })
                })
                .await
                .unwrap_or(false);
            if pass
                && crate::names::valid_name(&repo)
                && crate::digest::parse(&digest).is_ok()
                && !wanted.iter().any(|(r, d, _)| *r == repo && *d == digest)
            {
                wanted.push((repo, digest, s));
            }
        }
        if wanted.len() < 2 {
            return;
        }
        futures_util::stream::iter(wanted)
            .map(|(r, d, s)| async move {
                let _ = self.pull(from, &r, &d, &s).await;
            })
            .buffer_unordered(PULLS_AT_ONCE)
            .collect::<Vec<()>>()
            .await;
    }

    async fn apply_one(&self, from: &Member, e: StoredEvent) -> Result<(), ReplicationError> {
        let hlc: Hlc = e
            .hlc
            .as_deref()
            .ok_or_else(|| ReplicationError::Refused("an event without a time".into()))?
            .parse()
            .map_err(ReplicationError::Refused)?;
        CLOCK.observe(hlc).map_err(ReplicationError::Refused)?;
        let origin = e
            .replicated_from
            .clone()
            .unwrap_or_else(|| from.name.clone());
        let s = Stamp { hlc, origin };
        let ev = &e.event;
        let (repo, digest) = (ev.repository.clone(), ev.digest.clone());
        // A tag's delete sent from a backfill names no digest (the tag's was not kept).
        let tag_delete = ev.action == EventAction::Delete && ev.tag.is_some();
        if !crate::names::valid_name(&repo)
            || (crate::digest::parse(&digest).is_err() && !(tag_delete && digest.is_empty()))
        {
            return Err(ReplicationError::Refused(format!(
                "not a repository and digest: {repo:?} {digest:?}"
            )));
        }
        match (ev.action, ev.tag.clone()) {
            (EventAction::Push, tag) => {
                let (r, d) = (repo.clone(), digest.clone());
                if let Some(t) = self.db(move |s| s.tombstone(&r, &d)).await? {
                    if t > s {
                        return Ok(()); // deleted after this push
                    }
                }
                if let Some(tag) = &tag {
                    let (r, t) = (repo.clone(), tag.clone());
                    let kept = self.db(move |s| s.tag_clock(&r, &t)).await?;
                    // The same change again goes on: its settling may not have happened
                    // (a failure after its clock was kept).
                    if kept.is_some_and(|(k, _)| s < k) {
                        return Ok(()); // a later change of the tag is here already
                    }
                }
                if !self.pull(from, &repo, &digest, &s).await? {
                    return Ok(()); // gone at the sender: its delete follows
                }
                if let Some(tag) = tag {
                    let (r, t, st, d) = (repo.clone(), tag.clone(), s.clone(), digest.clone());
                    self.db(move |s| s.offer_tag(&r, &t, &st, Some(&d))).await?;
                    self.settle(&repo, &tag).await?;
                }
            }
            (EventAction::Delete, Some(tag)) => {
                let (r, t, st) = (repo.clone(), tag.clone(), s.clone());
                if self.db(move |s| s.offer_tag(&r, &t, &st, None)).await? {
                    self.settle(&repo, &tag).await?;
                }
            }
            (EventAction::Delete, None) => {
                let (r, d, st) = (repo.clone(), digest.clone(), s.clone());
                let later = self
                    .db(move |s| {
                        s.bury(&r, &d, &st)?;
                        s.named_after(&r, &d, &st)
                    })
                    .await?;
                if later {
                    // A tag was pointed at it after the delete: the later push wins.
                    return Ok(());
                }
                let store = self.registry.store().clone();
                let ctx = replicated(&s);
                let made = tokio::task::spawn_blocking(move || {
                    crate::registry::service::delete_manifest(&store, &repo, &digest, &ctx)
                })
                .await
                .map_err(|e| ReplicationError::Refused(e.to_string()))??;
                if let Some(evs) = made {
                    self.registry.announce(evs);
                }
            }
        }
        Ok(())
    }

    /// Pulls `repo@digest` from the member that sent it (as an import, untagged); false
    /// when the member no longer has it.
    async fn pull(
        &self,
        from: &Member,
        repo: &str,
        digest: &str,
        s: &Stamp,
    ) -> Result<bool, ReplicationError> {
        let store = self.registry.store().clone();
        let (r, d) = (repo.to_string(), digest.to_string());
        let here = tokio::task::spawn_blocking(move || {
            store
                .get_manifest(&r, &Reference::Digest(d))
                .map(|m| m.is_some())
        })
        .await
        .map_err(|e| ReplicationError::Refused(e.to_string()))??;
        if here {
            return Ok(true);
        }
        let client = self.client_of(from).await?;
        let source = crate::registry::reference::ImageRef {
            registry: client.addr().to_string(),
            repository: repo.to_string(),
            reference: digest.to_string(),
        };
        let target = crate::registry::import::Target {
            repository: repo.to_string(),
            tag: None,
            digest: None,
        };
        let importer =
            crate::registry::import::Importer::new(self.registry.clone(), client, replicated(s));
        match importer.import(&source, &[target], true).await {
            Ok(_) => Ok(true),
            Err(crate::registry::import::ImportError::Missing { .. }) => Ok(false),
            Err(e) => Err(ReplicationError::Peer(format!(
                "pulling {repo}@{digest} from {}: {e}",
                from.name
            ))),
        }
    }

    /// The registry client of a member, logged in as the group's pull login: one per
    /// member, so its tokens serve many pulls.
    async fn client_of(
        &self,
        m: &Member,
    ) -> Result<Arc<crate::registry::client::RegistryClient>, ReplicationError> {
        let secret = self
            .db(|s| s.group())
            .await?
            .map(|g| g.secret)
            .unwrap_or_default();
        let key = format!("{}\n{secret}", m.url);
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let host = m
            .url
            .split_once("://")
            .map_or(m.url.as_str(), |(_, h)| h)
            .trim_end_matches('/')
            .to_string();
        let creds = crate::credentials::Credentials::single(
            &host,
            crate::credentials::Credential {
                username: REPLICATION_USER.into(),
                password: secret,
            },
        );
        let t = crate::registry::client::Transport::new(&self.ca_certs, creds)
            .map_err(|e| ReplicationError::Refused(e.to_string()))?;
        let c = Arc::new(crate::registry::client::RegistryClient::new(host, t));
        clients.retain(|k, _| !k.starts_with(&format!("{}\n", m.url)));
        clients.insert(key, c.clone());
        Ok(c)
    }

    /// Makes the registry's tag what its winning change says (pointing at the winner's
    /// manifest, if held; or gone).
    async fn settle(&self, repo: &str, tag: &str) -> Result<(), ReplicationError> {
        let (r, t) = (repo.to_string(), tag.to_string());
        let Some((s, want)) = self.db(move |s| s.tag_clock(&r, &t)).await? else {
            return Ok(());
        };
        let store = self.registry.store().clone();
        let (r, t) = (repo.to_string(), tag.to_string());
        let now = tokio::task::spawn_blocking(move || store.get_manifest(&r, &Reference::Tag(t)))
            .await
            .map_err(|e| ReplicationError::Refused(e.to_string()))??
            .map(|m| m.digest);
        if now == want {
            return Ok(());
        }
        let ctx = replicated(&s);
        match want {
            Some(d) => {
                let store = self.registry.store().clone();
                let (r, dd) = (repo.to_string(), d.clone());
                let row = tokio::task::spawn_blocking(move || {
                    store.get_manifest(&r, &Reference::Digest(dd))
                })
                .await
                .map_err(|e| ReplicationError::Refused(e.to_string()))??;
                // Not held (yet): the tag is set when it comes.
                if let Some(row) = row {
                    self.registry
                        .tag_manifest(repo, tag, &row.content, &row.media_type, ctx)
                        .await
                        .map_err(|e| ReplicationError::Refused(e.message))?;
                }
            }
            None => {
                let store = self.registry.store().clone();
                let (r, t) = (repo.to_string(), tag.to_string());
                let made = tokio::task::spawn_blocking(move || {
                    crate::registry::service::delete_tag(&store, &r, &t, &ctx)
                })
                .await
                .map_err(|e| ReplicationError::Refused(e.to_string()))??;
                if let Some(ev) = made {
                    self.registry.announce(vec![ev]);
                }
            }
        }
        Ok(())
    }

    /// Takes this server's own tag changes into the clocks, in outbox order, and makes
    /// each tag what its winner says (one that lost to a later change from elsewhere is
    /// undone; one that won stays, even if a replicated change was written after it).
    async fn index_local(&self) -> Result<(), ReplicationError> {
        let Some(g) = self.db(|s| s.group()).await? else {
            return Ok(());
        };
        loop {
            let from = self.db(|s| s.indexed()).await?;
            let events = self
                .registry
                .events_after(from, 256)
                .await
                .map_err(|e| ReplicationError::Refused(e.to_string()))?;
            let Some(last) = events.last().map(|(seq, _)| *seq) else {
                return Ok(());
            };
            for (_, e) in events {
                if e.replicated_from.is_some() {
                    continue;
                }
                let Some(hlc) = e.hlc.as_deref().and_then(|h| h.parse::<Hlc>().ok()) else {
                    continue;
                };
                let s = Stamp {
                    hlc,
                    origin: g.me.name.clone(),
                };
                let ev = e.event;
                match (ev.action, ev.tag) {
                    (action, Some(tag)) => {
                        let digest = (action == EventAction::Push).then(|| ev.digest.clone());
                        let (r, t) = (ev.repository.clone(), tag.clone());
                        self.db(move |st| st.offer_tag(&r, &t, &s, digest.as_deref()))
                            .await?;
                        // Whether it won or lost, the registry's tag may say otherwise:
                        // a replicated change may have been written after it, or it
                        // after a later replicated one. A tag that cannot be settled
                        // here (a lock) stays as it is; the others go on.
                        if let Err(e) = self.settle(&ev.repository, &tag).await {
                            tracing::warn!(repository = %ev.repository, tag = %tag, error = %e, "settling a tag");
                        }
                    }
                    (EventAction::Delete, None) => {
                        let (r, d) = (ev.repository.clone(), ev.digest.clone());
                        self.db(move |st| st.bury(&r, &d, &s)).await?;
                    }
                    (EventAction::Push, None) => {}
                }
            }
            self.db(move |s| s.set_indexed(last)).await?;
        }
    }

    pub(super) async fn index_loop(self: Arc<Self>) {
        let mut wake = self.registry.subscribe_with_context();
        let mut pruned = std::time::Instant::now() - Duration::from_secs(3600);
        let mut told = std::time::Instant::now();
        let every = members_every();
        let mut scanned = std::time::Instant::now() - Duration::from_secs(1);
        let mut touched = false;
        loop {
            {
                let _one = self.apply.lock().await;
                if let Err(e) = self.index_local().await {
                    tracing::warn!(error = %e, "indexing this server's tag changes");
                }
                // At most once a second (it reads every token, scope map and webhook),
                // unless a setting was changed through the API.
                if touched || scanned.elapsed() >= Duration::from_secs(1) {
                    scanned = std::time::Instant::now();
                    touched = false;
                    if let Err(e) = self.scan_config().await {
                        tracing::warn!(error = %e, "reading the registry's tokens, scope maps and webhooks");
                    }
                }
            }
            if told.elapsed() > every {
                told = std::time::Instant::now();
                let me = self.clone();
                tokio::spawn(async move { me.tell_members().await });
            }
            if pruned.elapsed() > Duration::from_secs(3600) {
                pruned = std::time::Instant::now();
                let before = chrono::Utc::now().timestamp() - TOMBSTONE_KEEP.as_secs() as i64;
                let _ = self.db(move |s| s.prune_deletes(before)).await;
            }
            tokio::select! {
                _ = self.halt.cancelled() => return,
                _ = wake.recv() => {}
                _ = self.settings_touched.notified() => touched = true,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }
}
