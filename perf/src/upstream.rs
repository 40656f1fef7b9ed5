//! The mock MCP upstream: a small, fast Streamable HTTP server (keep-alive, one runtime per
//! thread on a shared listener) answering initialize, notifications, tools/list, and tools/call
//! `echo` (JSON) or `echo_sse` (one SSE event), so it is never what a measurement measures.

use crate::wire::{self, Request};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::borrow::Cow;
use std::cell::Cell;
use std::net::{SocketAddr, TcpListener};
use std::rc::Rc;

/// What the mock serves.
pub struct MockOptions {
    pub listen: SocketAddr,
    /// Tools listed by tools/list (at least `echo` and `echo_sse`).
    pub tools: usize,
    /// Runtime threads accepting on the one listener.
    pub threads: usize,
    /// Each tools/list answer's list differs from every other (see [`Mock::fresh_at`]).
    pub fresh_lists: bool,
}

/// Per-thread state: the pre-rendered tools/list result and a session counter.
struct Mock {
    /// The serialized `result` of tools/list, rendered once: re-serializing ~20 KiB per request
    /// would make the mock the bottleneck of the big-list scenario.
    tools_result: String,
    /// Where in `tools_result` each answer writes its own number, when lists are fresh: in
    /// the middle tool's description, so that no list is one a gateway scanned before and
    /// each shares its first half and its end with the others (the hardest to tell apart).
    fresh_at: Option<usize>,
    /// tools/list answers given (the number a fresh list carries).
    lists: Cell<u64>,
    thread: usize,
    sessions: Cell<u64>,
}

impl Mock {
    fn new(tools: usize, fresh_lists: bool, thread: usize) -> Mock {
        let tools_result = tools_list_result(tools).to_string();
        let fresh_at = fresh_lists.then(|| {
            let marker = format!("Synthetic tool number {}", tools / 2);
            tools_result
                .find(&marker)
                .map_or(tools_result.len() / 2, |at| at + marker.len())
        });
        Mock {
            tools_result,
            fresh_at,
            lists: Cell::new(0),
            thread,
            sessions: Cell::new(0),
        }
    }
}

/// Binds, prints `listening on http://ADDR` (the only stdout line), and serves until killed.
pub fn serve(opts: &MockOptions) -> Result<(), String> {
    if !opts.listen.ip().is_loopback() {
        return Err(format!(
            "refusing to listen on non-loopback address {}",
            opts.listen
        ));
    }
    let listener = TcpListener::bind(opts.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", opts.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read bound address: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("cannot make listener non-blocking: {e}"))?;
    let mut threads = Vec::new();
    for thread in 0..opts.threads.max(1) {
        let listener = listener
            .try_clone()
            .map_err(|e| format!("cannot share listener: {e}"))?;
        let (tools, fresh_lists) = (opts.tools, opts.fresh_lists);
        let handle = std::thread::Builder::new()
            .name(format!("mock-{thread}"))
            .spawn(move || {
                let mock = Rc::new(Mock::new(tools, fresh_lists, thread));
                let mut runtime = crate::runtime()?;
                runtime.block_on(accept_loop(listener, mock))
            })
            .map_err(|e| format!("cannot start mock thread: {e}"))?;
        threads.push(handle);
    }
    println!("listening on http://{addr}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    for handle in threads {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("a mock upstream thread panicked".into()),
        }
    }
    Ok(())
}

async fn accept_loop(listener: TcpListener, mock: Rc<Mock>) -> Result<(), String> {
    let listener = monoio::net::TcpListener::from_std(listener)
        .map_err(|e| format!("cannot adopt listener: {e}"))?;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                monoio::spawn(serve_connection(stream, mock.clone()));
            }
            // Out of descriptors or similar: back off instead of spinning.
            Err(_) => monoio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

async fn serve_connection(mut stream: monoio::net::TcpStream, mock: Rc<Mock>) {
    let mut buf = Vec::with_capacity(16 * 1024);
    loop {
        let request = match wire::parse_request(&buf) {
            Ok(Some(r)) => r,
            Ok(None) => {
                let (result, b) = wire::read_more(&mut stream, buf).await;
                buf = b;
                match result {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
            Err(e) => {
                let body = format!("bad request: {e}\n").into_bytes();
                let _ = wire::write_all(&mut stream, response(400, "text/plain", &[], &body, true))
                    .await;
                return;
            }
        };
        buf.drain(..request.consumed);
        let bytes = mock.answer(&request);
        if wire::write_all(&mut stream, bytes).await.is_err() || request.close {
            return;
        }
    }
}

impl Mock {
    fn answer(&self, req: &Request) -> Vec<u8> {
        if req.path.split('?').next() != Some("/mcp") {
            return response(404, "text/plain", &[], b"not found\n", false);
        }
        if req.method != "POST" {
            return response(
                405,
                "text/plain",
                &[("Allow", "POST")],
                b"method not allowed\n",
                false,
            );
        }
        let message: Message = match serde_json::from_slice(&req.body) {
            Ok(m) => m,
            Err(e) => {
                return rpc_error_response(400, &Value::Null, -32700, &format!("parse error: {e}"));
            }
        };
        let method = message.method.as_deref().unwrap_or_default();
        let Some(raw_id) = message.id else {
            // A notification (or a response from the client): accepted, nothing to say.
            return response(202, "text/plain", &[], b"", false);
        };
        // The id goes back verbatim (it is JSON text already); the rare paths below that build
        // a `Value` parse it once.
        let id = raw_id.get();
        let value_id = || serde_json::from_str::<Value>(id).unwrap_or(Value::Null);
        if method == "initialize" {
            let serial = self.sessions.get();
            self.sessions.set(serial + 1);
            let session = format!("perf-{}-{serial}", self.thread);
            let version = message
                .params
                .as_ref()
                .and_then(|p| p.protocol_version.as_deref())
                .unwrap_or("2025-11-25");
            let result = json!({
                "protocolVersion": version,
                "capabilities": {"tools": {"listChanged": false}},
                "serverInfo": {"name": "perf-mock-upstream", "version": env!("CARGO_PKG_VERSION")},
            });
            return json_response(
                &[("Mcp-Session-Id", &session)],
                &rpc_result(&value_id(), result),
            );
        }
        // Real servers refuse a session-less request; doing the same proves sessions survive the hop.
        if req.session_id.is_none() {
            return rpc_error_response(
                400,
                &value_id(),
                -32600,
                "Mcp-Session-Id header is required",
            );
        }
        match method {
            "ping" => json_response(&[], &rpc_result(&value_id(), json!({}))),
            "tools/list" => {
                let body = match self.fresh_at {
                    None => format!(
                        r#"{{"jsonrpc":"2.0","id":{id},"result":{}}}"#,
                        self.tools_result
                    ),
                    Some(at) => {
                        let n = self.lists.get() + 1;
                        self.lists.set(n);
                        let (before, after) = self.tools_result.split_at(at);
                        format!(
                            r#"{{"jsonrpc":"2.0","id":{id},"result":{before} (mock {} list {n}){after}}}"#,
                            self.thread
                        )
                    }
                };
                response(200, "application/json", &[], body.as_bytes(), false)
            }
            "tools/call" => {
                let params = message.params.as_ref();
                let name = params.and_then(|p| p.name.as_deref()).unwrap_or_default();
                let text = params
                    .and_then(|p| p.arguments.as_ref())
                    .and_then(|a| a.text)
                    .map_or("null", |t| t.get());
                // Written out rather than built as a `Value`: this is the measured request, and
                // the mock's own cost per request is load-side CPU that the target's runs share.
                let message = format!(
                    r#"{{"jsonrpc":"2.0","id":{id},"result":{{"content":[{{"type":"text","text":{text}}}],"isError":false}}}}"#
                );
                match name {
                    "echo" => response(200, "application/json", &[], message.as_bytes(), false),
                    "echo_sse" => sse_response(&message),
                    _ => json_response(
                        &[],
                        &rpc_error(&value_id(), -32602, &format!("unknown tool {name:?}")),
                    ),
                }
            }
            _ => json_response(
                &[],
                &rpc_error(&value_id(), -32601, &format!("method {method:?} not found")),
            ),
        }
    }
}

/// The members of a JSON-RPC message the mock looks at, borrowed from the body: deserializing
/// only these, rather than a whole `Value` tree, keeps the mock cheap per request.
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    method: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    params: Option<Params<'a>>,
}

#[derive(Deserialize)]
struct Params<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default, rename = "protocolVersion")]
    protocol_version: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    arguments: Option<Arguments<'a>>,
}

#[derive(Deserialize)]
struct Arguments<'a> {
    #[serde(borrow, default)]
    text: Option<&'a RawValue>,
}

fn tools_list_result(count: usize) -> Value {
    let schema =
        json!({"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]});
    let mut tools = vec![
        json!({"name": "echo", "description": "Echoes its text argument as JSON.", "inputSchema": schema}),
        json!({"name": "echo_sse", "description": "Echoes its text argument as one SSE event.", "inputSchema": schema}),
    ];
    for n in tools.len()..count {
        tools.push(json!({
            "name": format!("tool_{n:03}"),
            "description": format!("Synthetic tool number {n}, listed to give tools/list a realistic size."),
            "inputSchema": schema,
        }));
    }
    json!({"tools": tools})
}

fn rpc_result(id: &Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

fn rpc_error(id: &Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

fn rpc_error_response(status: u16, id: &Value, code: i64, message: &str) -> Vec<u8> {
    let body = serde_json::to_vec(&rpc_error(id, code, message)).unwrap_or_default();
    response(status, "application/json", &[], &body, false)
}

fn json_response(extra: &[(&str, &str)], message: &Value) -> Vec<u8> {
    let body = serde_json::to_vec(message).unwrap_or_default();
    response(200, "application/json", extra, &body, false)
}

/// One `message` event (`message` is JSON text), chunked as a streaming server would send it,
/// then the end of stream.
fn sse_response(message: &str) -> Vec<u8> {
    let event = format!("event: message\ndata: {message}\n\n");
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";
    format!("{head}{:x}\r\n{event}\r\n0\r\n\r\n", event.len()).into_bytes()
}

fn response(
    status: u16,
    content_type: &str,
    extra: &[(&str, &str)],
    body: &[u8],
    close: bool,
) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Method Not Allowed",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mock() -> Mock {
        Mock::new(100, false, 0)
    }

    fn post(body: &str, session: bool) -> Request {
        Request {
            method: "POST".into(),
            path: "/mcp".into(),
            session_id: session.then(|| "s".to_string()),
            close: false,
            body: body.as_bytes().to_vec(),
            consumed: 0,
        }
    }

    #[test]
    fn initialize_gives_a_session_and_calls_need_it() {
        let m = mock();
        let init = m.answer(&post(
            r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}"#,
            false,
        ));
        let resp = wire::parse_response(&init, false).unwrap().unwrap();
        assert!(resp.session_id.is_some());
        let call = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hi"}}}"#;
        assert_eq!(
            wire::parse_response(&m.answer(&post(call, false)), false)
                .unwrap()
                .unwrap()
                .status,
            400
        );
        let ok = wire::parse_response(&m.answer(&post(call, true)), false)
            .unwrap()
            .unwrap();
        assert!(wire::find(&ok.body, b"\"hi\"").is_some());
    }

    #[test]
    fn echo_returns_id_and_text_verbatim() {
        let m = mock();
        let call = r#"{"jsonrpc":"2.0","id":"a-7","method":"tools/call","params":{"arguments":{"text":"q\"uote"},"name":"echo"}}"#;
        let ok = wire::parse_response(&m.answer(&post(call, true)), false)
            .unwrap()
            .unwrap();
        let body: Value = serde_json::from_slice(&ok.body).unwrap();
        assert_eq!(body["id"], "a-7");
        assert_eq!(
            body.pointer("/result/content/0/text"),
            Some(&json!("q\"uote"))
        );
        assert_eq!(body["result"]["isError"], false);
        let unknown = r#"{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"nope"}}"#;
        let err = wire::parse_response(&m.answer(&post(unknown, true)), false)
            .unwrap()
            .unwrap();
        let body: Value = serde_json::from_slice(&err.body).unwrap();
        assert_eq!(
            (body["id"].as_i64(), body["error"]["code"].as_i64()),
            (Some(8), Some(-32602))
        );
        let bad = m.answer(&post("{not json", true));
        assert_eq!(
            wire::parse_response(&bad, false).unwrap().unwrap().status,
            400
        );
    }

    #[test]
    fn sse_and_tools_list() {
        let m = mock();
        let call = r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"echo_sse","arguments":{"text":"x"}}}"#;
        let sse = wire::parse_response(&m.answer(&post(call, true)), false)
            .unwrap()
            .unwrap();
        assert!(sse.body.starts_with(b"event: message\ndata: {"));
        let list = m.answer(&post(
            r#"{"jsonrpc":"2.0","id":4,"method":"tools/list"}"#,
            true,
        ));
        let body: Value =
            serde_json::from_slice(&wire::parse_response(&list, false).unwrap().unwrap().body)
                .unwrap();
        assert_eq!(
            body.pointer("/result/tools")
                .and_then(Value::as_array)
                .map(Vec::len),
            Some(100)
        );
        let note = m.answer(&post(
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
            true,
        ));
        assert_eq!(
            wire::parse_response(&note, false).unwrap().unwrap().status,
            202
        );
    }
}
