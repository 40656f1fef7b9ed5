//! Observability: per-worker metric shards and their Prometheus exposition; W3C trace context,
//! request spans and their OTLP exporter.

pub mod metrics;
pub mod otlp;
pub mod trace;
