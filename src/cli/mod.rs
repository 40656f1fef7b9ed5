//! The command line: `mcp-guard --config FILE` runs the gateway; subcommands validate a config,
//! write a starter one, make and hash API keys, check upstreams, print shell completions and a
//! man page (both generated from the clap definition below, so they cannot drift from it), and
//! print the version.

mod check;
mod pins;

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
    ///
    /// Give "-" instead of the key to read it from stdin (one line; its trailing newline is not
    /// part of the key), which keeps it out of the process list and the shell history:
    /// `mcp-guard hash-key - < key.txt`. A key longer than the gateway accepts (512 bytes) is
    /// refused; one shorter than 16 bytes is hashed with a warning.
    HashKey {
        /// The key, or "-" to read it from stdin.
        key: String,
    },
    /// Perform the MCP initialize handshake with each configured upstream.
    CheckUpstream {
        /// Configuration file (else the global `--config`).
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Tool-definition pins: list, approve, export, diff (works on the pin file, offline).
    Pins {
        /// Configuration file naming the pin file (`[pinning] store`; else the global `--config`).
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The pin file itself, instead of a configuration.
        #[arg(long, value_name = "FILE")]
        store: Option<PathBuf>,
        #[command(subcommand)]
        action: pins::PinsAction,
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
        Some(Command::HashKey { key }) => report(hash_key_command(&key)),
        Some(Command::Pins {
            config,
            store,
            action,
        }) => match pins::store_path(file(config).as_deref(), store)
            .and_then(|path| pins::run(&path, action))
        {
            Ok(out) => print_bytes(out.as_bytes()),
            Err(e) => report(Err(e)),
        },
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
            let tls = match &s.server.tls {
                None => "",
                Some(t) if t.verifies_clients => " with TLS and client certificates",
                Some(_) => " with TLS",
            };
            println!(
                "{}: valid ({}, listening on {}{tls}, {})",
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
        crate::config::Transport::Sse(s) => format!("sse {}", s.endpoint.url),
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

/// A TOML basic string holding `s`, for every string `init` and `keygen` write (IDs, paths).
/// Always a basic string: a literal ('...') one can escape nothing. `$` is written as the
/// escape `\u0024`, because the loader expands `${NAME}` in the raw text before TOML unescapes
/// it: an ID or a directory named `${HOME}x` must stay that text, not become a reference that
/// puts an environment value (a secret) into the audit trail, or breaks loading when unset.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    crate::config::load::push_toml_basic(&mut out, s);
    out.push('"');
    out
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
    write_private(path, &text, force).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists && !force {
            format!("{output} already exists (use --force to overwrite)")
        } else {
            format!("cannot write {output}: {e}")
        }
    })?;
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

/// Writes a configuration `init` made, as a new file of mode 0600 (less any umask bits): it
/// holds key hashes and the policy. Never through what is already at `path`:
/// - without `force`, `create_new` (O_CREAT|O_EXCL) fails where anything exists, a symlink
///   included, dangling or not, instead of following it: a link planted in a shared directory
///   cannot aim the write at a file elsewhere;
/// - with `force`, the text goes to a new file of a random name in the same directory, which
///   is then renamed over `path`. A rename replaces the entry itself: a symlink there is
///   replaced, its target untouched, and a file someone else created there (with their owner
///   and mode) is replaced by ours.
fn write_private(path: &std::path::Path, text: &str, force: bool) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let write_new = |p: &std::path::Path| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(p)?;
        // A half-written file is worse than none: it is removed on failure.
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .inspect_err(|_| {
                let _ = std::fs::remove_file(p);
            })
    };
    if !force {
        return write_new(path);
    }
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"))?;
    let suffix: String = crate::mcp::session::random_bytes::<8>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{suffix}.tmp"));
    let tmp = path.with_file_name(tmp_name);
    write_new(&tmp)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Keys shorter than this are hashed with a warning: few enough bytes to guess.
const SHORT_KEY: usize = 16;

/// `hash-key KEY`, or `hash-key -` reading the key from stdin.
fn hash_key_command(arg: &str) -> Result<(), String> {
    use std::io::{BufRead as _, Read as _};
    let max = crate::auth::api_key::MAX_KEY_LEN;
    let key = if arg == "-" {
        let stdin = std::io::stdin();
        if std::io::IsTerminal::is_terminal(&stdin) {
            eprint!("key (one line): ");
        }
        // Bounded: a line longer than any key the gateway accepts is refused below anyway,
        // and `hash-key - < /dev/zero` must not fill the memory. Bytes first, so a long line
        // cut inside a character is reported as too long, not as bad UTF-8.
        let mut line = Vec::new();
        stdin
            .lock()
            .take(max as u64 + 3)
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("cannot read the key from stdin: {e}"))?;
        let line = line.strip_suffix(b"\n").unwrap_or(&line);
        line.strip_suffix(b"\r").unwrap_or(line).to_vec()
    } else {
        arg.as_bytes().to_vec()
    };
    if key.is_empty() {
        return Err("the key must not be empty".into());
    }
    if key.len() > max {
        return Err(format!(
            "the key is longer than {max} bytes, the most the gateway accepts: its hash could \
             never match a request"
        ));
    }
    let key = String::from_utf8(key).map_err(|_| "the key is not valid UTF-8".to_string())?;
    if key.len() < SHORT_KEY {
        eprintln!(
            "warning: the key is only {} bytes, short enough to guess; use at least {SHORT_KEY} \
             random bytes (`mcp-guard keygen` makes a 32-byte one)",
            key.len()
        );
    }
    println!("{}", hash_key(&key));
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

/// Characters that are invisible or reorder the text around them on a terminal:
/// bidirectional marks, embeddings, overrides and isolates, zero-width characters, line and
/// paragraph separators, the byte order mark.
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{2069}'
            | '\u{FEFF}'
    )
}

/// An identity given on the command line. It ends up in logs, audit lines and the messages
/// printed here: one holding control characters (terminal escapes) or invisible formatting
/// characters would show as something else than it is, so those are refused (and the refusal
/// does not echo it). Quotes and backslashes are refused too: people copy IDs into files by
/// hand.
fn check_key_id(id: &str, option: &str) -> Result<(), String> {
    if id.trim().is_empty()
        || id.contains(['"', '\\'])
        || id.chars().any(|c| c.is_control() || is_invisible_format(c))
    {
        return Err(format!(
            "{option} must be non-empty and must not contain quotes, backslashes, control \
             characters (newlines, terminal escapes) or invisible formatting characters \
             (bidirectional overrides, zero-width characters)"
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
        "[[auth.api_keys]]\nid = {}\nkey_hash = {}",
        toml_string(user_id),
        toml_string(&hash_key(&key))
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_strings_round_trip_and_never_hold_a_reference_for_the_loader() {
        for s in [
            "plain",
            "${HOME}x",
            "$${A}",
            "q\"b\\n\nt\tc\u{1}\u{7f}\u{85}",
            "'lit'",
            "José",
        ] {
            let written = toml_string(s);
            assert!(
                written.starts_with('"') && !written.contains('$'),
                "{written}"
            );
            let v: toml::Table = toml::from_str(&format!("k = {written}")).unwrap();
            assert_eq!(v["k"].as_str(), Some(s));
        }
    }

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
