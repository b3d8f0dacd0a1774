//! Webhooks' records in PostgreSQL: the same [`WebhookRecords`] as [`super::sqlite`], in
//! tables of their own (`webhook_*`) in the database a shared registry lives in, so a
//! webhook made through one replica fires for pushes through any, and the outbox cursor
//! moves on for all. Counted inserts (the tier's webhook limit) take an advisory lock.

use std::collections::BTreeMap;

use tokio_postgres::Row;

use super::records::{Attempt, Insert, WebhookRecords};
use super::store::{Delivery, IntakeItem, Webhook, WebhookInfo};
use super::WebhookError;
use crate::pg::{args, Database, PgError, Target};

/// The schema, one entry per version (recorded in `acr_task_webhook_migrations`).
const MIGRATIONS: &[&str] = &["
CREATE TABLE webhook_hooks(
    name TEXT PRIMARY KEY, uri TEXT NOT NULL, actions TEXT NOT NULL, scope TEXT,
    headers TEXT NOT NULL, secret TEXT, created BIGINT NOT NULL, allow_private BOOLEAN NOT NULL);
CREATE TABLE webhook_deliveries(
    id TEXT PRIMARY KEY, webhook TEXT NOT NULL, event_id TEXT NOT NULL,
    action TEXT NOT NULL, payload TEXT NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL, next_attempt BIGINT NOT NULL,
    last_status INTEGER, last_error TEXT,
    created BIGINT NOT NULL, updated BIGINT NOT NULL, seq BIGSERIAL);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries(state, next_attempt);
CREATE INDEX webhook_deliveries_hook ON webhook_deliveries(webhook, created);
CREATE UNIQUE INDEX webhook_deliveries_event ON webhook_deliveries(webhook, event_id);
CREATE TABLE webhook_cursor(id INTEGER PRIMARY KEY CHECK (id = 1), seq BIGINT NOT NULL);
"];

/// The advisory lock counted inserts take ("acrhook").
const INSERT_LOCK: i64 = 0x0061_6372_686f_6f6b;

impl From<PgError> for WebhookError {
    fn from(e: PgError) -> WebhookError {
        WebhookError::Invalid(format!("webhook database: {e}"))
    }
}

fn col<'a, T: tokio_postgres::types::FromSql<'a>>(r: &'a Row, i: usize) -> Result<T, WebhookError> {
    r.try_get(i)
        .map_err(|e| WebhookError::Invalid(format!("webhook database: reading a row: {e}")))
}

/// [`WebhookRecords`] in a PostgreSQL database.
pub struct PgWebhooks {
    db: Database,
    location: String,
}

impl PgWebhooks {
    /// Connects to `target` and brings the webhook tables up to date.
    pub fn open(target: &Target) -> Result<PgWebhooks, WebhookError> {
        let db = Database::new(target, "acr-task-pg-webhooks")?;
        db.call(|mut c| async move {
            crate::pg::migrate(c.client()?, "acr_task_webhook_migrations", MIGRATIONS).await
        })?;
        let location = format!(
            "PostgreSQL database {} (webhook_* tables)",
            target.config.get_dbname().unwrap_or("?")
        );
        Ok(PgWebhooks { db, location })
    }
}

const HOOK_COLS: &str = "name, uri, actions, scope, headers, secret, created, allow_private";

fn hook_row(r: &Row) -> Result<Webhook, WebhookError> {
    let headers: String = col(r, 4)?;
    let headers: BTreeMap<String, String> = serde_json::from_str(&headers).unwrap_or_default();
    let actions: String = col(r, 2)?;
    let secret: Option<String> = col(r, 5)?;
    Ok(Webhook {
        info: WebhookInfo {
            name: col(r, 0)?,
            uri: col(r, 1)?,
            actions: actions.split(',').map(str::to_string).collect(),
            scope: col(r, 3)?,
            header_names: headers.keys().cloned().collect(),
            signed: secret.is_some(),
            allow_private: col(r, 7)?,
            created: col(r, 6)?,
        },
        headers,
        secret,
    })
}

const DELIVERY_COLS: &str = "id, webhook, event_id, action, state, attempts, last_status, \
    last_error, created, updated, payload, next_attempt";

fn delivery_row(r: &Row) -> Result<Delivery, WebhookError> {
    Ok(Delivery {
        id: col(r, 0)?,
        webhook: col(r, 1)?,
        event_id: col(r, 2)?,
        action: col(r, 3)?,
        state: col(r, 4)?,
        attempts: col::<i32>(r, 5)?.max(0) as u32,
        last_status: col::<Option<i32>>(r, 6)?.map(|s| s.clamp(0, u16::MAX as i32) as u16),
        last_error: col(r, 7)?,
        created: col(r, 8)?,
        updated: col(r, 9)?,
        payload: col(r, 10)?,
        next_attempt: col(r, 11)?,
    })
}

impl WebhookRecords for PgWebhooks {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn insert(&self, hook: &Webhook, max: Option<u64>) -> Result<Insert, WebhookError> {
        let i = hook.info.clone();
        let headers = serde_json::to_string(&hook.headers)
            .map_err(|e| WebhookError::Invalid(e.to_string()))?;
        let secret = hook.secret.clone();
        let mut tx = self.db.begin()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", args![INSERT_LOCK])?;
        if let Some(max) = max {
            let n = tx
                .query_opt("SELECT COUNT(*) FROM webhook_hooks", args![])?
                .map(|r| col::<i64>(&r, 0))
                .transpose()?
                .unwrap_or(0)
                .max(0) as u64;
            let named = tx
                .query_opt(
                    "SELECT 1 FROM webhook_hooks WHERE name = $1",
                    args![i.name.clone()],
                )?
                .is_some();
            if !named && n >= max {
                return Ok(Insert::Full(n));
            }
        }
        let n = tx.execute(
            "INSERT INTO webhook_hooks(name, uri, actions, scope, headers, secret, created,
                                       allow_private)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
            args![
                i.name,
                i.uri,
                i.actions.join(","),
                i.scope,
                headers,
                secret,
                i.created,
                i.allow_private
            ],
        )?;
        tx.commit()?;
        Ok(if n == 1 { Insert::Done } else { Insert::Exists })
    }

    fn delete(&self, name: &str) -> Result<bool, WebhookError> {
        let mut tx = self.db.begin()?;
        if tx.execute(
            "DELETE FROM webhook_hooks WHERE name = $1",
            args![name.to_string()],
        )? == 0
        {
            return Ok(false);
        }
        tx.execute(
            "DELETE FROM webhook_deliveries WHERE webhook = $1",
            args![name.to_string()],
        )?;
        tx.commit()?;
        Ok(true)
    }

    fn get(&self, name: &str) -> Result<Option<Webhook>, WebhookError> {
        self.db
            .query(
                &format!("SELECT {HOOK_COLS} FROM webhook_hooks WHERE name = $1"),
                args![name.to_string()],
            )?
            .first()
            .map(hook_row)
            .transpose()
    }

    fn all(&self) -> Result<Vec<Webhook>, WebhookError> {
        self.db
            .query(
                &format!("SELECT {HOOK_COLS} FROM webhook_hooks ORDER BY name"),
                args![],
            )?
            .iter()
            .map(hook_row)
            .collect()
    }

    fn cursor(&self) -> Result<Option<i64>, WebhookError> {
        self.db
            .query("SELECT seq FROM webhook_cursor WHERE id = 1", args![])?
            .first()
            .map(|r| col(r, 0))
            .transpose()
    }

    fn intake(&self, items: &[IntakeItem], cursor: i64, at: i64) -> Result<usize, WebhookError> {
        let mut tx = self.db.begin()?;
        let mut n = 0;
        for i in items {
            n += tx.execute(
                "INSERT INTO webhook_deliveries(id, webhook, event_id, action, payload, state,
                    attempts, next_attempt, created, updated)
                 VALUES ($1, $2, $3, $4, $5, 'pending', 0, $6, $6, $6) ON CONFLICT DO NOTHING",
                args![
                    uuid::Uuid::new_v4().to_string(),
                    i.webhook.clone(),
                    i.event_id.clone(),
                    i.action.clone(),
                    i.payload.clone(),
                    at
                ],
            )? as usize;
        }
        // The cursor only moves forward, whichever server read further first.
        tx.execute(
            "INSERT INTO webhook_cursor(id, seq) VALUES (1, $1)
             ON CONFLICT(id) DO UPDATE SET seq = GREATEST(webhook_cursor.seq, EXCLUDED.seq)",
            args![cursor],
        )?;
        tx.commit()?;
        Ok(n)
    }

    fn insert_delivery(&self, d: &Delivery) -> Result<(), WebhookError> {
        self.db.execute(
            "INSERT INTO webhook_deliveries(id, webhook, event_id, action, payload, state,
                attempts, next_attempt, created, updated, last_status, last_error)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            args![
                d.id.clone(),
                d.webhook.clone(),
                d.event_id.clone(),
                d.action.clone(),
                d.payload.clone(),
                d.state.clone(),
                d.attempts as i32,
                d.next_attempt,
                d.created,
                d.updated,
                d.last_status.map(i32::from),
                d.last_error.clone()
            ],
        )?;
        Ok(())
    }

    fn due(&self, now: i64, limit: u32) -> Result<Vec<Delivery>, WebhookError> {
        self.db
            .query(
                &format!(
                    "SELECT {DELIVERY_COLS} FROM webhook_deliveries WHERE state = 'pending'
                     AND next_attempt <= $1 ORDER BY next_attempt, created LIMIT $2"
                ),
                args![now, i64::from(limit)],
            )?
            .iter()
            .map(delivery_row)
            .collect()
    }

    fn next_due(&self) -> Result<Option<i64>, WebhookError> {
        self.db
            .query(
                "SELECT MIN(next_attempt) FROM webhook_deliveries WHERE state = 'pending'",
                args![],
            )?
            .first()
            .map(|r| col::<Option<i64>>(r, 0))
            .transpose()
            .map(Option::flatten)
    }

    fn record_attempt(&self, id: &str, a: &Attempt<'_>) -> Result<(), WebhookError> {
        self.db.execute(
            "UPDATE webhook_deliveries SET state = $2, attempts = attempts + 1, last_status = $3,
                last_error = $4, next_attempt = $5, updated = $6 WHERE id = $1",
            args![
                id.to_string(),
                a.state.to_string(),
                a.status.map(i32::from),
                a.error.map(str::to_string),
                a.next_attempt,
                a.at
            ],
        )?;
        Ok(())
    }

    fn history(&self, webhook: &str, limit: u32) -> Result<Vec<Delivery>, WebhookError> {
        self.db
            .query(
                &format!(
                    "SELECT {DELIVERY_COLS} FROM webhook_deliveries WHERE webhook = $1
                     ORDER BY created DESC, seq DESC LIMIT $2"
                ),
                args![webhook.to_string(), i64::from(limit)],
            )?
            .iter()
            .map(delivery_row)
            .collect()
    }
}
