//! The registry-wide settings every replica holds alike: scope maps, tokens (with their
//! password hashes, so a token's password works on each), webhooks, and the registry's
//! own settings (anonymous pull, the retention policy, content trust and its policies, as
//! one record: a push refused by a trust policy at one replica is refused at all). The
//! tier is not among them (every member is Premium while it has replications), nor what
//! is each server's own (its storage, encryption key, the operator's overrides). Each
//! setting has a
//! clock in `replication.db`: the fingerprint of its record as last seen here and the
//! stamp of its last change. A change made here, by whatever path (the API, the commands
//! on the files, a template's deploy), is found by comparing fingerprints and stamped
//! then; the others' changes are taken by the last-writer rule, a delete as a change like
//! any other. Blocking: call from blocking threads.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::store::{ConfigClock, ReplicationStore};
use super::{ReplicationError, Stamp};
use crate::auth::records::{Insert, Removal, TokenRecord};
use crate::auth::ScopeMap;
use crate::hlc::{Hlc, CLOCK};
use crate::tier::{ContentTrust, Properties, RetentionPolicy};
use crate::webhooks::WebhookStore;

pub const SCOPE_MAP: &str = "scopeMap";
pub const TOKEN: &str = "token";
pub const WEBHOOK: &str = "webhook";
/// The registry's own settings: one record, named [`SETTINGS`].
pub const REGISTRY: &str = "registry";
pub const SETTINGS: &str = "settings";

/// Where this server keeps the registry-wide settings.
#[derive(Clone, Copy)]
pub struct Places<'a> {
    pub auth: &'a crate::auth::Auth,
    pub hooks: &'a WebhookStore,
    pub registry: &'a crate::store::Store,
}

/// The registry's settings kept alike on every replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RegistrySettings {
    anonymous_pull: bool,
    retention: Option<RetentionPolicy>,
    content_trust: Option<ContentTrust>,
}

impl RegistrySettings {
    fn of(p: &Properties) -> RegistrySettings {
        RegistrySettings {
            anonymous_pull: p.anonymous_pull,
            retention: p.retention,
            content_trust: p.content_trust.clone(),
        }
    }
}

/// One setting as replicas send it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Item {
    pub kind: String,
    pub name: String,
    pub hlc: String,
    pub origin: String,
    pub deleted: bool,
    /// The record (none for a delete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<Value>,
}

type Key = (String, String);

fn fingerprint(v: &Value) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(
        serde_json::to_vec(v).unwrap_or_default(),
    ))
}

fn token_json(t: &TokenRecord) -> Value {
    json!({ "info": t.info, "hashes": t.hashes })
}

fn webhook_json(h: &crate::webhooks::Webhook) -> Value {
    json!({ "info": h.info, "headers": h.headers, "secret": h.secret })
}

/// Every setting this server holds now, by (kind, name).
pub fn holdings(at: Places<'_>) -> Result<BTreeMap<Key, Value>, ReplicationError> {
    let mut out = BTreeMap::new();
    let records = at.auth.store().records();
    for m in records.scope_maps()? {
        out.insert((SCOPE_MAP.to_string(), m.name.clone()), json!(m));
    }
    for t in records.tokens()? {
        if let Some(rec) = records.token(&t.name)? {
            out.insert((TOKEN.to_string(), t.name.clone()), token_json(&rec));
        }
    }
    for h in at.hooks.records().all()? {
        out.insert((WEBHOOK.to_string(), h.info.name.clone()), webhook_json(&h));
    }
    out.insert(
        (REGISTRY.to_string(), SETTINGS.to_string()),
        registry_json(at.registry)?,
    );
    Ok(out)
}

fn registry_json(store: &crate::store::Store) -> Result<Value, ReplicationError> {
    let p = store
        .properties()
        .map_err(|e| ReplicationError::Refused(format!("the registry's settings: {e}")))?;
    Ok(json!(RegistrySettings::of(&p)))
}

fn clocks_by_key(rs: &ReplicationStore) -> Result<HashMap<Key, ConfigClock>, ReplicationError> {
    Ok(rs
        .config_clocks()?
        .into_iter()
        .map(|c| ((c.kind.clone(), c.name.clone()), c))
        .collect())
}

/// Stamps what changed here since it was last seen: made or changed (its fingerprint
/// differs), or deleted (held no more). True when anything did.
pub fn scan(
    rs: &ReplicationStore,
    held: &BTreeMap<Key, Value>,
    me: &str,
) -> Result<bool, ReplicationError> {
    let clocks = clocks_by_key(rs)?;
    let mut changed = false;
    let stamp = || Stamp {
        hlc: CLOCK.tick(),
        origin: me.to_string(),
    };
    for ((kind, name), v) in held {
        let fp = fingerprint(v);
        let seen = clocks.get(&(kind.clone(), name.clone()));
        if seen.is_some_and(|c| !c.deleted && c.fingerprint == fp) {
            continue;
        }
        rs.set_config_clock(&ConfigClock {
            kind: kind.clone(),
            name: name.clone(),
            fingerprint: fp,
            stamp: stamp(),
            deleted: false,
        })?;
        changed = true;
    }
    for (key, c) in &clocks {
        if !c.deleted && !held.contains_key(key) {
            rs.set_config_clock(&ConfigClock {
                fingerprint: String::new(),
                stamp: stamp(),
                deleted: true,
                ..c.clone()
            })?;
            changed = true;
        }
    }
    Ok(changed)
}

/// A server joining a group takes the registry-wide settings as the group has them
/// (`invited`, the inviter's with their clocks): its own clocks are replaced by ones
/// older than any change, so each of the group's settings wins over its own of the same
/// name, and clocks kept from an earlier group go (their deletes would reach this one).
/// Then what only it has is stamped now, so it reaches the others as a change and no two
/// joiners' settings tie. One of the group's that cannot be taken now (a token whose
/// scope map is not here yet) is reported and taken with the group's next sending.
pub fn join_group(
    at: Places<'_>,
    rs: &ReplicationStore,
    me: &str,
    invited: Vec<Item>,
) -> Result<(), ReplicationError> {
    let before_all = Stamp {
        hlc: Hlc { ms: 0, n: 0 },
        origin: String::new(),
    };
    let clocks: Vec<ConfigClock> = holdings(at)?
        .into_iter()
        .map(|((kind, name), v)| ConfigClock {
            kind,
            name,
            fingerprint: fingerprint(&v),
            stamp: before_all.clone(),
            deleted: false,
        })
        .collect();
    rs.reset_config_clocks(&clocks)?;
    let group_has: std::collections::HashSet<Key> = invited
        .iter()
        .map(|i| (i.kind.clone(), i.name.clone()))
        .collect();
    if let Err(e) = apply(at, rs, me, invited) {
        tracing::warn!(error = %e, "taking the registry's settings when joining");
    }
    // Only what the group does not have: one it has but that could not be taken here
    // keeps its clock from before any change, so the group's wins when it comes again.
    for c in rs.config_clocks()? {
        if c.stamp == before_all && !group_has.contains(&(c.kind.clone(), c.name.clone())) {
            rs.set_config_clock(&ConfigClock {
                stamp: Stamp {
                    hlc: CLOCK.tick(),
                    origin: me.to_string(),
                },
                ..c
            })?;
        }
    }
    Ok(())
}

/// Whether this server keeps settings of `kind`: those of other kinds (sent by a newer
/// member) are passed over, so the ones it knows are still applied.
fn known(kind: &str) -> bool {
    [SCOPE_MAP, TOKEN, WEBHOOK, REGISTRY].contains(&kind)
}

/// Everything to send another replica: every clock, with the record where one is held.
pub fn items(
    rs: &ReplicationStore,
    held: &BTreeMap<Key, Value>,
) -> Result<Vec<Item>, ReplicationError> {
    Ok(rs
        .config_clocks()?
        .into_iter()
        .map(|c| Item {
            record: if c.deleted {
                None
            } else {
                held.get(&(c.kind.clone(), c.name.clone())).cloned()
            },
            kind: c.kind,
            name: c.name,
            hlc: c.stamp.hlc.to_string(),
            origin: c.stamp.origin,
            deleted: c.deleted,
        })
        .collect())
}

/// A digest of the clocks: the state sent once is not sent again while it stays.
pub fn state_digest(rs: &ReplicationStore) -> Result<String, ReplicationError> {
    let clocks: Vec<(String, String, String, String, bool)> = rs
        .config_clocks()?
        .into_iter()
        .map(|c| {
            (
                c.kind,
                c.name,
                c.stamp.hlc.to_string(),
                c.stamp.origin,
                c.deleted,
            )
        })
        .collect();
    Ok(fingerprint(&json!(clocks)))
}

/// Applies what wins over this server's clocks (scope maps before the tokens bound to
/// them; deletes of tokens before their scope maps'). Returns how many were applied.
pub fn apply(
    at: Places<'_>,
    rs: &ReplicationStore,
    me: &str,
    mut items: Vec<Item>,
) -> Result<usize, ReplicationError> {
    scan(rs, &holdings(at)?, me)?;
    let clocks = clocks_by_key(rs)?;
    let rank = |i: &Item| match (i.deleted, i.kind.as_str()) {
        (false, SCOPE_MAP) => 0,
        (false, _) => 1,
        (true, TOKEN) | (true, WEBHOOK) => 2,
        (true, _) => 3,
    };
    items.sort_by_key(rank);
    let (mut n, mut failed) = (0, Vec::new());
    for it in items {
        if !known(&it.kind) {
            tracing::warn!(kind = %it.kind, name = %it.name, "a kind of setting this server does not keep: passed over");
            continue;
        }
        let hlc: Hlc = it.hlc.parse().map_err(ReplicationError::Refused)?;
        CLOCK.observe(hlc).map_err(ReplicationError::Refused)?;
        let stamp = Stamp {
            hlc,
            origin: it.origin.clone(),
        };
        let key = (it.kind.clone(), it.name.clone());
        if !super::wins(&stamp, clocks.get(&key).map(|c| &c.stamp)) {
            continue;
        }
        let done = if it.deleted {
            remove(at, &it.kind, &it.name)
        } else {
            match it.record.clone() {
                Some(record) => put(at, &it.kind, &it.name, record),
                None => Err(ReplicationError::Refused(format!(
                    "{} {:?} came without its record",
                    it.kind, it.name
                ))),
            }
        };
        // One that cannot be applied here now (a token before its scope map, a scope map
        // still in use) keeps its clock, so it is tried again with the next state sent;
        // the others go on.
        if let Err(e) = done {
            failed.push(e.to_string());
            continue;
        }
        // What is held now is what the clock fingerprints (so it is not taken for a
        // change made here).
        let now = holdings_of(at, &it.kind, &it.name)?;
        rs.set_config_clock(&ConfigClock {
            kind: it.kind,
            name: it.name,
            fingerprint: now.as_ref().map(fingerprint).unwrap_or_default(),
            stamp,
            deleted: it.deleted,
        })?;
        n += 1;
    }
    if !failed.is_empty() {
        return Err(ReplicationError::Refused(format!(
            "{n} applied, {} not: {}",
            failed.len(),
            failed.join("; ")
        )));
    }
    Ok(n)
}

fn holdings_of(at: Places<'_>, kind: &str, name: &str) -> Result<Option<Value>, ReplicationError> {
    let records = at.auth.store().records();
    Ok(match kind {
        SCOPE_MAP => records.scope_map(name)?.map(|m| json!(m)),
        TOKEN => records.token(name)?.as_ref().map(token_json),
        WEBHOOK => at.hooks.records().get(name)?.as_ref().map(webhook_json),
        REGISTRY if name == SETTINGS => Some(registry_json(at.registry)?),
        _ => None,
    })
}

fn bad(kind: &str, name: &str, e: impl std::fmt::Display) -> ReplicationError {
    ReplicationError::Refused(format!("{kind} {name:?} as sent: {e}"))
}

fn put(at: Places<'_>, kind: &str, name: &str, record: Value) -> Result<(), ReplicationError> {
    let (records, hooks) = (at.auth.store().records(), at.hooks);
    match kind {
        SCOPE_MAP => {
            let m: ScopeMap = serde_json::from_value(record).map_err(|e| bad(kind, name, e))?;
            match records.scope_map(name)? {
                None => {
                    records.insert_scope_map(&m, None)?;
                }
                Some(cur) if cur == m => {}
                // Every rule out, the new ones in: the same rules as sent.
                Some(cur) => {
                    records.change_scope_map(name, &m.rules, &cur.rules, Some(&m.description))?;
                }
            }
        }
        TOKEN => {
            #[derive(Deserialize)]
            struct T {
                info: crate::auth::TokenInfo,
                hashes: [Option<String>; 2],
            }
            let t: T = serde_json::from_value(record).map_err(|e| bad(kind, name, e))?;
            let rec = TokenRecord {
                info: t.info,
                hashes: t.hashes,
            };
            let cur = records.token(name)?;
            if cur.as_ref() == Some(&rec) {
                return Ok(());
            }
            if cur.is_some() {
                records.delete_token(name)?;
            }
            if let Insert::NoScopeMap = records.insert_token(&rec, None)? {
                // The token as it was stays (so it is not taken for a delete made here).
                if let Some(cur) = &cur {
                    records.insert_token(cur, None)?;
                }
                return Err(ReplicationError::Refused(format!(
                    "token {name:?}: its scope map {:?} is not here yet",
                    rec.info.scope_map
                )));
            }
        }
        WEBHOOK => {
            #[derive(Deserialize)]
            struct H {
                info: crate::webhooks::WebhookInfo,
                headers: BTreeMap<String, String>,
                secret: Option<String>,
            }
            let h: H = serde_json::from_value(record).map_err(|e| bad(kind, name, e))?;
            let hook = crate::webhooks::Webhook {
                info: h.info,
                headers: h.headers,
                secret: h.secret,
            };
            if let Some(cur) = hooks.records().get(name)? {
                if webhook_json(&cur) == webhook_json(&hook) {
                    return Ok(());
                }
                hooks.records().delete(name)?;
            }
            hooks.records().insert(&hook, None)?;
        }
        REGISTRY if name == SETTINGS => {
            let want: RegistrySettings =
                serde_json::from_value(record).map_err(|e| bad(kind, name, e))?;
            // Checked as `registry update` checks these fields (days, policies' keys, what
            // the tier allows); the rest of this server's settings, and its storage, are
            // its own.
            if let Some(r) = &want.retention {
                r.check().map_err(|e| bad(kind, name, e))?;
            }
            if let Some(ct) = &want.content_trust {
                ct.check().map_err(|e| bad(kind, name, e))?;
            }
            let p = at
                .registry
                .update_properties(|now, _| {
                    let next = Properties {
                        anonymous_pull: want.anonymous_pull,
                        retention: want.retention,
                        content_trust: want.content_trust.clone(),
                        ..now.clone()
                    };
                    next.check_features()?;
                    Ok(next)
                })
                .map_err(|e| bad(kind, name, e))?;
            at.auth.set_stored_anonymous_pull(p.anonymous_pull);
        }
        other => return Err(bad(other, name, "not a kind of setting this server knows")),
    }
    Ok(())
}

fn remove(at: Places<'_>, kind: &str, name: &str) -> Result<(), ReplicationError> {
    let (auth, hooks) = (at.auth.store(), at.hooks);
    match kind {
        SCOPE_MAP => match auth.records().delete_scope_map(name)? {
            Removal::Done | Removal::NotFound => {}
            Removal::InUse(tokens) => {
                return Err(ReplicationError::Refused(format!(
                    "scope map {name:?} is still used here by {}",
                    tokens.join(", ")
                )))
            }
        },
        TOKEN => {
            auth.records().delete_token(name)?;
        }
        WEBHOOK => {
            hooks.records().delete(name)?;
        }
        REGISTRY => return Err(bad(kind, name, "the registry's settings are never deleted")),
        other => return Err(bad(other, name, "not a kind of setting this server knows")),
    }
    Ok(())
}
