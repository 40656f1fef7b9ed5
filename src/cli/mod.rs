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
    /// Write a commented starter configuration.
    Init {
        /// Where to write it ("-" for stdout).
        #[arg(short, long, default_value = "guard.toml")]
        output: String,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
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
        Some(Command::Init { output, force }) => report(init(&output, force)),
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
                "{}: valid ({}, listening on {}, upstream {})",
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

fn describe_upstream(s: &Settings) -> String {
    match &s.upstream.transport {
        crate::config::Transport::Stdio(st) => format!("stdio `{}`", st.command),
        crate::config::Transport::Http(h) => format!("http {}", h.url),
    }
}

/// The starter configuration written by `init`.
pub const STARTER_CONFIG: &str = include_str!("../../examples/starter.toml");

fn init(output: &str, force: bool) -> Result<(), String> {
    if output == "-" {
        print!("{STARTER_CONFIG}");
        return Ok(());
    }
    let path = std::path::Path::new(output);
    if path.exists() && !force {
        return Err(format!(
            "{output} already exists (use --force to overwrite)"
        ));
    }
    std::fs::write(path, STARTER_CONFIG).map_err(|e| format!("cannot write {output}: {e}"))?;
    eprintln!("wrote {output}; check it with `mcp-guard validate --config {output}`");
    Ok(())
}

/// `key_hash` format: standard base64 of the SHA-256 of the key's bytes.
pub fn hash_key(key: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

fn keygen(user_id: &str) -> Result<(), String> {
    if user_id.trim().is_empty() || user_id.contains(['"', '\\', '\n', '\r']) {
        return Err(
            "--user-id must be non-empty and must not contain quotes, backslashes or newlines"
                .into(),
        );
    }
    let bytes: [u8; 32] = crate::mcp::session::random_bytes();
    let key = format!(
        "mcpg_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    println!("API key for {user_id} (shown once; store it now):\n\n  {key}\n");
    println!("Add to the configuration:\n");
    println!(
        "[[auth.api_keys]]\nid = \"{user_id}\"\nkey_hash = \"{}\"",
        hash_key(&key)
    );
    Ok(())
}
