//! Webhooks and their delivery queue: the plain types, and [`WebhookStore`], the rules
//! over [`WebhookRecords`] (`webhooks.db` by default).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::records::{Attempt, WebhookRecords};
use super::sqlite::SqliteWebhooks;
use super::WebhookError;

/// A webhook as listed: header values and the secret are never shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookInfo {
    pub name: String,
    pub uri: String,
    pub actions: Vec<String>,
    pub scope: Option<String>,
    pub header_names: Vec<String>,
    pub signed: bool,
    /// Created with `--allow-private-destination`: loopback and private addresses allowed.
    pub allow_private: bool,
    #[serde(with = "crate::timefmt::secs")]
    pub created: i64,
}

/// Everything needed to deliver (internal: holds the secret and header values).
#[derive(Clone)]
pub struct Webhook {
    pub info: WebhookInfo,
    pub headers: BTreeMap<String, String>,
    pub secret: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    pub id: String,
    pub webhook: String,
    pub event_id: String,
    pub action: String,
    /// pending | delivered | failed
    pub state: String,
    pub attempts: u32,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    /// Unix milliseconds.
    #[serde(with = "crate::timefmt::millis")]
    pub created: i64,
    #[serde(with = "crate::timefmt::millis")]
    pub updated: i64,
    #[serde(skip)]
    pub payload: String,
    #[serde(skip)]
    pub next_attempt: i64,
}

pub const ACTIONS: [&str; 2] = ["push", "delete"];

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// One delivery to queue from an outbox event.
#[derive(Debug, Clone)]
pub struct IntakeItem {
    pub webhook: String,
    pub event_id: String,
    pub action: String,
    pub payload: String,
}

/// A webhook to create.
#[derive(Debug, Clone, Copy)]
pub struct NewWebhook<'a> {
    pub name: &'a str,
    pub uri: &'a str,
    pub actions: &'a [String],
    pub scope: Option<&'a str>,
    pub headers: &'a BTreeMap<String, String>,
    pub secret: Option<&'a str>,
    /// `--allow-private-destination`: loopback and private receivers allowed.
    pub allow_private: bool,
}

impl<'a> NewWebhook<'a> {
    /// A webhook with no scope, headers or secret, for public receivers only.
    pub fn new(name: &'a str, uri: &'a str, actions: &'a [String]) -> NewWebhook<'a> {
        static NO_HEADERS: BTreeMap<String, String> = BTreeMap::new();
        NewWebhook {
            name,
            uri,
            actions,
            scope: None,
            headers: &NO_HEADERS,
            secret: None,
            allow_private: false,
        }
    }
}

/// Webhooks and their deliveries: the rules (names, destinations, actions, headers, retry
/// states) over [`WebhookRecords`], wherever those are kept. A delivery is recorded before
/// any attempt, so an undelivered event survives a restart.
pub struct WebhookStore {
    records: Box<dyn WebhookRecords>,
}

impl WebhookStore {
    /// Open (creating if needed) the records in `<dir>/webhooks.db`.
    pub fn open(dir: &Path) -> Result<WebhookStore, WebhookError> {
        Ok(WebhookStore::new(Box::new(SqliteWebhooks::open(dir)?)))
    }

    /// Over any backend's records.
    pub fn new(records: Box<dyn WebhookRecords>) -> WebhookStore {
        WebhookStore { records }
    }

    /// Where the records live, for messages.
    pub fn location(&self) -> String {
        self.records.location()
    }

    /// The records themselves, as geo-replication copies them between replicas.
    pub fn records(&self) -> &dyn WebhookRecords {
        self.records.as_ref()
    }

    /// Adds a webhook, within the number the registry's `tier` allows.
    pub fn create(
        &self,
        new: &NewWebhook<'_>,
        tier: &crate::tier::Properties,
    ) -> Result<WebhookInfo, WebhookError> {
        let NewWebhook {
            name,
            uri,
            actions,
            scope,
            headers,
            secret,
            allow_private,
        } = *new;
        let name_ok = !name.is_empty()
            && name.len() <= 50
            && name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
        if !name_ok {
            return Err(WebhookError::Invalid(format!(
                "invalid webhook name {name:?}: use 1-50 letters, digits, '-' or '_'"
            )));
        }
        super::client::check_uri(uri)?;
        super::client::check_destination(uri, allow_private)?;
        if actions.is_empty() {
            return Err(WebhookError::Invalid(
                "give at least one action (push, delete)".into(),
            ));
        }
        for a in actions {
            if !ACTIONS.contains(&a.as_str()) {
                return Err(WebhookError::Invalid(format!(
                    "unknown action {a:?} (push, delete)"
                )));
            }
        }
        if let Some(s) = scope {
            super::scope_matcher(s)?;
        }
        for (k, v) in headers {
            let ok_name = !k.is_empty()
                && k.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
            if !ok_name || v.bytes().any(|c| c == b'\r' || c == b'\n') {
                return Err(WebhookError::Invalid(format!("invalid header {k:?}")));
            }
        }
        let hook = Webhook {
            info: WebhookInfo {
                name: name.to_string(),
                uri: uri.to_string(),
                actions: actions.to_vec(),
                scope: scope.map(str::to_string),
                header_names: headers.keys().cloned().collect(),
                signed: secret.is_some(),
                allow_private,
                created: chrono::Utc::now().timestamp(),
            },
            headers: headers.clone(),
            secret: secret.map(str::to_string),
        };
        use super::records::Insert;
        match self.records.insert(&hook, tier.limits().webhooks)? {
            Insert::Done => {}
            Insert::Exists => return Err(WebhookError::Exists(name.to_string())),
            Insert::Full(n) => {
                return Err(tier
                    .check_count(crate::tier::Counted::Webhooks, n)
                    .err()
                    .map_or_else(
                        || WebhookError::Invalid("the tier's webhook limit was reached".into()),
                        WebhookError::Limit,
                    ))
            }
        }
        self.get(name)?
            .map(|w| w.info)
            .ok_or_else(|| WebhookError::NotFound(name.to_string()))
    }

    /// Deletes a webhook; its history goes with it (pending deliveries would have nowhere
    /// to go).
    pub fn delete(&self, name: &str) -> Result<(), WebhookError> {
        if !self.records.delete(name)? {
            return Err(WebhookError::NotFound(name.to_string()));
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Result<Option<Webhook>, WebhookError> {
        self.records.get(name)
    }

    pub fn all(&self) -> Result<Vec<Webhook>, WebhookError> {
        self.records.all()
    }

    /// How far the registry's event outbox has been read (None before the first start).
    pub fn cursor(&self) -> Result<Option<i64>, WebhookError> {
        self.records.cursor()
    }

    /// Queues deliveries for events read from the outbox and moves the cursor past them,
    /// in one transaction. A delivery already queued for (webhook, event) is kept as is,
    /// so reading an event again after a crash queues nothing twice.
    pub fn intake(&self, items: &[IntakeItem], cursor: i64) -> Result<usize, WebhookError> {
        self.records.intake(items, cursor, now_ms())
    }

    /// Queue one event for one webhook: due now, or (`due: false`) held for the caller
    /// to attempt itself (a ping), which the background worker then leaves alone.
    pub fn enqueue(
        &self,
        webhook: &str,
        event_id: &str,
        action: &str,
        payload: &str,
        due: bool,
    ) -> Result<Delivery, WebhookError> {
        let t = now_ms();
        let d = Delivery {
            id: uuid::Uuid::new_v4().to_string(),
            webhook: webhook.into(),
            event_id: event_id.into(),
            action: action.into(),
            state: "pending".into(),
            attempts: 0,
            last_status: None,
            last_error: None,
            created: t,
            updated: t,
            payload: payload.into(),
            next_attempt: if due { t } else { i64::MAX },
        };
        self.records.insert_delivery(&d)?;
        Ok(d)
    }

    /// Pending deliveries due by `now`, oldest first.
    pub fn due(&self, now: i64, limit: u32) -> Result<Vec<Delivery>, WebhookError> {
        self.records.due(now, limit)
    }

    /// When the next pending delivery is due, if any.
    pub fn next_due(&self) -> Result<Option<i64>, WebhookError> {
        self.records.next_due()
    }

    /// Record an attempt: delivered, or retry at `retry_at` (None = give up: failed).
    pub fn record(
        &self,
        id: &str,
        ok: bool,
        status: Option<u16>,
        error: Option<&str>,
        retry_at: Option<i64>,
    ) -> Result<(), WebhookError> {
        let state = if ok {
            "delivered"
        } else if retry_at.is_some() {
            "pending"
        } else {
            "failed"
        };
        self.records.record_attempt(
            id,
            &Attempt {
                state,
                status,
                error,
                next_attempt: retry_at.unwrap_or(0),
                at: now_ms(),
            },
        )
    }

    /// Delivery history of a webhook, newest first.
    pub fn history(&self, webhook: &str, limit: u32) -> Result<Vec<Delivery>, WebhookError> {
        self.records.history(webhook, limit)
    }
}
