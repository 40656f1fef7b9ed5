//! Observability: per-worker metric shards and their Prometheus exposition.

pub mod metrics;
