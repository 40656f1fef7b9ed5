//! Reaching MCP servers. HTTP upstreams use `http::client` directly from the pipeline; the
//! stdio hub lives here, with the isolated message router it (and later upstream kinds) share.

pub mod router;
pub mod stdio;
