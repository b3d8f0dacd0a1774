//! Webhooks' records in SQLite (`<data dir>/webhooks.db`, WAL, FULL sync, mode 0600 since
//! it holds signing secrets).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension};

use super::records::{Attempt, Insert, WebhookRecords};
use super::store::{Delivery, IntakeItem, Webhook, WebhookInfo};
use super::WebhookError;

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

/// [`WebhookRecords`] in one SQLite file.
pub struct SqliteWebhooks {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl SqliteWebhooks {
    /// Opens (creating and migrating if needed) `<dir>/webhooks.db`.
    pub fn open(dir: &Path) -> Result<SqliteWebhooks, WebhookError> {
        // Webhook secrets.
        let (path, conn) = crate::store::migrate::open_private(dir, "webhooks.db", MIGRATIONS)?;
        Ok(SqliteWebhooks {
            path,
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> Result<MutexGuard<'_, Connection>, WebhookError> {
        self.conn
            .lock()
            .map_err(|_| WebhookError::Invalid("webhook store lock poisoned".into()))
    }
}

const HOOK_COLS: &str = "name, uri, actions, scope, headers, secret, created, allow_private";

fn hook_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Webhook> {
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

const DELIVERY_COLS: &str = "id, webhook, event_id, action, state, attempts, last_status, \
    last_error, created, updated, payload, next_attempt";

fn delivery_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Delivery> {
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

impl WebhookRecords for SqliteWebhooks {
    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn insert(&self, hook: &Webhook, max: Option<u64>) -> Result<Insert, WebhookError> {
        let i = &hook.info;
        let headers = serde_json::to_string(&hook.headers)
            .map_err(|e| WebhookError::Invalid(e.to_string()))?;
        let mut c = self.conn()?;
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if let Some(max) = max {
            let n: i64 = tx.query_row("SELECT COUNT(*) FROM webhooks", [], |r| r.get(0))?;
            let n = n.max(0) as u64;
            let named = tx
                .query_row(
                    "SELECT 1 FROM webhooks WHERE name = ?1",
                    params![i.name],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if !named && n >= max {
                return Ok(Insert::Full(n));
            }
        }
        let n = tx.execute(
            "INSERT OR IGNORE INTO webhooks(name, uri, actions, scope, headers, secret, created,
                                            allow_private)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                i.name,
                i.uri,
                i.actions.join(","),
                i.scope,
                headers,
                hook.secret,
                i.created,
                i.allow_private
            ],
        )?;
        tx.commit()?;
        Ok(if n == 1 { Insert::Done } else { Insert::Exists })
    }

    fn delete(&self, name: &str) -> Result<bool, WebhookError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        if tx.execute("DELETE FROM webhooks WHERE name = ?1", params![name])? == 0 {
            return Ok(false);
        }
        tx.execute("DELETE FROM deliveries WHERE webhook = ?1", params![name])?;
        tx.commit()?;
        Ok(true)
    }

    fn get(&self, name: &str) -> Result<Option<Webhook>, WebhookError> {
        Ok(self
            .conn()?
            .query_row(
                &format!("SELECT {HOOK_COLS} FROM webhooks WHERE name = ?1"),
                params![name],
                hook_row,
            )
            .optional()?)
    }

    fn all(&self) -> Result<Vec<Webhook>, WebhookError> {
        let c = self.conn()?;
        let mut st = c.prepare(&format!("SELECT {HOOK_COLS} FROM webhooks ORDER BY name"))?;
        let rows = st.query_map([], hook_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn cursor(&self) -> Result<Option<i64>, WebhookError> {
        Ok(self
            .conn()?
            .query_row("SELECT seq FROM cursor WHERE id = 1", [], |r| r.get(0))
            .optional()?)
    }

    fn intake(&self, items: &[IntakeItem], cursor: i64, at: i64) -> Result<usize, WebhookError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
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
                    at
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

    fn insert_delivery(&self, d: &Delivery) -> Result<(), WebhookError> {
        self.conn()?.execute(
            "INSERT INTO deliveries(id, webhook, event_id, action, payload, state, attempts,
                next_attempt, created, updated, last_status, last_error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                d.id,
                d.webhook,
                d.event_id,
                d.action,
                d.payload,
                d.state,
                d.attempts,
                d.next_attempt,
                d.created,
                d.updated,
                d.last_status,
                d.last_error
            ],
        )?;
        Ok(())
    }

    fn due(&self, now: i64, limit: u32) -> Result<Vec<Delivery>, WebhookError> {
        let c = self.conn()?;
        let mut st = c.prepare(&format!(
            "SELECT {DELIVERY_COLS} FROM deliveries WHERE state = 'pending' AND next_attempt <= ?1
             ORDER BY next_attempt, created LIMIT ?2"
        ))?;
        let rows = st.query_map(params![now, limit], delivery_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn next_due(&self) -> Result<Option<i64>, WebhookError> {
        Ok(self.conn()?.query_row(
            "SELECT MIN(next_attempt) FROM deliveries WHERE state = 'pending'",
            [],
            |r| r.get(0),
        )?)
    }

    fn record_attempt(&self, id: &str, a: &Attempt<'_>) -> Result<(), WebhookError> {
        self.conn()?.execute(
            "UPDATE deliveries SET state = ?2, attempts = attempts + 1, last_status = ?3,
                last_error = ?4, next_attempt = ?5, updated = ?6 WHERE id = ?1",
            params![id, a.state, a.status, a.error, a.next_attempt, a.at],
        )?;
        Ok(())
    }

    fn history(&self, webhook: &str, limit: u32) -> Result<Vec<Delivery>, WebhookError> {
        let c = self.conn()?;
        let mut st = c.prepare(&format!(
            "SELECT {DELIVERY_COLS} FROM deliveries WHERE webhook = ?1
             ORDER BY created DESC, rowid DESC LIMIT ?2"
        ))?;
        let rows = st.query_map(params![webhook, limit], delivery_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}
