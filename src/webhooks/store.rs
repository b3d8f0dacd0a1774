//! Webhooks and their delivery queue at rest in `<data dir>/webhooks.db` (SQLite, WAL,
//! FULL sync, mode 0600 since it holds signing secrets). A delivery row is written before
//! any attempt, so an undelivered event survives a restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

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

pub struct WebhookStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

/// `webhooks.db`'s schema, one entry per version (see [`crate::store::migrate`]).
const MIGRATIONS: &[crate::store::migrate::Migration] = &[
    crate::store::migrate::Migration::Sql(
        "CREATE TABLE IF NOT EXISTS webhooks(
                name TEXT PRIMARY KEY, uri TEXT NOT NULL, actions TEXT NOT NULL, scope TEXT,
                headers TEXT NOT NULL, secret TEXT, created INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS deliveries(
                id TEXT PRIMARY KEY, webhook TEXT NOT NULL, event_id TEXT NOT NULL,
                action TEXT NOT NULL, payload TEXT NOT NULL, state TEXT NOT NULL,
                attempts INTEGER NOT NULL, next_attempt INTEGER NOT NULL,
                last_status INTEGER, last_error TEXT,
                created INTEGER NOT NULL, updated INTEGER NOT NULL);
             CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, next_attempt);
             CREATE INDEX IF NOT EXISTS deliveries_hook ON deliveries(webhook, created);
             CREATE UNIQUE INDEX IF NOT EXISTS deliveries_event ON deliveries(webhook, event_id);
             CREATE TABLE IF NOT EXISTS cursor(
                id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL);",
    ),
    // 2: `allow_private`, off for webhooks made before it (refusing private destinations
    // they were never checked for is the safe reading); stores that had it already keep it.
    crate::store::migrate::Migration::Code(|c| {
        if !crate::store::migrate::has_column(c, "webhooks", "allow_private")? {
            c.execute_batch(
                "ALTER TABLE webhooks ADD COLUMN allow_private INTEGER NOT NULL DEFAULT 0",
            )?;
        }
        Ok(())
    }),
];

impl WebhookStore {
    pub fn open(dir: &Path) -> Result<WebhookStore, WebhookError> {
        // Webhook secrets.
        let (path, conn) = crate::store::migrate::open_private(dir, "webhooks.db", MIGRATIONS)?;
        Ok(WebhookStore {
            path,
            conn: Mutex::new(conn),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>, WebhookError> {
        self.conn
            .lock()
            .map_err(|_| WebhookError::Invalid("webhook store lock poisoned".into()))
    }

    pub fn create(&self, new: &NewWebhook<'_>) -> Result<WebhookInfo, WebhookError> {
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
        let headers_json =
            serde_json::to_string(headers).map_err(|e| WebhookError::Invalid(e.to_string()))?;
        let c = self.conn()?;
        let n = c.execute(
            "INSERT OR IGNORE INTO webhooks(name, uri, actions, scope, headers, secret, created,
                                            allow_private)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                name,
                uri,
                actions.join(","),
                scope,
                headers_json,
                secret,
                chrono::Utc::now().timestamp(),
                allow_private
            ],
        )?;
        if n == 0 {
            return Err(WebhookError::Exists(name.to_string()));
        }
        drop(c);
        self.get(name)?
            .map(|w| w.info)
            .ok_or_else(|| WebhookError::NotFound(name.to_string()))
    }

    pub fn delete(&self, name: &str) -> Result<(), WebhookError> {
        let c = self.conn()?;
        let n = c.execute("DELETE FROM webhooks WHERE name = ?1", params![name])?;
        if n == 0 {
            return Err(WebhookError::NotFound(name.to_string()));
        }
        // History goes with the webhook; pending deliveries would have nowhere to go.
        c.execute("DELETE FROM deliveries WHERE webhook = ?1", params![name])?;
        Ok(())
    }

    fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Webhook> {
        let headers: String = r.get(4)?;
        let headers: BTreeMap<String, String> = serde_json::from_str(&headers).unwrap_or_default();
        let actions: String = r.get(2)?;
        let secret: Option<String> = r.get(5)?;
        Ok(Webhook {
            info: WebhookInfo {
                name: r.get(0)?,
                uri: r.get(1)?,
                actions: actions.split(',').map(str::to_string).collect(),
                scope: r.get(3)?,
                header_names: headers.keys().cloned().collect(),
                signed: secret.is_some(),
                allow_private: r.get(7)?,
                created: r.get(6)?,
            },
            headers,
            secret,
        })
    }

    pub fn get(&self, name: &str) -> Result<Option<Webhook>, WebhookError> {
        let c = self.conn()?;
        Ok(c.query_row(
            "SELECT name, uri, actions, scope, headers, secret, created, allow_private FROM webhooks WHERE name = ?1",
            params![name],
            Self::row,
        )
        .optional()?)
    }

    pub fn all(&self) -> Result<Vec<Webhook>, WebhookError> {
        let c = self.conn()?;
        let mut st = c.prepare(
            "SELECT name, uri, actions, scope, headers, secret, created, allow_private FROM webhooks ORDER BY name",
        )?;
        let rows = st.query_map([], Self::row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Queue one event for one webhook: due now, or (`due: false`) held for the caller
    /// to attempt itself (a ping), which the background worker then leaves alone.
    /// How far the registry's event outbox has been read (None before the first start).
    pub fn cursor(&self) -> Result<Option<i64>, WebhookError> {
        let c = self.conn()?;
        Ok(
            c.query_row("SELECT seq FROM cursor WHERE id = 1", [], |r| r.get(0))
                .optional()?,
        )
    }

    /// Queues deliveries for events read from the outbox and moves the cursor past them,
    /// in one transaction. A delivery already queued for (webhook, event) is kept as is,
    /// so reading an event again after a crash queues nothing twice.
    pub fn intake(&self, items: &[IntakeItem], cursor: i64) -> Result<usize, WebhookError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        let t = now_ms();
        let mut n = 0;
        for i in items {
            n += tx.execute(
                "INSERT OR IGNORE INTO deliveries(id, webhook, event_id, action, payload, state,
                    attempts, next_attempt, created, updated)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'pending', 0, ?6, ?6, ?6)",
                params![
                    uuid::Uuid::new_v4().to_string(),
                    i.webhook,
                    i.event_id,
                    i.action,
                    i.payload,
                    t
                ],
            )?;
        }
        tx.execute(
            "INSERT INTO cursor(id, seq) VALUES (1, ?1)
             ON CONFLICT(id) DO UPDATE SET seq = excluded.seq",
            params![cursor],
        )?;
        tx.commit()?;
        Ok(n)
    }

    pub fn enqueue(
        &self,
        webhook: &str,
        event_id: &str,
        action: &str,
        payload: &str,
        due: bool,
    ) -> Result<Delivery, WebhookError> {
        let id = uuid::Uuid::new_v4().to_string();
        let t = now_ms();
        let next = if due { t } else { i64::MAX };
        let c = self.conn()?;
        c.execute(
            "INSERT INTO deliveries(id, webhook, event_id, action, payload, state, attempts,
                next_attempt, created, updated)
             VALUES (?1, ?2, ?3, ?4, ?5, 'pending', 0, ?7, ?6, ?6)",
            params![id, webhook, event_id, action, payload, t, next],
        )?;
        Ok(Delivery {
            id,
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
            next_attempt: next,
        })
    }

    const COLS: &'static str = "id, webhook, event_id, action, state, attempts, last_status, \
        last_error, created, updated, payload, next_attempt";

    fn delivery(r: &rusqlite::Row<'_>) -> rusqlite::Result<Delivery> {
        Ok(Delivery {
            id: r.get(0)?,
            webhook: r.get(1)?,
            event_id: r.get(2)?,
            action: r.get(3)?,
            state: r.get(4)?,
            attempts: r.get(5)?,
            last_status: r.get(6)?,
            last_error: r.get(7)?,
            created: r.get(8)?,
            updated: r.get(9)?,
            payload: r.get(10)?,
            next_attempt: r.get(11)?,
        })
    }

    /// Pending deliveries due by `now`, oldest first.
    pub fn due(&self, now: i64, limit: u32) -> Result<Vec<Delivery>, WebhookError> {
        let c = self.conn()?;
        let mut st = c.prepare(&format!(
            "SELECT {} FROM deliveries WHERE state = 'pending' AND next_attempt <= ?1
             ORDER BY next_attempt, created LIMIT ?2",
            Self::COLS
        ))?;
        let rows = st.query_map(params![now, limit], Self::delivery)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// When the next pending delivery is due, if any.
    pub fn next_due(&self) -> Result<Option<i64>, WebhookError> {
        let c = self.conn()?;
        Ok(c.query_row(
            "SELECT MIN(next_attempt) FROM deliveries WHERE state = 'pending'",
            [],
            |r| r.get(0),
        )?)
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
        let c = self.conn()?;
        c.execute(
            "UPDATE deliveries SET state = ?2, attempts = attempts + 1, last_status = ?3,
                last_error = ?4, next_attempt = ?5, updated = ?6 WHERE id = ?1",
            params![id, state, status, error, retry_at.unwrap_or(0), now_ms()],
        )?;
        Ok(())
    }

    /// Delivery history of a webhook, newest first.
    pub fn history(&self, webhook: &str, limit: u32) -> Result<Vec<Delivery>, WebhookError> {
        let c = self.conn()?;
        let mut st = c.prepare(&format!(
            "SELECT {} FROM deliveries WHERE webhook = ?1 ORDER BY created DESC, rowid DESC LIMIT ?2",
            Self::COLS
        ))?;
        let rows = st.query_map(params![webhook, limit], Self::delivery)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}
