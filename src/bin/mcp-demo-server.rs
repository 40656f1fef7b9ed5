//! Owns the `mcp-demo-server` binary: a small, predictable MCP server (stdio and Streamable
//! HTTP transports, demo and test tools) that mcp-guard's demos and integration tests run behind
//! the gateway.
//!
//! With `--http ADDR --legacy-sse` the HTTP server also speaks the legacy HTTP+SSE transport
//! (protocol revision 2024-11-05) beside `/mcp`, so the gateway's SSE upstream can be tested:
//! `GET /sse` opens a session whose stream first names its POST endpoint in an `endpoint`
//! event (`/messages?session_id=<hex>`), and `POST /messages?session_id=<hex>` is answered
//! 202 while its responses and progress go out on that stream. `--legacy-endpoint` announces
//! an arbitrary (hostile) endpoint instead; closing the stream ends the session.
//!
//! With `--unauthorized` every HTTP request after the first `--unauthorized-after` (default 0)
//! is answered 401 with its own `WWW-Authenticate` challenge, as a server whose credentials
//! the gateway lacks would (test support: the gateway must never relay it).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::hash::{BuildHasher, RandomState};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde_json::{Map, Value, json};

const USAGE: &str = "usage: mcp-demo-server [--http ADDR [--legacy-sse [--legacy-endpoint URL]]] \
                     [--sse-responses] [--tools N] [--test-tools] [--name NAME] \
                     [--log-input FILE] [--tools-file FILE] [--unauthorized [--unauthorized-after N]]";
const SERVER_VERSION: &str = "0.1.0";
const LATEST_PROTOCOL_VERSION: &str = "2025-11-25";
const SUPPORTED_PROTOCOL_VERSIONS: [&str; 4] =
    ["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];

const TOOLS_PAGE_SIZE: usize = 50;
const TOOLS_CURSOR_PREFIX: &str = "tools-offset-";
/// Generated tool names are zero-padded to four digits, so more would break the naming pattern.
const MAX_GENERATED_TOOLS: usize = 10_000;
const MAX_SLEEP_MS: u64 = 60_000;
const MAX_PROGRESS_STEPS: u64 = 20;
const MAX_BIG_BYTES: u64 = 10_000_000;
const CRASH_EXIT_CODE: i32 = 3;
/// How long `ask_client` waits for the client's answer to its server-to-client request.
const ASK_CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
const README_URI: &str = "demo://readme";

const MCP_PATH: &str = "/mcp";
const SESSION_HEADER: &str = "mcp-session-id";
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Idle keep-alive connections are dropped after this, so abandoned sockets do not pin threads.
const IDLE_READ_TIMEOUT: Duration = Duration::from_secs(300);
const LEGACY_SSE_PATH: &str = "/sse";
const LEGACY_MESSAGES_PATH: &str = "/messages";
const LEGACY_SESSION_PARAM: &str = "session_id";
/// Replaced by the session id in a `--legacy-endpoint` announcement.
const SESSION_PLACEHOLDER: &str = "{session}";
const MAX_HTTP_LINE_BYTES: u64 = 16 * 1024;
const MAX_HTTP_HEADERS: usize = 100;
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
const RESOURCE_NOT_FOUND: i64 = -32002;
/// Only used in HTTP error bodies for unknown sessions (implementation-defined range).
const SESSION_NOT_FOUND: i64 = -32001;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|arg| arg == "-h" || arg == "--help") {
        println!("{USAGE}");
        return;
    }
    let config = parse_args(args).unwrap_or_else(|message| {
        eprintln!("mcp-demo-server: {message}\n{USAGE}");
        std::process::exit(2);
    });
    let outcome = match config.http_addr.clone() {
        Some(addr) => run_http(config, &addr),
        None => run_stdio(config),
    };
    if let Err(error) = outcome {
        eprintln!("mcp-demo-server: fatal: {error}");
        std::process::exit(1);
    }
}

#[derive(Default)]
struct Config {
    http_addr: Option<String>,
    sse_responses: bool,
    generated_tools: usize,
    test_tools: bool,
    server_name: String,
    /// Test support: every raw stdin line, or over HTTP every raw legacy `POST /messages` body,
    /// is appended here before any check or parsing, one per line. (`/mcp` bodies are not.)
    log_input: Option<String>,
    /// Serve the legacy HTTP+SSE transport beside `/mcp`.
    legacy_sse: bool,
    /// Test support: the `endpoint` event's data, verbatim but for `{session}`.
    legacy_endpoint: Option<String>,
    /// Test support: answer HTTP requests 401 with a challenge of its own.
    unauthorized: bool,
    /// Test support: how many requests are served before `unauthorized` starts.
    unauthorized_after: u64,
    /// Test support: a JSON array of tool definitions read at every `tools/list`, each
    /// replacing the catalogue's tool of its name or added after them (a server whose tools
    /// change under a running client).
    tools_file: Option<String>,
}

fn parse_args(args: Vec<String>) -> Result<Config, String> {
    let mut config = Config {
        server_name: "mcp-demo-server".to_string(),
        ..Config::default()
    };
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--http" => config.http_addr = Some(value()?),
            "--name" => config.server_name = value()?,
            "--tools" => {
                let raw = value()?;
                config.generated_tools = raw
                    .parse()
                    .ok()
                    .filter(|&count| count <= MAX_GENERATED_TOOLS)
                    .ok_or_else(|| format!("--tools wants 0..={MAX_GENERATED_TOOLS}, got {raw}"))?;
            }
            "--sse-responses" => config.sse_responses = true,
            "--test-tools" => config.test_tools = true,
            "--log-input" => config.log_input = Some(value()?),
            "--tools-file" => config.tools_file = Some(value()?),
            "--legacy-sse" => config.legacy_sse = true,
            "--legacy-endpoint" => config.legacy_endpoint = Some(value()?),
            "--unauthorized" => config.unauthorized = true,
            "--unauthorized-after" => {
                let raw = value()?;
                config.unauthorized_after = raw
                    .parse()
                    .map_err(|_| format!("--unauthorized-after wants a count, got {raw}"))?;
            }
            _ => return Err(format!("unknown argument: {flag}")),
        }
    }
    if config.legacy_sse && config.http_addr.is_none() {
        return Err("--legacy-sse needs --http ADDR".to_string());
    }
    if config.legacy_endpoint.is_some() && !config.legacy_sse {
        return Err("--legacy-endpoint needs --legacy-sse".to_string());
    }
    Ok(config)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    Stdio,
    Http,
}

/// An open `GET /mcp` stream; dropping its sender ends the stream.
struct EventStream {
    session_id: String,
    sender: Sender<Value>,
}

struct Server {
    config: Config,
    transport: Transport,
    tool_catalogue: Vec<Value>,
    stdout: Mutex<io::Stdout>,
    sessions: Mutex<HashSet<String>>,
    last_request_headers: Mutex<Map<String, Value>>,
    event_streams: Mutex<Vec<EventStream>>,
    /// Open legacy `GET /sse` streams by session id. Only this map holds the senders, so
    /// removing an entry is what ends the stream, and sends after that go nowhere.
    legacy_sessions: Mutex<HashMap<String, Sender<Value>>>,
    input_log: Mutex<Option<File>>,
    /// Server-to-client requests (`ask_client`) waiting for the client's response, by id.
    awaiting_client: Mutex<HashMap<String, Sender<Value>>>,
    next_server_request: AtomicU64,
}

/// A panicking thread must not take the whole server down with it, so poisoned locks are reused.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Server {
    fn new(config: Config, transport: Transport) -> io::Result<Self> {
        let input_log = match &config.log_input {
            Some(path) => Some(
                File::options()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|error| io::Error::new(error.kind(), format!("{path}: {error}")))?,
            ),
            None => None,
        };
        Ok(Server {
            tool_catalogue: build_tool_catalogue(&config),
            input_log: Mutex::new(input_log),
            legacy_sessions: Mutex::new(HashMap::new()),
            config,
            transport,
            stdout: Mutex::new(io::stdout()),
            sessions: Mutex::new(HashSet::new()),
            last_request_headers: Mutex::new(Map::new()),
            event_streams: Mutex::new(Vec::new()),
            awaiting_client: Mutex::new(HashMap::new()),
            next_server_request: AtomicU64::new(1),
        })
    }

    /// Appends one raw input record to the `--log-input` file (flushed, newline-terminated).
    fn log_input(&self, record: &[u8]) {
        let mut log = lock(&self.input_log);
        let Some(file) = log.as_mut() else { return };
        let mut record = record.to_vec();
        if record.last() != Some(&b'\n') {
            record.push(b'\n');
        }
        if let Err(error) = file.write_all(&record).and_then(|()| file.flush()) {
            eprintln!("mcp-demo-server: cannot write the input log: {error}");
        }
    }

    /// Queues a message for a legacy session's stream; a session that is gone drops it.
    fn send_legacy(&self, session_id: &str, message: Value) {
        if let Some(sender) = lock(&self.legacy_sessions).get(session_id) {
            // Fails only while the stream is being torn down; the message has nowhere to go.
            let _ = sender.send(message);
        }
    }

    /// Writes and flushes one line under the lock, so concurrent handlers never interleave.
    fn write_stdout_line(&self, line: &str) {
        let mut stdout = lock(&self.stdout);
        if let Err(error) = writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
            eprintln!("mcp-demo-server: cannot write to stdout: {error}");
        }
    }

    /// Delivers a server-initiated notification that belongs to no particular request.
    fn broadcast(&self, notification: &Value) {
        match self.transport {
            Transport::Stdio => self.write_stdout_line(&notification.to_string()),
            Transport::Http => {
                lock(&self.event_streams)
                    .retain(|stream| stream.sender.send(notification.clone()).is_ok());
                lock(&self.legacy_sessions)
                    .retain(|_, sender| sender.send(notification.clone()).is_ok());
            }
        }
    }

    fn record_request_headers(&self, headers: &[(String, String)]) {
        let mut recorded = Map::new();
        for (name, value) in headers {
            let merged = match recorded.get(name).and_then(Value::as_str) {
                Some(previous) => format!("{previous}, {value}"),
                None => value.clone(),
            };
            recorded.insert(name.clone(), Value::String(merged));
        }
        *lock(&self.last_request_headers) = recorded;
    }
}

// --- JSON-RPC -------------------------------------------------------------------------------

struct RpcError {
    code: i64,
    message: String,
    data: Option<Value>,
}

fn rpc_error(code: i64, message: impl Into<String>) -> RpcError {
    RpcError {
        code,
        message: message.into(),
        data: None,
    }
}

fn invalid_params(message: impl Into<String>) -> RpcError {
    rpc_error(INVALID_PARAMS, message)
}

/// Why a request produced no ordinary result: a JSON-RPC error, or the `crash` test tool.
enum Failure {
    Rpc(RpcError),
    Crash,
}

impl From<RpcError> for Failure {
    fn from(error: RpcError) -> Self {
        Failure::Rpc(error)
    }
}

/// What the transport must do once a message (or batch) has been handled.
enum Outcome {
    Respond(Value),
    Silent,
    Crash,
}

enum Envelope<'a> {
    Request {
        id: &'a Value,
        method: &'a str,
        params: Option<&'a Value>,
    },
    NoReplyNeeded,
}

type Params<'a> = Option<&'a Map<String, Value>>;
type Arguments = Map<String, Value>;
/// Delivers request-scoped notifications (progress) wherever the transport can carry them.
type Emit<'a> = &'a mut dyn FnMut(Value);
type Handled = Result<Value, Failure>;

fn error_response(id: Value, error: RpcError) -> Value {
    let mut body = json!({"code": error.code, "message": error.message});
    if let (Some(data), Some(fields)) = (error.data, body.as_object_mut()) {
        fields.insert("data".to_string(), data);
    }
    json!({"jsonrpc": "2.0", "id": id, "error": body})
}

fn parse_error_response(error: &serde_json::Error) -> Value {
    let error = rpc_error(PARSE_ERROR, format!("Parse error: {error}"));
    error_response(Value::Null, error)
}

fn notification(method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "method": method, "params": params})
}

fn classify(message: &Value) -> Result<Envelope<'_>, (Value, RpcError)> {
    let invalid = |id: Value, why: &str| {
        Err((
            id,
            rpc_error(INVALID_REQUEST, format!("Invalid Request: {why}")),
        ))
    };
    let Some(fields) = message.as_object() else {
        return invalid(Value::Null, "message must be a JSON object");
    };
    let id = fields.get("id");
    let id_for_errors = id.filter(|id| id.is_string() || id.is_number()).cloned();
    let id_for_errors = id_for_errors.unwrap_or(Value::Null);
    if fields.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return invalid(id_for_errors, "jsonrpc must be \"2.0\"");
    }
    if id.is_some_and(|id| !(id.is_string() || id.is_number() || id.is_null())) {
        return invalid(Value::Null, "id must be a string or a number");
    }
    match (fields.get("method"), id) {
        (Some(Value::String(method)), Some(id)) => {
            let params = fields.get("params");
            if params.is_some_and(|params| !params.is_object() && !params.is_array()) {
                return invalid(id_for_errors, "params must be an object or an array");
            }
            Ok(Envelope::Request { id, method, params })
        }
        // Client notifications, and client responses (we never send requests), need no reply.
        (Some(Value::String(_)), None) => Ok(Envelope::NoReplyNeeded),
        (None, Some(_)) if fields.contains_key("result") || fields.contains_key("error") => {
            Ok(Envelope::NoReplyNeeded)
        }
        (Some(_), _) => invalid(id_for_errors, "method must be a string"),
        (None, _) => invalid(id_for_errors, "missing method"),
    }
}

/// Handles one parsed payload: a single message or a batch.
fn handle_payload(server: &Server, payload: &Value, emit: Emit<'_>) -> Outcome {
    let Value::Array(batch) = payload else {
        return handle_message(server, payload, emit);
    };
    if batch.is_empty() {
        let error = rpc_error(INVALID_REQUEST, "Invalid Request: empty batch");
        return Outcome::Respond(error_response(Value::Null, error));
    }
    let mut responses = Vec::new();
    for message in batch {
        match handle_message(server, message, emit) {
            Outcome::Respond(response) => responses.push(response),
            Outcome::Silent => {}
            Outcome::Crash => return Outcome::Crash,
        }
    }
    if responses.is_empty() {
        Outcome::Silent
    } else {
        Outcome::Respond(Value::Array(responses))
    }
}

fn handle_message(server: &Server, message: &Value, emit: Emit<'_>) -> Outcome {
    let (id, method, params) = match classify(message) {
        Err((id, error)) => return Outcome::Respond(error_response(id, error)),
        Ok(Envelope::NoReplyNeeded) => return Outcome::Silent,
        Ok(Envelope::Request { id, method, params }) => (id, method, params),
    };
    match dispatch_request(server, method, params.and_then(Value::as_object), emit) {
        Ok(result) => Outcome::Respond(json!({"jsonrpc": "2.0", "id": id, "result": result})),
        Err(Failure::Rpc(error)) => Outcome::Respond(error_response(id.clone(), error)),
        Err(Failure::Crash) => Outcome::Crash,
    }
}

fn dispatch_request(server: &Server, method: &str, params: Params<'_>, emit: Emit<'_>) -> Handled {
    match method {
        "initialize" => Ok(initialize_result(server, params)),
        "ping" | "logging/setLevel" => Ok(json!({})),
        "tools/list" => Ok(list_tools(server, params)?),
        "tools/call" => call_tool(server, params, emit),
        "resources/list" => Ok(json!({"resources": [
            {"uri": README_URI, "name": "readme", "mimeType": "text/plain"}
        ]})),
        "resources/templates/list" => Ok(json!({"resourceTemplates": []})),
        "resources/read" => Ok(read_resource(params)?),
        "prompts/list" => Ok(json!({"prompts": [{
            "name": "greeting",
            "description": "Greets someone by name.",
            "arguments": [{"name": "name", "description": "Who to greet.", "required": true}],
        }]})),
        "prompts/get" => Ok(get_prompt(params)?),
        _ => Err(rpc_error(METHOD_NOT_FOUND, format!("Method not found: {method}")).into()),
    }
}

fn param<'a>(params: Params<'a>, key: &str) -> Option<&'a Value> {
    params.and_then(|params| params.get(key))
}

fn progress_token(params: Params<'_>) -> Option<&Value> {
    param(params, "_meta")
        .and_then(|meta| meta.get("progressToken"))
        .filter(|token| token.is_string() || token.is_number())
}

fn progress_notification(token: &Value, progress: u64, total: u64) -> Value {
    let params = json!({"progressToken": token, "progress": progress, "total": total});
    notification("notifications/progress", params)
}

// --- MCP methods ----------------------------------------------------------------------------

fn initialize_result(server: &Server, params: Params<'_>) -> Value {
    let protocol_version = param(params, "protocolVersion")
        .and_then(Value::as_str)
        .filter(|version| SUPPORTED_PROTOCOL_VERSIONS.contains(version))
        .unwrap_or(LATEST_PROTOCOL_VERSION);
    json!({
        "protocolVersion": protocol_version,
        "capabilities": {
            "tools": {"listChanged": true}, "resources": {}, "prompts": {}, "logging": {}
        },
        "serverInfo": {"name": server.config.server_name, "version": SERVER_VERSION},
    })
}

fn build_tool_catalogue(config: &Config) -> Vec<Value> {
    let integer = |maximum: u64| json!({"type": "integer", "minimum": 0, "maximum": maximum});
    let no_arguments = json!({"type": "object", "properties": {}});
    let mut tools = vec![
        json!({"name": "echo", "description": "Returns `text` unchanged.", "inputSchema": {
            "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}),
        json!({"name": "add", "description": "Returns the sum of `a` and `b` as text.",
            "inputSchema": {"type": "object", "required": ["a", "b"],
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}),
        json!({"name": "sleep", "description": "Waits `ms` milliseconds, then answers.",
            "inputSchema": {"type": "object", "required": ["ms"],
                "properties": {"ms": integer(MAX_SLEEP_MS)}}}),
        json!({"name": "progress", "description":
                "Sends `steps` progress notifications (given a progressToken), then answers.",
            "inputSchema": {"type": "object", "required": ["steps"],
                "properties": {"steps": integer(MAX_PROGRESS_STEPS)}}}),
        json!({"name": "notify", "description": "Emits notifications/tools/list_changed.",
            "inputSchema": no_arguments}),
    ];
    if config.test_tools {
        tools.extend([
            json!({"name": "crash", "inputSchema": no_arguments,
                "description": "Test: exits with status 3 (stdio) or drops the connection (HTTP)."}),
            json!({"name": "last_request_headers", "inputSchema": no_arguments,
                "description": "Test: the HTTP headers received with this request, as JSON text."}),
            json!({"name": "big", "description": "Test: returns `bytes` 'x' characters.",
                "inputSchema": {"type": "object", "required": ["bytes"],
                    "properties": {"bytes": integer(MAX_BIG_BYTES)}}}),
            json!({"name": "slow_progress", "description":
                    "Test: `steps` progress notifications (given a progressToken) `ms` apart, \
                     each with `message` = `label`, then answers.",
                "inputSchema": {"type": "object", "required": ["steps"],
                    "properties": {"steps": integer(MAX_PROGRESS_STEPS), "ms": integer(MAX_SLEEP_MS),
                        "label": {"type": "string"}}}}),
            json!({"name": "orphan_progress", "inputSchema": no_arguments, "description":
                    "Test: emits a progress notification for a token no request carries \
                     (`orphan-token`)."}),
            json!({"name": "ask_client", "description":
                    "Test (stdio): after `delay_ms`, sends the client a `method` request \
                     (`roots/list` by default) and answers with the client's response as text.",
                "inputSchema": {"type": "object", "properties": {
                    "method": {"type": "string"}, "delay_ms": integer(MAX_SLEEP_MS)}}}),
        ]);
    }
    tools.extend((0..config.generated_tools).map(|index| {
        let name = format!("tool_{index:04}");
        let description = format!("Generated tool {index}.");
        json!({"name": name, "description": description, "inputSchema": no_arguments})
    }));
    tools
}

fn list_tools(server: &Server, params: Params<'_>) -> Result<Value, RpcError> {
    let catalogue = current_catalogue(server);
    let total = catalogue.len();
    let start = match param(params, "cursor") {
        None | Some(Value::Null) => 0,
        Some(Value::String(cursor)) => cursor
            .strip_prefix(TOOLS_CURSOR_PREFIX)
            .and_then(|offset| offset.parse::<usize>().ok())
            .filter(|&offset| offset <= total)
            .ok_or_else(|| invalid_params("Invalid cursor"))?,
        Some(_) => return Err(invalid_params("cursor must be a string")),
    };
    let end = start.saturating_add(TOOLS_PAGE_SIZE).min(total);
    let mut result = json!({"tools": &catalogue[start..end]});
    if let (true, Some(fields)) = (end < total, result.as_object_mut()) {
        let next_cursor = format!("{TOOLS_CURSOR_PREFIX}{end}");
        fields.insert("nextCursor".to_string(), Value::String(next_cursor));
    }
    Ok(result)
}

/// The catalogue with `--tools-file`'s definitions over it (an unreadable file changes nothing).
fn current_catalogue(server: &Server) -> std::borrow::Cow<'_, [Value]> {
    let Some(path) = &server.config.tools_file else {
        return std::borrow::Cow::Borrowed(&server.tool_catalogue);
    };
    let Some(extra) = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_json::from_str::<Vec<Value>>(&text).ok())
    else {
        return std::borrow::Cow::Borrowed(&server.tool_catalogue);
    };
    let mut tools = server.tool_catalogue.clone();
    for tool in extra {
        let name = tool.get("name").cloned();
        match tools
            .iter_mut()
            .find(|t| name.is_some() && t.get("name") == name.as_ref())
        {
            Some(slot) => *slot = tool,
            None => tools.push(tool),
        }
    }
    std::borrow::Cow::Owned(tools)
}

fn call_tool(server: &Server, params: Params<'_>, emit: Emit<'_>) -> Result<Value, Failure> {
    let name = param(params, "name")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid_params("Missing tool name"))?;
    let no_arguments = Map::new();
    let arguments = match param(params, "arguments") {
        None | Some(Value::Null) => &no_arguments,
        Some(Value::Object(arguments)) => arguments,
        Some(_) => return Err(invalid_params("arguments must be an object").into()),
    };
    let test_tools = server.config.test_tools;
    let text = match name {
        "echo" => argument(arguments, "text", "a string", Value::as_str)?.to_string(),
        "add" => {
            let a = argument(arguments, "a", "a number", Value::as_number)?;
            let b = argument(arguments, "b", "a number", Value::as_number)?;
            // Exact integer arithmetic where possible, so 2 + 3 reads "5" and big ints stay exact.
            let integer_sum = a
                .as_i64()
                .zip(b.as_i64())
                .and_then(|(a, b)| a.checked_add(b));
            let float_sum = || a.as_f64().unwrap_or(f64::NAN) + b.as_f64().unwrap_or(f64::NAN);
            integer_sum.map_or_else(|| float_sum().to_string(), |sum| sum.to_string())
        }
        "sleep" => {
            let ms = bounded_integer(arguments, "ms", MAX_SLEEP_MS)?;
            thread::sleep(Duration::from_millis(ms));
            format!("slept {ms}ms")
        }
        "progress" => {
            let steps = bounded_integer(arguments, "steps", MAX_PROGRESS_STEPS)?;
            if let Some(token) = progress_token(params) {
                (1..=steps).for_each(|step| emit(progress_notification(token, step, steps)));
            }
            "done".to_string()
        }
        "notify" => {
            server.broadcast(&notification("notifications/tools/list_changed", json!({})));
            "notified".to_string()
        }
        "crash" if test_tools => return Err(Failure::Crash),
        // Only the HTTP transport records headers, so stdio naturally reports "{}".
        "last_request_headers" if test_tools => {
            Value::Object(lock(&server.last_request_headers).clone()).to_string()
        }
        "big" if test_tools => {
            let bytes = bounded_integer(arguments, "bytes", MAX_BIG_BYTES)?;
            "x".repeat(usize::try_from(bytes).unwrap_or(0))
        }
        "slow_progress" if test_tools => {
            let steps = bounded_integer(arguments, "steps", MAX_PROGRESS_STEPS)?;
            let ms = optional_integer(arguments, "ms", MAX_SLEEP_MS)?;
            let label = arguments.get("label").and_then(Value::as_str).unwrap_or("");
            for step in 1..=steps {
                thread::sleep(Duration::from_millis(ms));
                if let Some(token) = progress_token(params) {
                    let mut note = progress_notification(token, step, steps);
                    if let Some(fields) = note.get_mut("params").and_then(Value::as_object_mut) {
                        fields.insert("message".to_string(), Value::String(label.to_string()));
                    }
                    emit(note);
                }
            }
            "done".to_string()
        }
        "orphan_progress" if test_tools => {
            let params = json!({"progressToken": "orphan-token", "progress": 1, "total": 1});
            server.broadcast(&notification("notifications/progress", params));
            "orphaned".to_string()
        }
        "ask_client" if test_tools => ask_client(server, arguments)?,
        _ => match generated_tool_index(name, server.config.generated_tools) {
            Some(index) => format!("called tool_{index:04}"),
            None => return Err(invalid_params(format!("Unknown tool: {name}")).into()),
        },
    };
    Ok(json!({"content": [{"type": "text", "text": text}]}))
}

fn optional_integer(arguments: &Arguments, key: &str, maximum: u64) -> Result<u64, RpcError> {
    match arguments.get(key) {
        None | Some(Value::Null) => Ok(0),
        Some(_) => bounded_integer(arguments, key, maximum),
    }
}

/// The `ask_client` test tool: a server-to-client request over stdio, answered by the client.
fn ask_client(server: &Server, arguments: &Arguments) -> Result<String, RpcError> {
    if server.transport != Transport::Stdio {
        return Err(invalid_params("ask_client needs the stdio transport"));
    }
    let method = arguments.get("method").and_then(Value::as_str);
    let method = method.unwrap_or("roots/list");
    let delay = optional_integer(arguments, "delay_ms", MAX_SLEEP_MS)?;
    thread::sleep(Duration::from_millis(delay));
    let number = server.next_server_request.fetch_add(1, Ordering::Relaxed);
    let id = format!("srv-{number}");
    let (sender, receiver) = mpsc::channel();
    lock(&server.awaiting_client).insert(id.clone(), sender);
    let params = if method == "sampling/createMessage" {
        json!({"messages": [{"role": "user", "content": {"type": "text", "text": "hi"}}],
            "maxTokens": 10})
    } else {
        json!({})
    };
    let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
    server.write_stdout_line(&request.to_string());
    let answer = receiver.recv_timeout(ASK_CLIENT_TIMEOUT);
    lock(&server.awaiting_client).remove(&id);
    match answer {
        Ok(response) => match (response.get("result"), response.get("error")) {
            (Some(result), _) => Ok(result.to_string()),
            (None, Some(error)) => Ok(format!("client error: {error}")),
            (None, None) => Ok("client answered nothing".to_string()),
        },
        Err(_) => Err(rpc_error(
            INVALID_REQUEST,
            "the client did not answer in time",
        )),
    }
}

/// Hands a client's response to the `ask_client` call waiting for it; true when one was.
fn deliver_client_response(server: &Server, payload: &Value) -> bool {
    let is_response = payload.get("method").is_none()
        && (payload.get("result").is_some() || payload.get("error").is_some());
    let Some(id) = payload
        .get("id")
        .and_then(Value::as_str)
        .filter(|_| is_response)
    else {
        return false;
    };
    match lock(&server.awaiting_client).remove(id) {
        Some(sender) => sender.send(payload.clone()).is_ok(),
        None => false,
    }
}

fn generated_tool_index(name: &str, generated_tools: usize) -> Option<usize> {
    let digits = name.strip_prefix("tool_")?;
    let index: usize = digits.parse().ok()?;
    // Only the exact generated spelling names a tool (parse() also accepts "7" or "+007").
    (index < generated_tools && format!("{index:04}") == digits).then_some(index)
}

fn argument<'a, T>(
    arguments: &'a Arguments,
    key: &str,
    expected: &str,
    extract: impl FnOnce(&'a Value) -> Option<T>,
) -> Result<T, RpcError> {
    let value = arguments.get(key).and_then(extract);
    value.ok_or_else(|| invalid_params(format!("Argument '{key}' must be {expected}")))
}

fn bounded_integer(arguments: &Arguments, key: &str, maximum: u64) -> Result<u64, RpcError> {
    let expected = format!("an integer from 0 to {maximum}");
    argument(arguments, key, &expected, |value| {
        value.as_u64().filter(|&n| n <= maximum)
    })
}

fn read_resource(params: Params<'_>) -> Result<Value, RpcError> {
    let uri = param(params, "uri")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid_params("Missing resource uri"))?;
    if uri != README_URI {
        let mut error = rpc_error(RESOURCE_NOT_FOUND, "Resource not found");
        error.data = Some(json!({"uri": uri}));
        return Err(error);
    }
    let text = "mcp-demo-server readme";
    Ok(json!({"contents": [{"uri": README_URI, "mimeType": "text/plain", "text": text}]}))
}

fn get_prompt(params: Params<'_>) -> Result<Value, RpcError> {
    let name = param(params, "name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if name != "greeting" {
        return Err(invalid_params(format!("Unknown prompt: {name}")));
    }
    let who = param(params, "arguments")
        .and_then(|arguments| arguments.get("name"))
        .and_then(Value::as_str)
        .ok_or_else(|| invalid_params("Prompt argument 'name' must be a string"))?;
    let text = format!("Hello, {who}!");
    Ok(json!({"messages": [{"role": "user", "content": {"type": "text", "text": text}}]}))
}

// --- stdio transport ------------------------------------------------------------------------

fn run_stdio(config: Config) -> io::Result<()> {
    let server = Arc::new(Server::new(config, Transport::Stdio)?);
    eprintln!("mcp-demo-server: serving MCP on stdio");
    let mut input = io::stdin().lock();
    let mut in_flight: Vec<JoinHandle<()>> = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        server.log_input(&line);
        // Invalid UTF-8 turns into replacement characters and then fails JSON parsing (-32700).
        let text = String::from_utf8_lossy(&line);
        if text.trim().is_empty() {
            continue;
        }
        let payload: Value = match serde_json::from_str(&text) {
            Ok(payload) => payload,
            Err(error) => {
                server.write_stdout_line(&parse_error_response(&error).to_string());
                continue;
            }
        };
        if deliver_client_response(&server, &payload) {
            continue;
        }
        // Tool calls may be slow (sleep), so they get their own thread; everything else is
        // answered inline, which keeps e.g. initialize and tools/list strictly in order.
        let may_be_slow = payload.is_array()
            || payload.get("method").and_then(Value::as_str) == Some("tools/call");
        if !may_be_slow {
            answer_on_stdout(&server, &payload);
            continue;
        }
        in_flight.retain(|handle| !handle.is_finished());
        let worker_server = Arc::clone(&server);
        match thread::Builder::new().spawn(move || answer_on_stdout(&worker_server, &payload)) {
            Ok(handle) => in_flight.push(handle),
            Err(error) => eprintln!("mcp-demo-server: cannot spawn worker thread: {error}"),
        }
    }
    // Answer everything already received before exiting, so `printf ... | server` sees it all.
    for handle in in_flight {
        if handle.join().is_err() {
            eprintln!("mcp-demo-server: a worker thread panicked");
        }
    }
    Ok(())
}

fn answer_on_stdout(server: &Server, payload: &Value) {
    let mut emit = |message: Value| server.write_stdout_line(&message.to_string());
    match handle_payload(server, payload, &mut emit) {
        Outcome::Respond(response) => server.write_stdout_line(&response.to_string()),
        Outcome::Silent => {}
        Outcome::Crash => std::process::exit(CRASH_EXIT_CODE),
    }
}

// --- Streamable HTTP transport --------------------------------------------------------------

fn run_http(config: Config, addr: &str) -> io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    let local_addr = listener.local_addr()?;
    let server = Arc::new(Server::new(config, Transport::Http)?);
    // Tests read the port from this line, so it is the only thing ever written to stdout.
    server.write_stdout_line(&format!("listening on http://{local_addr}"));
    eprintln!("mcp-demo-server: serving MCP Streamable HTTP at http://{local_addr}{MCP_PATH}");
    if server.config.legacy_sse {
        eprintln!(
            "mcp-demo-server: serving legacy HTTP+SSE at http://{local_addr}{LEGACY_SSE_PATH}"
        );
    }
    for incoming in listener.incoming() {
        let stream = match incoming {
            Ok(stream) => stream,
            Err(error) => {
                eprintln!("mcp-demo-server: accept failed: {error}");
                continue;
            }
        };
        let connection_server = Arc::clone(&server);
        // Client disconnects surface as I/O errors; they are routine, so they go unlogged.
        let serve = move || drop(serve_connection(&connection_server, stream));
        if let Err(error) = thread::Builder::new().spawn(serve) {
            eprintln!("mcp-demo-server: cannot spawn connection thread: {error}");
        }
    }
    Ok(())
}

struct HttpRequest {
    method: String,
    path: String,
    /// The target's query string without the `?` (empty when there is none).
    query: String,
    is_http_10: bool,
    /// Names are lowercased; order and duplicates are kept.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpRequest {
    fn header(&self, name: &str) -> Option<&str> {
        let mut matching = self.headers.iter().filter(|(key, _)| key == name);
        matching.next().map(|(_, value)| value.as_str())
    }

    /// True when a comma-separated header (Connection, Transfer-Encoding, ...) lists `token`.
    fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(key, _)| key == name)
            .flat_map(|(_, value)| value.split(','))
            .any(|item| item.trim().eq_ignore_ascii_case(token))
    }

    fn keep_alive(&self) -> bool {
        let asked_for_keep_alive = self.header_has_token("connection", "keep-alive");
        !self.header_has_token("connection", "close") && (!self.is_http_10 || asked_for_keep_alive)
    }
}

enum ReadFailure {
    /// The peer went away (or idled out); there is nobody to answer.
    Closed,
    /// The request is malformed; answer with this status, then close.
    Rejected(u16, &'static str),
}

/// Any I/O failure while reading a request means the peer is gone or stalled.
impl From<io::Error> for ReadFailure {
    fn from(_: io::Error) -> Self {
        ReadFailure::Closed
    }
}

#[derive(PartialEq, Eq)]
enum ConnectionFate {
    KeepOpen,
    Close,
}

fn serve_connection(server: &Arc<Server>, stream: TcpStream) -> io::Result<()> {
    // Small SSE chunks must not wait for Nagle's algorithm.
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IDLE_READ_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let request = match read_request(&mut reader, &mut writer) {
            Ok(Some(request)) => request,
            Ok(None) | Err(ReadFailure::Closed) => return Ok(()),
            Err(ReadFailure::Rejected(status, why)) => {
                let mut exchange = Exchange::new(server, &mut writer, false);
                exchange.respond(status, &[TEXT_PLAIN], why.as_bytes())?;
                return Ok(());
            }
        };
        server.record_request_headers(&request.headers);
        let keep_alive = request.keep_alive();
        let fate = Exchange::new(server, &mut writer, keep_alive).route(&request)?;
        if fate == ConnectionFate::Close || !keep_alive {
            // Fails harmlessly when the peer has already gone.
            let _ = writer.shutdown(Shutdown::Both);
            return Ok(());
        }
    }
}

fn read_line_limited(reader: &mut impl BufRead) -> Result<Option<String>, ReadFailure> {
    let mut line = Vec::new();
    let mut limited = reader.by_ref().take(MAX_HTTP_LINE_BYTES);
    let read = limited.read_until(b'\n', &mut line)?;
    if read == 0 {
        return Ok(None);
    }
    if line.pop() != Some(b'\n') {
        return Err(if read as u64 >= MAX_HTTP_LINE_BYTES {
            ReadFailure::Rejected(431, "request line or header too long")
        } else {
            ReadFailure::Closed
        });
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

/// Reads one request; `writer` is only used to answer `Expect: 100-continue`.
fn read_request(
    reader: &mut impl BufRead,
    writer: &mut impl Write,
) -> Result<Option<HttpRequest>, ReadFailure> {
    // RFC 9112 lets servers skip empty lines before the request line.
    let request_line = loop {
        match read_line_limited(reader)? {
            None => return Ok(None),
            Some(line) if line.is_empty() => continue,
            Some(line) => break line,
        }
    };
    let parts: Vec<&str> = request_line.split_whitespace().collect();
    let [method, target, version] = parts[..] else {
        return Err(ReadFailure::Rejected(400, "malformed request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(ReadFailure::Rejected(505, "only HTTP/1.x is supported"));
    }
    let mut headers = Vec::new();
    loop {
        let line = read_line_limited(reader)?.ok_or(ReadFailure::Closed)?;
        if line.is_empty() {
            break;
        }
        if headers.len() >= MAX_HTTP_HEADERS {
            return Err(ReadFailure::Rejected(431, "too many headers"));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or(ReadFailure::Rejected(400, "malformed header line"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let mut request = HttpRequest {
        method: method.to_string(),
        path: target
            .split_once('?')
            .map_or(target, |(path, _query)| path)
            .to_string(),
        query: target
            .split_once('?')
            .map_or("", |(_path, query)| query)
            .to_string(),
        is_http_10: version == "HTTP/1.0",
        headers,
        body: Vec::new(),
    };
    if request.header_has_token("expect", "100-continue") {
        writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        writer.flush()?;
    }
    request.body = read_request_body(reader, &request)?;
    Ok(Some(request))
}

fn read_request_body(
    reader: &mut impl BufRead,
    request: &HttpRequest,
) -> Result<Vec<u8>, ReadFailure> {
    if request.header("transfer-encoding").is_some() {
        if !request.header_has_token("transfer-encoding", "chunked") {
            return Err(ReadFailure::Rejected(501, "unsupported transfer-encoding"));
        }
        return read_chunked_body(reader);
    }
    let Some(length) = request.header("content-length") else {
        return Ok(Vec::new());
    };
    let length: usize = length
        .parse()
        .map_err(|_| ReadFailure::Rejected(400, "invalid content-length"))?;
    if length > MAX_BODY_BYTES {
        return Err(ReadFailure::Rejected(413, "request body too large"));
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(body)
}

fn read_chunked_body(reader: &mut impl BufRead) -> Result<Vec<u8>, ReadFailure> {
    let mut body = Vec::new();
    loop {
        let size_line = read_line_limited(reader)?.ok_or(ReadFailure::Closed)?;
        // Chunk extensions (";name=value") are allowed and ignored.
        let size_text = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| ReadFailure::Rejected(400, "invalid chunk size"))?;
        if size == 0 {
            // Skip trailer fields up to the closing empty line.
            loop {
                match read_line_limited(reader)? {
                    None => return Err(ReadFailure::Closed),
                    Some(line) if line.is_empty() => return Ok(body),
                    Some(_trailer) => {}
                }
            }
        }
        let start = body.len();
        let end = start.checked_add(size).filter(|&end| end <= MAX_BODY_BYTES);
        let end = end.ok_or(ReadFailure::Rejected(413, "request body too large"))?;
        body.resize(end, 0);
        reader.read_exact(&mut body[start..])?;
        if read_line_limited(reader)? != Some(String::new()) {
            return Err(ReadFailure::Rejected(400, "chunk data lacks CRLF"));
        }
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Each SSE event goes out as its own chunk and is flushed, so clients see it immediately.
fn write_chunk(writer: &mut impl Write, data: &[u8]) -> io::Result<()> {
    write!(writer, "{:x}\r\n", data.len())?;
    writer.write_all(data)?;
    writer.write_all(b"\r\n")?;
    writer.flush()
}

fn sse_event(message: &Value) -> String {
    // serde_json escapes newlines inside strings, so one `data:` line always suffices.
    format!("event: message\ndata: {message}\n\n")
}

fn new_session_id() -> String {
    static FALLBACK_COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut bytes = [0u8; 16];
    let urandom = File::open("/dev/urandom").and_then(|mut file| file.read_exact(&mut bytes));
    if urandom.is_err() {
        // Without /dev/urandom, std's randomly keyed hasher still gives unguessable-enough ids.
        let count = FALLBACK_COUNTER.fetch_add(1, Ordering::Relaxed);
        bytes[..8].copy_from_slice(&RandomState::new().hash_one(count).to_le_bytes());
        bytes[8..].copy_from_slice(&RandomState::new().hash_one(count).to_le_bytes());
    }
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn is_initialized_notification(message: &Value) -> bool {
    let method = message.get("method").and_then(Value::as_str);
    method == Some("notifications/initialized") && message.get("id").is_none()
}

/// What a stream sends of its own accord once it opens, so clients can tell it is live.
fn stream_opened_notification() -> Value {
    let opened = json!({"level": "info", "data": "stream opened"});
    notification("notifications/message", opened)
}

fn is_initialize_request(message: &Value) -> bool {
    let method = message.get("method").and_then(Value::as_str);
    method == Some("initialize") && message.get("id").is_some()
}

type Headers<'a> = &'a [(&'a str, &'a str)];
type Reply = io::Result<ConnectionFate>;
const TEXT_PLAIN: (&str, &str) = ("Content-Type", "text/plain");

/// One request/response exchange on a (possibly kept-alive) connection.
struct Exchange<'a> {
    /// An `Arc` because legacy POSTs hand slow work to threads that outlive the exchange.
    server: &'a Arc<Server>,
    writer: &'a mut TcpStream,
    connection_header: &'static str,
}

impl<'a> Exchange<'a> {
    fn new(server: &'a Arc<Server>, writer: &'a mut TcpStream, keep_alive: bool) -> Self {
        let connection_header = if keep_alive { "keep-alive" } else { "close" };
        Exchange {
            server,
            writer,
            connection_header,
        }
    }

    /// Writes the status line and headers; `Connection` is added here so no response lacks it.
    fn write_head(&mut self, status: u16, headers: Headers<'_>) -> io::Result<()> {
        let (reason, connection) = (reason_phrase(status), self.connection_header);
        let mut head = format!("HTTP/1.1 {status} {reason}\r\nConnection: {connection}\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        self.writer.write_all(head.as_bytes())
    }

    /// A complete Content-Length framed response (a 204 gets none, per RFC 9110 §8.6).
    fn respond(&mut self, status: u16, headers: Headers<'_>, body: &[u8]) -> Reply {
        let length = body.len().to_string();
        let mut all_headers = headers.to_vec();
        if status != 204 {
            all_headers.push(("Content-Length", &length));
        }
        self.write_head(status, &all_headers)?;
        self.writer.write_all(body)?;
        self.writer.flush()?;
        Ok(ConnectionFate::KeepOpen)
    }

    fn respond_json(&mut self, status: u16, extra_headers: Headers<'_>, body: &Value) -> Reply {
        let mut headers = vec![("Content-Type", "application/json")];
        headers.extend_from_slice(extra_headers);
        self.respond(status, &headers, body.to_string().as_bytes())
    }

    fn write_event_stream_head(&mut self, extra_headers: Headers<'_>) -> io::Result<()> {
        let mut headers = vec![("Content-Type", "text/event-stream")];
        headers.extend_from_slice(&[("Cache-Control", "no-cache")]);
        headers.extend_from_slice(&[("Transfer-Encoding", "chunked")]);
        headers.extend_from_slice(extra_headers);
        self.write_head(200, &headers)?;
        self.writer.flush()
    }

    fn finish_chunked(&mut self) -> Reply {
        self.writer.write_all(b"0\r\n\r\n")?;
        self.writer.flush()?;
        Ok(ConnectionFate::KeepOpen)
    }

    fn route(&mut self, request: &HttpRequest) -> Reply {
        static SERVED: AtomicU64 = AtomicU64::new(0);
        if self.server.config.unauthorized
            && SERVED.fetch_add(1, Ordering::Relaxed) >= self.server.config.unauthorized_after
        {
            let challenge = "Bearer realm=\"demo-upstream\", error=\"invalid_token\", \
                             resource_metadata=\"http://upstream.invalid/.well-known/oauth-protected-resource\"";
            let body = json!({"error": "invalid_token", "from": "mcp-demo-server"});
            return self.respond_json(401, &[("WWW-Authenticate", challenge)], &body);
        }
        let legacy = self.server.config.legacy_sse;
        match (request.path.as_str(), request.method.as_str()) {
            (MCP_PATH, _) => self.route_mcp(request),
            (LEGACY_SSE_PATH, "GET") if legacy => self.open_legacy_stream(request),
            (LEGACY_MESSAGES_PATH, "POST") if legacy => self.legacy_post(request),
            (LEGACY_SSE_PATH, _) if legacy => {
                self.respond(405, &[TEXT_PLAIN, ("Allow", "GET")], b"Method Not Allowed")
            }
            (LEGACY_MESSAGES_PATH, _) if legacy => {
                self.respond(405, &[TEXT_PLAIN, ("Allow", "POST")], b"Method Not Allowed")
            }
            _ => self.respond(404, &[TEXT_PLAIN], b"Not Found"),
        }
    }

    fn route_mcp(&mut self, request: &HttpRequest) -> Reply {
        match request.method.as_str() {
            "POST" => self.post(request),
            "GET" => self.open_event_stream(request),
            "DELETE" => self.delete_session(request),
            _ => {
                let headers = [TEXT_PLAIN, ("Allow", "GET, POST, DELETE")];
                self.respond(405, &headers, b"Method Not Allowed")
            }
        }
    }

    /// Checks the Mcp-Session-Id header; on failure answers the request and returns `None`.
    fn require_session(&mut self, request: &HttpRequest) -> io::Result<Option<String>> {
        let (status, error) = match request.header(SESSION_HEADER) {
            Some(id) if lock(&self.server.sessions).contains(id) => return Ok(Some(id.into())),
            Some(_) => (404, rpc_error(SESSION_NOT_FOUND, "Session not found")),
            None => (
                400,
                rpc_error(INVALID_REQUEST, "Missing Mcp-Session-Id header"),
            ),
        };
        self.respond_json(status, &[], &error_response(Value::Null, error))?;
        Ok(None)
    }

    fn post(&mut self, request: &HttpRequest) -> Reply {
        let payload: Value = match serde_json::from_slice(&request.body) {
            Ok(payload) => payload,
            Err(error) => return self.respond_json(400, &[], &parse_error_response(&error)),
        };
        let opens_session = match &payload {
            Value::Array(batch) => batch.iter().any(is_initialize_request),
            single => is_initialize_request(single),
        };
        let mut new_session = None;
        if opens_session {
            let id = new_session_id();
            lock(&self.server.sessions).insert(id.clone());
            new_session = Some(id);
        } else if self.require_session(request)?.is_none() {
            return Ok(ConnectionFate::KeepOpen);
        }
        let session_header: Vec<_> = new_session
            .iter()
            .map(|id| ("Mcp-Session-Id", id.as_str()))
            .collect();

        let is_single_request = payload.get("method").is_some() && payload.get("id").is_some();
        if self.server.config.sse_responses && is_single_request {
            return self.stream_post_response(&payload, &session_header);
        }
        // A plain JSON response has nowhere to carry request-scoped notifications: drop them.
        match handle_payload(self.server, &payload, &mut |_dropped: Value| {}) {
            Outcome::Respond(response) => {
                // A lone malformed message is rejected at the HTTP level as well.
                let code = response.pointer("/error/code").and_then(Value::as_i64);
                let rejected = !payload.is_array() && code == Some(INVALID_REQUEST);
                self.respond_json(if rejected { 400 } else { 200 }, &session_header, &response)
            }
            Outcome::Silent => self.respond(202, &session_header, b""),
            Outcome::Crash => Ok(ConnectionFate::Close),
        }
    }

    /// Answers one POSTed request as an SSE stream. Headers go out lazily with the first
    /// event, so the `crash` tool can still drop the connection without any response.
    fn stream_post_response(&mut self, payload: &Value, extra_headers: Headers<'_>) -> Reply {
        let mut head_sent = false;
        let mut write_error = None;
        // Tool code cannot act on a vanished client, so the first write error is kept for later.
        let mut send = |exchange: &mut Self, message: &Value| {
            if write_error.is_some() {
                return;
            }
            let mut sent = Ok(());
            if !head_sent {
                sent = exchange.write_event_stream_head(extra_headers);
                head_sent = sent.is_ok();
            }
            let event = sse_event(message);
            write_error = sent
                .and_then(|()| write_chunk(exchange.writer, event.as_bytes()))
                .err();
        };
        let params = payload.get("params").and_then(Value::as_object);
        let is_tool_call = payload.get("method").and_then(Value::as_str) == Some("tools/call");
        let runs_progress_tool = param(params, "name").and_then(Value::as_str) == Some("progress");
        // Announce the call before running it, so clients (and gateways) can observe streaming;
        // the `progress` tool reports its own steps instead.
        let announce = is_tool_call && !runs_progress_tool;
        if let Some(token) = progress_token(params).filter(|_| announce) {
            send(self, &progress_notification(token, 0, 1));
        }
        let server = self.server;
        match handle_payload(server, payload, &mut |message: Value| send(self, &message)) {
            Outcome::Respond(message) => send(self, &message),
            Outcome::Silent => {}
            Outcome::Crash => return Ok(ConnectionFate::Close),
        }
        match (write_error, head_sent) {
            (Some(error), _) => Err(error),
            (None, false) => self.respond(202, extra_headers, b""),
            (None, true) => self.finish_chunked(),
        }
    }

    fn open_event_stream(&mut self, request: &HttpRequest) -> Reply {
        let accept = request.header("accept").unwrap_or_default();
        if !accept.contains("text/event-stream") {
            return self.respond(
                406,
                &[TEXT_PLAIN],
                b"GET /mcp needs Accept: text/event-stream",
            );
        }
        let Some(session_id) = self.require_session(request)? else {
            return Ok(ConnectionFate::KeepOpen);
        };
        let (sender, receiver) = mpsc::channel();
        lock(&self.server.event_streams).push(EventStream { session_id, sender });
        self.write_event_stream_head(&[])?;
        write_chunk(
            self.writer,
            sse_event(&stream_opened_notification()).as_bytes(),
        )?;
        self.relay_events(&receiver)?;
        self.finish_chunked()
    }

    /// Writes queued messages as SSE events until a write fails (client gone) or every sender
    /// is dropped (session ended); keep-alive comments stop idle proxies from cutting it.
    fn relay_events(&mut self, receiver: &Receiver<Value>) -> io::Result<()> {
        loop {
            match receiver.recv_timeout(KEEPALIVE_INTERVAL) {
                Ok(message) => write_chunk(self.writer, sse_event(&message).as_bytes())?,
                Err(RecvTimeoutError::Timeout) => write_chunk(self.writer, b": keepalive\n\n")?,
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
    }

    fn delete_session(&mut self, request: &HttpRequest) -> Reply {
        let Some(session_id) = self.require_session(request)? else {
            return Ok(ConnectionFate::KeepOpen);
        };
        lock(&self.server.sessions).remove(&session_id);
        // Dropping the senders ends this session's GET streams.
        lock(&self.server.event_streams).retain(|stream| stream.session_id != session_id);
        self.respond(204, &[], b"")
    }

    // --- Legacy HTTP+SSE transport (2024-11-05) -------------------------------------------

    /// `GET /sse`: one session per stream, alive exactly as long as this connection.
    fn open_legacy_stream(&mut self, request: &HttpRequest) -> Reply {
        if !accepts_event_stream(request) {
            let why = b"GET /sse needs an Accept header that allows text/event-stream";
            return self.respond(406, &[TEXT_PLAIN], why);
        }
        // Cloned before the session exists, so a failure here leaves nothing to clean up.
        let hangup_socket = self.writer.try_clone()?;
        let session_id = new_session_id();
        let (sender, receiver) = mpsc::channel();
        let server = self.server;
        lock(&server.legacy_sessions).insert(session_id.clone(), sender);
        let endpoint = legacy_endpoint(&server.config, &session_id);
        let streamed = thread::scope(|scope| {
            let id = session_id.as_str();
            let watcher = thread::Builder::new().spawn_scoped(scope, move || {
                end_session_on_hangup(server, id, hangup_socket)
            });
            if let Err(error) = watcher {
                // Without the watcher a gone client is still noticed, at the next failed write.
                eprintln!("mcp-demo-server: cannot spawn hang-up watcher: {error}");
            }
            let streamed = self.write_legacy_stream(&endpoint, &receiver);
            lock(&server.legacy_sessions).remove(id);
            // Also wakes the watcher's blocking read, which the scope waits for.
            let _ = self.writer.shutdown(Shutdown::Both);
            streamed
        });
        // The stream has no terminating chunk: a legacy session only ends by the connection
        // closing, and for a `crash` that abrupt end is the point.
        streamed.map(|()| ConnectionFate::Close)
    }

    fn write_legacy_stream(
        &mut self,
        endpoint: &str,
        receiver: &Receiver<Value>,
    ) -> io::Result<()> {
        self.write_event_stream_head(&[])?;
        write_chunk(self.writer, sse_endpoint_event(endpoint).as_bytes())?;
        self.relay_events(receiver)
    }

    /// `POST /messages?session_id=`: accepted here, answered on the session's stream.
    fn legacy_post(&mut self, request: &HttpRequest) -> Reply {
        // Logged before any check, so tests see exactly what reached the server.
        self.server.log_input(&request.body);
        let session_id = match legacy_session_param(&request.query) {
            Ok(id) => id.to_string(),
            Err(why) => {
                let error = rpc_error(INVALID_REQUEST, why);
                return self.respond_json(400, &[], &error_response(Value::Null, error));
            }
        };
        if !lock(&self.server.legacy_sessions).contains_key(&session_id) {
            let error = rpc_error(SESSION_NOT_FOUND, "Session not found");
            return self.respond_json(404, &[], &error_response(Value::Null, error));
        }
        let payload: Value = match serde_json::from_slice(&request.body) {
            Ok(payload) => payload,
            Err(error) => return self.respond_json(400, &[], &parse_error_response(&error)),
        };
        // As on stdio: slow work gets a thread, so the 202 and later POSTs need not wait for
        // it, while quick requests are answered before the 202 and so stay in order.
        let may_be_slow = payload.is_array()
            || payload.get("method").and_then(Value::as_str) == Some("tools/call");
        if !may_be_slow {
            answer_on_legacy_stream(self.server, &session_id, &payload);
        } else {
            let server = Arc::clone(self.server);
            let work = move || answer_on_legacy_stream(&server, &session_id, &payload);
            if let Err(error) = thread::Builder::new().spawn(work) {
                eprintln!("mcp-demo-server: cannot spawn worker thread: {error}");
                return self.respond(500, &[TEXT_PLAIN], b"cannot spawn worker thread");
            }
        }
        self.respond(202, &[], b"")
    }
}

fn answer_on_legacy_stream(server: &Server, session_id: &str, payload: &Value) {
    let mut emit = |message: Value| server.send_legacy(session_id, message);
    match handle_payload(server, payload, &mut emit) {
        Outcome::Respond(response) => server.send_legacy(session_id, response),
        Outcome::Silent => {}
        Outcome::Crash => {
            // Dropping the sender ends the stream mid-flight, as a dying server would.
            lock(&server.legacy_sessions).remove(session_id);
            return;
        }
    }
    // A legacy stream opens before the session is initialized, so the server-initiated
    // greeting that `/mcp` GET streams send on opening waits for `notifications/initialized`.
    let messages = match payload {
        Value::Array(batch) => batch.as_slice(),
        single => std::slice::from_ref(single),
    };
    if messages.iter().any(is_initialized_notification) {
        server.send_legacy(session_id, stream_opened_notification());
    }
}

/// Reads (and discards) whatever the client sends on its event stream until it hangs up,
/// then ends the session: blocked in `recv`, the stream writer would otherwise only notice at
/// its next keep-alive write, leaving a dead session that still accepts POSTs.
fn end_session_on_hangup(server: &Server, session_id: &str, mut socket: TcpStream) {
    let mut scratch = [0u8; 512];
    loop {
        match socket.read(&mut scratch) {
            Ok(0) => break,
            Ok(_) => {}
            // The connection's idle read timeout must not end a stream that is merely quiet.
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => break,
        }
    }
    lock(&server.legacy_sessions).remove(session_id);
}

fn legacy_endpoint(config: &Config, session_id: &str) -> String {
    match &config.legacy_endpoint {
        Some(template) => template.replace(SESSION_PLACEHOLDER, session_id),
        None => format!("{LEGACY_MESSAGES_PATH}?{LEGACY_SESSION_PARAM}={session_id}"),
    }
}

/// The endpoint goes out as the event's data unchanged; only a line break inside it needs a
/// fresh `data:` line, or it would end the field and the rest would be misread as fields.
fn sse_endpoint_event(endpoint: &str) -> String {
    let normalized = endpoint.replace("\r\n", "\n").replace('\r', "\n");
    let data: String = normalized
        .split('\n')
        .map(|line| format!("data: {line}\n"))
        .collect();
    format!("event: endpoint\n{data}\n")
}

/// Exactly one `session_id` parameter; several would leave it ambiguous which session is meant.
fn legacy_session_param(query: &str) -> Result<&str, &'static str> {
    let mut ids = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter(|(name, _)| *name == LEGACY_SESSION_PARAM)
        .map(|(_, id)| id);
    match (ids.next(), ids.next()) {
        (Some(id), None) => Ok(id),
        (None, _) => Err("Missing session_id query parameter"),
        (Some(_), Some(_)) => Err("More than one session_id query parameter"),
    }
}

/// Content negotiation per RFC 9110 §12.5.1: no Accept header accepts anything, and the most
/// specific range matching text/event-stream decides, so `*/*` alone is enough but an
/// explicit `text/event-stream;q=0` refuses it.
fn accepts_event_stream(request: &HttpRequest) -> bool {
    let ranges: Vec<&str> = request
        .headers
        .iter()
        .filter(|(name, _)| name == "accept")
        .flat_map(|(_, value)| value.split(','))
        .filter(|range| !range.trim().is_empty())
        .collect();
    if ranges.is_empty() {
        return true;
    }
    let mut best: Option<(u8, bool)> = None;
    for range in ranges {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        let specificity = match media.as_str() {
            "text/event-stream" => 3,
            "text/*" => 2,
            "*/*" => 1,
            _ => continue,
        };
        let refused = parts.any(|parameter| {
            parameter.split_once('=').is_some_and(|(name, value)| {
                name.trim().eq_ignore_ascii_case("q")
                    && value.trim().parse::<f64>().is_ok_and(|q| q <= 0.0)
            })
        });
        if best.is_none_or(|(known, _)| specificity > known) {
            best = Some((specificity, !refused));
        }
    }
    best.is_some_and(|(_, allowed)| allowed)
}
