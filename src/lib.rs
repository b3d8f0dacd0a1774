//! acr-task: run ACR Tasks (`acb.yaml`) task files on a local Docker Engine, with an
//! integrated OCI registry. See ARCHITECTURE.md for the map of modules.

pub mod agent;
pub mod auth;
pub mod background;
pub mod cli;
pub mod credentials;
pub mod digest;
pub mod dockerfile;
pub mod exec;
pub mod hlc;
pub mod listen;
pub mod metrics;
pub mod names;
pub mod netaddr;
pub mod pg;
pub mod plan;
pub mod policy;
pub mod registry;
pub mod relay;
pub mod replication;
pub mod runtime;
pub mod server;
pub mod setup;
pub mod signature;
pub mod source;
pub mod store;
pub mod task;
pub mod template;
pub mod tier;
pub mod timefmt;
pub mod triggers;
pub mod webhooks;
