//! Reaching MCP servers. HTTP upstreams use `http::client` directly from the pipeline; the
//! stdio hub lives here.

pub mod stdio;
