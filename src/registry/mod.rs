//! OCI registry.
