//! dockerfile
