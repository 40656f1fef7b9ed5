//! The command line: `mcp-guard --config FILE` runs the gateway; subcommands validate a config,
//! write a starter one, make and hash API keys, check upstreams, print shell completions and a
//! man page (both generated from the clap definition below, so they cannot drift from it), and
//! print the version.

mod check;

use crate::config::Settings;
use base64::Engine as _;
use clap::{CommandFactory, Parser, Subcommand};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

/// mcp-guard: a security gateway for MCP servers.
#[derive(Parser, Debug)]
#[command(name = "mcp-guard", version, about)]
pub struct Cli {
    /// Configuration file: runs the gateway when no subcommand is given, and serves `run`,
    /// `validate` and `check-upstream` when they name none (`mcp-guard --config F validate`).
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway.
    Run {
        /// Configuration file (else the global `--config`).
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Check a configuration file and exit (0 = valid).
    Validate {
        /// Configuration file (else the global `--config`).
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Write a commented starter configuration: the bundled demo server behind the gateway,
    /// with API key, rate limit and audit blocks to turn on (`--with-key` turns them on).
    Init {
        /// Where to write it ("-" for stdout).
        #[arg(short, long, default_value = "guard.toml")]
        output: String,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
        /// Also generate an API key for identity ID (default `agent`), enable the key, rate
        /// limit and audit blocks, and print the key once on stdout.
        #[arg(long, value_name = "ID", num_args = 0..=1, default_missing_value = DEFAULT_KEY_ID)]
        with_key: Option<String>,
    },
    /// Generate a new API key and print its [[auth.api_keys]] entry.
    Keygen {
        /// The identity the key stands for.
        #[arg(long, value_name = "ID")]
        user_id: String,
    },
    /// Print the key_hash of an existing API key.
    HashKey {
        /// The key.
        key: String,
    },
    /// Perform the MCP initialize handshake with each configured upstream.
    CheckUpstream {
        /// Configuration file (else the global `--config`).
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Print the configuration reference (every key, its type, default, reload behaviour) as
    /// Markdown; docs/configuration.md is this output.
    ConfigReference,
    /// Print a shell completion script (e.g. `mcp-guard completions bash > /etc/bash_completion.d/mcp-guard`).
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff; e.g. `mcp-guard man > mcp-guard.1`).
    Man,
    /// Print the version.
    Version,
}

/// Parses arguments and runs the chosen command.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let global = cli.config;
    // A subcommand's own `--config`, else the global one.
    let file = |own: Option<PathBuf>| own.or_else(|| global.clone());
    match cli.command {
        None | Some(Command::Run { .. }) => {
            let own = match cli.command {
                Some(Command::Run { config }) => config,
                _ => None,
            };
            let Some(config) = file(own) else {
                eprintln!(
                    "error: no configuration given; run `mcp-guard --config FILE` (or `mcp-guard init` to write one)"
                );
                return ExitCode::from(2);
            };
            init_logging();
            report(crate::runtime::run(config))
        }
        Some(Command::Validate { config }) => match file(config) {
            Some(config) => validate(&config),
            None => missing_config("validate"),
        },
        Some(Command::CheckUpstream { config }) => match file(config) {
            Some(config) => check_upstream(&config),
            None => missing_config("check-upstream"),
        },
        Some(Command::Init {
            output,
            force,
            with_key,
        }) => report(init(&output, force, with_key.as_deref())),
        Some(Command::Keygen { user_id }) => report(keygen(&user_id)),
        Some(Command::HashKey { key }) => {
            if key.is_empty() {
                eprintln!("error: the key must not be empty");
                return ExitCode::FAILURE;
            }
            println!("{}", hash_key(&key));
            ExitCode::SUCCESS
        }
        Some(Command::ConfigReference) => {
            print!("{}", crate::config::reference::markdown());
            ExitCode::SUCCESS
        }
        Some(Command::Completions { shell }) => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "mcp-guard", &mut out);
            print_bytes(&out)
        }
        Some(Command::Man) => {
            let mut out = Vec::new();
            match clap_mangen::Man::new(Cli::command()).render(&mut out) {
                Ok(()) => print_bytes(&out),
                Err(e) => report(Err(format!("cannot render the man page: {e}"))),
            }
        }
        Some(Command::Version) => {
            println!("mcp-guard {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
    }
}

/// Writes generated output to stdout. Built in memory first: the generators panic on a write
/// error, and `mcp-guard man | head` closing the pipe early is not a crash.
fn print_bytes(bytes: &[u8]) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => report(Err(format!("cannot write to stdout: {e}"))),
    }
}

fn missing_config(command: &str) -> ExitCode {
    eprintln!("error: no configuration given; run `mcp-guard {command} --config FILE`");
    ExitCode::from(2)
}

/// `validate`: the file, then the world it points at.
fn validate(config: &std::path::Path) -> ExitCode {
    match Settings::load(config) {
        Ok(s) => {
            for w in &s.warnings {
                eprintln!("warning: {w}");
            }
            let problems =
                crate::config::preflight::check(&s, crate::config::preflight::Ports::Check);
            if !problems.is_empty() {
                for p in &problems {
                    eprintln!("error: {}: {p}", config.display());
                }
                return ExitCode::FAILURE;
            }
            println!(
                "{}: valid ({}, listening on {}, {})",
                config.display(),
                workers_phrase(s.server.workers),
                s.server.listen,
                describe_upstream(&s)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// "1 worker", "4 workers".
pub fn workers_phrase(n: usize) -> String {
    if n == 1 {
        "1 worker".into()
    } else {
        format!("{n} workers")
    }
}

fn check_upstream(config: &std::path::Path) -> ExitCode {
    match Settings::load(config) {
        Ok(s) => {
            if check::check_all(&s) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn report(r: Result<(), String>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// "upstream stdio `x`" for one upstream; "upstreams default (stdio `x`), github (http …)".
fn describe_upstream(s: &Settings) -> String {
    let one = |r: &crate::config::Route| match &r.upstream.transport {
        crate::config::Transport::Stdio(st) => format!("stdio `{}`", st.command),
        crate::config::Transport::Http(h) => {
            let urls: Vec<&str> = h.endpoints.iter().map(|e| e.url.as_str()).collect();
            format!("http {}", urls.join(", "))
        }
    };
    match s.routes.as_slice() {
        [only] if &*only.name == crate::config::DEFAULT_ROUTE => format!("upstream {}", one(only)),
        routes => {
            let list: Vec<String> = routes
                .iter()
                .map(|r| format!("{} ({})", r.name, one(r)))
                .collect();
            format!("upstreams {}", list.join(", "))
        }
    }
}

/// The starter configuration written by `init`: a template that [`render_starter`] fills in.
pub const STARTER_CONFIG: &str = include_str!("../../examples/starter.toml");

/// The identity `init --with-key` gives the key when it names none: the usual caller of an MCP
/// gateway is an AI agent.
pub const DEFAULT_KEY_ID: &str = "agent";

/// In the template, the line after which `#setting` lines (a `#` and no space) are the
/// security blocks that `--with-key` turns on; above it, commented settings are alternatives.
const SECURITY_MARKER: &str = "# ---- Security.";

/// The demo server's name, as the template's `command` holds it.
const DEMO_SERVER: &str = "mcp-demo-server";

/// The audit file `init` names, next to the configuration.
const AUDIT_FILE: &str = "audit.jsonl";

/// What `init` fills into the template.
struct Starter<'a> {
    /// The demo server's full path, when it was found.
    demo: Option<&'a str>,
    /// The audit file's path.
    audit_file: &'a str,
    /// `(id, key_hash)`: turn the security blocks on with this key.
    key: Option<(&'a str, &'a str)>,
}

/// A TOML basic string holding `s` (escaped as TOML, not as Rust, wants).
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The starter configuration, filled in.
fn render_starter(st: &Starter<'_>) -> String {
    let mut out = String::with_capacity(STARTER_CONFIG.len() + 256);
    let mut security = false;
    for line in STARTER_CONFIG.lines() {
        security |= line.starts_with(SECURITY_MARKER);
        let setting = security
            && st.key.is_some()
            && line.len() > 1
            && line.starts_with('#')
            && !line[1..].starts_with([' ', '#']);
        let line = if setting { &line[1..] } else { line };
        match (line.split_once(" = "), st.key) {
            (Some(("command", _)), _) if !security => match st.demo {
                Some(path) => out.push_str(&format!("command = {}", toml_string(path))),
                None => {
                    out.push_str(&format!(
                        "# {DEMO_SERVER} was not found next to this mcp-guard: put it on PATH, or \
                         give its full path.\n{line}"
                    ));
                }
            },
            (Some(("id", _)), Some((id, _))) if setting => {
                out.push_str(&format!("id = {}", toml_string(id)));
            }
            (Some(("key_hash", _)), Some((_, hash))) if setting => {
                out.push_str(&format!("key_hash = {}", toml_string(hash)));
            }
            (Some(("#file" | "file", _)), _) if security => {
                let hash = if line.starts_with('#') { "#" } else { "" };
                out.push_str(&format!("{hash}file = {}", toml_string(st.audit_file)));
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The demo server installed next to the running mcp-guard (`cargo build` and `cargo install`
/// put both binaries in one directory), as a full path; `None` when it is not there.
fn sibling_demo_server() -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.join(DEMO_SERVER);
    let meta = std::fs::metadata(&path).ok()?;
    (meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .then(|| path.to_str().map(str::to_string))
        .flatten()
}

/// How the user invoked mcp-guard (`./target/release/mcp-guard`), so the commands `init`
/// suggests can be pasted as they are; plain `mcp-guard` when that would need quoting.
fn invoked_as() -> String {
    std::env::args()
        .next()
        .filter(|a| {
            !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c))
        })
        .unwrap_or_else(|| "mcp-guard".into())
}

fn init(output: &str, force: bool, with_key: Option<&str>) -> Result<(), String> {
    if let Some(id) = with_key {
        check_key_id(id, "--with-key")?;
    }
    let demo = sibling_demo_server();
    if output == "-" {
        if with_key.is_some() {
            return Err(
                "--with-key prints the key on stdout: give --output a file for the configuration"
                    .into(),
            );
        }
        // Nowhere to put it next to: relative, so next to wherever mcp-guard runs.
        print!(
            "{}",
            render_starter(&Starter {
                demo: demo.as_deref(),
                audit_file: AUDIT_FILE,
                key: None,
            })
        );
        return Ok(());
    }
    let path = std::path::Path::new(output);
    if path.exists() && !force {
        return Err(format!(
            "{output} already exists (use --force to overwrite)"
        ));
    }
    // The audit file sits next to the configuration, written as a full path: the gateway
    // resolves relative paths from the directory it runs in, which is not always this one.
    let cwd =
        std::env::current_dir().map_err(|e| format!("cannot read the current directory: {e}"))?;
    let audit_path: std::path::PathBuf = cwd
        .join(path)
        .with_file_name(AUDIT_FILE)
        .components()
        .collect();
    let audit_file = audit_path
        .to_str()
        .ok_or_else(|| format!("{} is not valid UTF-8", audit_path.display()))?;
    let key = with_key.map(|id| (id, new_key()));
    let hash = key.as_ref().map(|(_, k)| hash_key(k));
    let text = render_starter(&Starter {
        demo: demo.as_deref(),
        audit_file,
        key: key
            .as_ref()
            .zip(hash.as_deref())
            .map(|((id, _), h)| (*id, h)),
    });
    std::fs::write(path, text).map_err(|e| format!("cannot write {output}: {e}"))?;
    let me = invoked_as();
    let upstream = match &demo {
        Some(_) => format!("the bundled {DEMO_SERVER} (found next to {me})"),
        None => format!("`{DEMO_SERVER}`, which is not next to {me}: put it on PATH"),
    };
    let shown_audit = path.with_file_name(AUDIT_FILE);
    match &key {
        None => eprintln!(
            "wrote {output}: {upstream}, no authentication yet.\n\
             Secure it: `{me} init --with-key ID --force --output {output}`, or turn on the \
             commented [[auth.api_keys]], [rate_limit] and [audit] blocks."
        ),
        Some((id, _)) => eprintln!(
            "wrote {output}: {upstream}, behind an API key for `{id}` (see its allowed_tools \
             and denied_tools), rate limits and an audit trail in {}.\n\
             The key is printed once, on stdout; only its hash is in {output}. Callers send it \
             as `Authorization: Bearer <key>`.",
            shown_audit.display()
        ),
    }
    eprintln!(
        "  check it:   {me} validate --config {output}\n  \
           run it:     {me} --config {output}\n  \
           every key:  docs/configuration.md"
    );
    if let Some((_, k)) = &key {
        println!("{k}");
    }
    Ok(())
}

/// `key_hash` format: standard base64 of the SHA-256 of the key's bytes.
pub fn hash_key(key: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// A new API key: `mcpg_` and 32 random bytes, URL-safe base64 (fits in a header as it is).
fn new_key() -> String {
    let bytes: [u8; 32] = crate::mcp::session::random_bytes();
    format!(
        "mcpg_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// An identity written into a TOML string by hand must not need escaping.
fn check_key_id(id: &str, option: &str) -> Result<(), String> {
    if id.trim().is_empty() || id.contains(['"', '\\', '\n', '\r']) {
        return Err(format!(
            "{option} must be non-empty and must not contain quotes, backslashes or newlines"
        ));
    }
    Ok(())
}

fn keygen(user_id: &str) -> Result<(), String> {
    check_key_id(user_id, "--user-id")?;
    let key = new_key();
    println!("API key for {user_id} (shown once; store it now):\n\n  {key}\n");
    println!("Add to the configuration:\n");
    println!(
        "[[auth.api_keys]]\nid = \"{user_id}\"\nkey_hash = \"{}\"",
        hash_key(&key)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_starter_falls_back_to_the_bare_demo_name_with_a_comment() {
        let text = render_starter(&Starter {
            demo: None,
            audit_file: "audit.jsonl",
            key: None,
        });
        assert!(text.contains(
            "# mcp-demo-server was not found next to this mcp-guard: put it on PATH, or give \
             its full path.\ncommand = \"mcp-demo-server\"\n"
        ));
        let v: toml::Table = toml::from_str(&text).unwrap();
        assert!(v.get("auth").is_none() && v.get("audit").is_none());
    }

    #[test]
    fn with_a_key_the_security_blocks_are_on_and_the_alternatives_stay_commented() {
        let text = render_starter(&Starter {
            demo: Some("/opt/my \"odd\" dir/mcp-demo-server"),
            audit_file: "/var/log/a b/audit.jsonl",
            key: Some(("agent", "aGFzaA==")),
        });
        let v: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(
            v["upstream"]["command"].as_str(),
            Some("/opt/my \"odd\" dir/mcp-demo-server")
        );
        assert_eq!(v["upstream"]["transport"].as_str(), Some("stdio"));
        assert!(v["upstream"].get("url").is_none());
        let key = &v["auth"]["api_keys"][0];
        assert_eq!(key["id"].as_str(), Some("agent"));
        assert_eq!(key["key_hash"].as_str(), Some("aGFzaA=="));
        assert_eq!(
            v["audit"]["file"].as_str(),
            Some("/var/log/a b/audit.jsonl")
        );
        assert!(v["rate_limit"].get("requests_per_second").is_some());
    }
}
