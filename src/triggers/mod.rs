//! What queues runs besides a user: git commits (signed webhooks, polling a remote
//! branch, watching a local repository), base-image updates in our registry, and cron
//! timers. These are the pure parts (verifying, parsing, matching, scheduling); `server`
//! wires them to the queue.

pub mod base_image;
pub mod cron;
pub mod git;
pub mod webhook;
