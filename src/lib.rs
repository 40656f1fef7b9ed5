//! mcp-guard: a security gateway for MCP servers on a thread-per-core io_uring data plane.
//!
//! Module map (see `docs/architecture.md`): `runtime` starts the workers and the control loop;
//! `http` parses and writes HTTP/1.1 (server and upstream client); `mcp` holds the transport
//! rules, JSON-RPC classification and session ids; `pipeline` is the ordered request path;
//! `upstream` reaches MCP servers; `observe` and `admin` expose metrics; `error` maps every
//! early exit to its response.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod audit;
pub mod auth;
pub mod authz;
pub mod bytes;
pub mod cli;
pub mod config;
pub mod error;
pub mod facade;
pub mod http;
pub mod mcp;
pub mod observe;
pub mod pinning;
pub mod pipeline;
pub mod prehashed;
pub mod ratelimit;
pub mod rules;
pub mod runtime;
pub mod tls;
pub mod upstream;
