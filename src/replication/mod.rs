//! Geo-replication (`acr-task replication`, as `az acr replication`): `serve` instances,
//! each a region with its own data directory, that keep one registry in step. Any of them
//! accepts pushes and deletes; each sends the changes it accepted to every other, from
//! its event outbox (so nothing accepted is lost to a crash or a restart), and the other
//! pulls what it lacks from it by digest, as an import does. Content is addressed by
//! digest, so it converges by itself; a tag converges on its last write by a hybrid
//! logical clock ([`crate::hlc`]): the change with the greater (time, region) wins everywhere.
//! Deletes leave tombstones with their time, so an older push that arrives later does not
//! bring back what was deleted.
//!
//! The plain data is here: replicas as the commands show them, the rule that picks a
//! tag's winner. `store` keeps the group (`replication.db`), `service` does the work
//! (sending, applying, backfilling a new replica), the peer routes and the API.

pub mod config;
pub mod service;
pub mod store;

use serde::{Deserialize, Serialize};

pub use crate::auth::REPLICATION_USER;

/// A replica of the group as every member knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    /// Its region name (`westeurope`).
    pub name: String,
    /// Where the others reach it (`https://acr-west.internal:5000`).
    pub url: String,
    /// Serves clients (false: kept in step, but clients are sent elsewhere).
    #[serde(default = "yes")]
    pub region_endpoint_enabled: bool,
}

fn yes() -> bool {
    true
}

/// A change's place in the order every replica agrees on: its clock time, then the
/// region that accepted it (two regions never make the same time twice apart from that).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp {
    pub hlc: crate::hlc::Hlc,
    pub origin: String,
}

/// Whether a change stamped `incoming` replaces what `stored` says: the later one wins.
/// Nothing stored yet: it wins.
pub fn wins(incoming: &Stamp, stored: Option<&Stamp>) -> bool {
    stored.is_none_or(|s| incoming > s)
}

/// A replica as `replication list` and `show` print it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationInfo {
    pub name: String,
    pub url: String,
    /// The server answering (its home region for the commands run against it).
    #[serde(default)]
    pub this_server: bool,
    pub region_endpoint_enabled: bool,
    /// `Ready` once it holds everything this server had when it joined (its backfill
    /// done); `Backfilling` until then.
    pub status: String,
    /// Of the backfill: (manifests sent, manifests to send).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backfill: Option<(u64, u64)>,
    /// Events accepted here not yet applied there.
    pub lag_events: u64,
    /// How old the oldest of them is.
    pub lag_seconds: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When an event or the backfill last reached it (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync: Option<String>,
    #[serde(with = "crate::timefmt::secs")]
    pub created: i64,
}

/// What the API's `POST /api/registry/replications` takes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NewReplication {
    pub name: String,
    pub url: String,
    /// The new replica's admin login (or a token allowed everything): used once, to join.
    pub username: String,
    pub password: String,
    /// This server's region name, when it starts the group (default `home`).
    #[serde(default)]
    pub home_name: Option<String>,
    /// The URL the others reach this server at, when it starts the group.
    #[serde(default)]
    pub home_url: Option<String>,
}

/// What a new replica is told when it joins (`POST /api/registry/replications/join`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Join {
    /// The group's secret: replicas present it to each other.
    pub secret: String,
    /// The joining replica's own name and URL in the group.
    pub me: Member,
    /// Every other member.
    pub members: Vec<Member>,
    /// The member list's version (see [`store::Group::version`]).
    #[serde(default)]
    pub version: String,
    /// The registry-wide settings as the inviting member holds them: the joiner takes
    /// them before it serves anything of the group's.
    #[serde(default)]
    pub settings: Vec<config::Item>,
}

/// Region names: what ACR allows for a replication's name (letters and digits, 5 to 50),
/// loosened to 1 to 50 and inner hyphens; not `join`.
pub fn valid_name(name: &str) -> bool {
    // `join` is a route of the API beside the replicas' names.
    name != "join"
        && !name.is_empty()
        && name.len() <= 50
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;

    fn st(ms: u64, n: u32, origin: &str) -> Stamp {
        Stamp {
            hlc: Hlc { ms, n },
            origin: origin.into(),
        }
    }

    #[test]
    fn the_later_change_wins_and_the_region_breaks_a_tie() {
        assert!(wins(&st(5, 0, "a"), None));
        assert!(wins(&st(5, 1, "a"), Some(&st(5, 0, "b"))));
        assert!(!wins(&st(4, 9, "z"), Some(&st(5, 0, "a"))));
        // The same time from two regions: the greater name, on every replica alike.
        assert!(wins(&st(5, 0, "b"), Some(&st(5, 0, "a"))));
        assert!(!wins(&st(5, 0, "a"), Some(&st(5, 0, "b"))));
        // The same change again changes nothing.
        assert!(!wins(&st(5, 0, "a"), Some(&st(5, 0, "a"))));
    }

    #[test]
    fn region_names() {
        assert!(valid_name("westeurope") && valid_name("us-east-2"));
        assert!(!valid_name("") && !valid_name("-x") && !valid_name("a b"));
        assert!(!valid_name("join"));
        assert!(!valid_name(&"a".repeat(51)));
    }
}

/// What replication's work can fail with, in the user's words.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("replication data: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("replication data: {0}")]
    Migrate(#[from] crate::store::migrate::MigrateError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    #[error(transparent)]
    Webhooks(#[from] crate::webhooks::WebhookError),
    /// Refused, with the reason and the fix (HTTP 400/409 at the API).
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    NotFound(String),
    /// Another replica could not be reached or refused (HTTP 502 at the API).
    #[error("{0}")]
    Peer(String),
}

impl ReplicationError {
    /// The HTTP status the API answers it with.
    pub fn status(&self) -> u16 {
        use crate::store::StoreError;
        match self {
            ReplicationError::Refused(_) | ReplicationError::Store(StoreError::Refused(_)) => 409,
            ReplicationError::Store(StoreError::Limit(_)) => 403,
            ReplicationError::NotFound(_) => 404,
            ReplicationError::Peer(_) => 502,
            _ => 500,
        }
    }
}
