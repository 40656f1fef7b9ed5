//! MCP specifics: Streamable HTTP transport rules, JSON-RPC classification, session ids.

pub mod approval;
pub mod filter;
pub mod json_scan;
pub mod jsonrpc;
pub mod legacy;
pub mod owed;
pub mod redact;
pub mod session;
pub mod transform;
pub mod transport;
