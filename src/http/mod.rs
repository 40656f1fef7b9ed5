//! HTTP/1.1 on httparse: request heads and bodies, responses, the client connection loop, and
//! the upstream client with its per-worker pool.

pub mod chunked;
pub mod client;
pub mod io;
pub mod request;
pub mod response;
pub mod server;
pub mod sse;
