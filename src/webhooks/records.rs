//! Webhooks' records behind one trait: subscriptions (with their secrets), the delivery
//! queue and its history, and how far the registry's outbox was read. SQLite
//! ([`super::sqlite::SqliteWebhooks`], `webhooks.db`) now; PostgreSQL later, without
//! touching [`super::WebhookStore`], which owns the rules (names, destinations, actions,
//! headers, retry states). Every call blocks and is one transaction.

use super::store::{Delivery, IntakeItem, Webhook};
use super::WebhookError;

/// Where webhooks' records are kept.
pub trait WebhookRecords: Send + Sync {
    /// Where the records live, for messages (a file, a database).
    fn location(&self) -> String;

    /// Adds a webhook unless one of that name, or `max` of them, exist.
    fn insert(&self, hook: &Webhook, max: Option<u64>) -> Result<Insert, WebhookError>;
    /// Deletes a webhook with its deliveries; false when there was none.
    fn delete(&self, name: &str) -> Result<bool, WebhookError>;
    fn get(&self, name: &str) -> Result<Option<Webhook>, WebhookError>;
    /// Every webhook, by name.
    fn all(&self) -> Result<Vec<Webhook>, WebhookError>;

    /// How far the registry's event outbox has been read (None before the first start).
    fn cursor(&self) -> Result<Option<i64>, WebhookError>;
    /// Queues a pending delivery per item, due at `at` (Unix ms), and moves the cursor, in
    /// one transaction. An item whose (webhook, event) is queued already is skipped.
    /// Returns how many were queued.
    fn intake(&self, items: &[IntakeItem], cursor: i64, at: i64) -> Result<usize, WebhookError>;
    /// Adds one delivery as given.
    fn insert_delivery(&self, d: &Delivery) -> Result<(), WebhookError>;
    /// Pending deliveries due by `now`, oldest first.
    fn due(&self, now: i64, limit: u32) -> Result<Vec<Delivery>, WebhookError>;
    /// When the next pending delivery is due, if any.
    fn next_due(&self) -> Result<Option<i64>, WebhookError>;
    /// Records one attempt: the new state, what the receiver said, when to try next.
    fn record_attempt(&self, id: &str, attempt: &Attempt<'_>) -> Result<(), WebhookError>;
    /// A webhook's deliveries, newest first.
    fn history(&self, webhook: &str, limit: u32) -> Result<Vec<Delivery>, WebhookError>;
}

/// What an insert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    Done,
    Exists,
    /// `max` exist already (how many there are).
    Full(u64),
}

/// The outcome of one delivery attempt, as stored.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    /// pending | delivered | failed
    pub state: &'a str,
    pub status: Option<u16>,
    pub error: Option<&'a str>,
    /// Unix ms of the next attempt (0 when there is none).
    pub next_attempt: i64,
    /// Unix ms of this attempt.
    pub at: i64,
}
