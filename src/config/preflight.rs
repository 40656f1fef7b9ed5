//! Checks of the world a valid configuration points at: the stdio command resolves and can be
//! executed, its `cwd` is a directory, the audit file's directory is writable, the ports are
//! free. `validate` runs all of them; start-up runs them before anything is spawned or bound
//! (ports excepted: binding them is start-up's own check), so a gateway never starts into a
//! retry loop that `/health` would call healthy.

use crate::config::{Settings, StdioSettings, Transport};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// One thing that is not as the configuration needs it, in words that say what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The key the problem is about.
    pub key: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Whether the listening ports are checked too (`validate`) or left to the bind (`run`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ports {
    /// Try to bind each configured port (port 0 is skipped).
    Check,
    /// Leave them to the real bind.
    Skip,
}

/// Every problem found, in the order of the file.
pub fn check(settings: &Settings, ports: Ports) -> Vec<Problem> {
    let mut problems = Vec::new();
    if ports == Ports::Check {
        check_port("server.port", settings.server.listen, &mut problems);
        if let Some(admin) = settings.admin {
            check_port("admin.port", admin, &mut problems);
        }
    }
    for route in &settings.routes {
        if let Transport::Stdio(s) = &route.upstream.transport {
            problems.extend(check_stdio(&route.key, s));
        }
    }
    if let Some(file) = settings.audit.output.as_ref().and_then(|o| o.file.as_ref()) {
        check_audit_file(file, &mut problems);
    }
    if let Some(export) = settings
        .audit
        .output
        .as_ref()
        .and_then(|o| o.export.as_ref())
    {
        check_spool_dir(&export.spool_dir, &mut problems);
    }
    problems
}

fn check_port(key: &'static str, addr: SocketAddr, problems: &mut Vec<Problem>) {
    if addr.port() == 0 {
        return;
    }
    if let Err(e) = std::net::TcpListener::bind(addr) {
        let hint = match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                "another process (perhaps another mcp-guard) is listening there; stop it or \
                 choose another port"
            }
            std::io::ErrorKind::PermissionDenied => {
                "ports below 1024 need privileges; choose a port above 1023"
            }
            _ => "check the address",
        };
        problems.push(Problem {
            key: key.to_string(),
            message: format!("cannot listen on {addr}: {e}; {hint}"),
        });
    }
}

/// The problems of one stdio upstream, whose keys stand under `key` (`upstream`,
/// `upstream.servers[1]`): a `cwd` that is not a directory, a command that does not resolve.
pub fn check_stdio(key: &str, s: &StdioSettings) -> Vec<Problem> {
    let cwd = s.cwd.as_deref().map(Path::new);
    if let Some(dir) = cwd
        && !dir.is_dir()
    {
        // The command may be relative to it: nothing more to say about it until it exists.
        return vec![Problem {
            key: format!("{key}.cwd"),
            message: format!(
                "`{}` is not a directory; create it or fix the path",
                dir.display()
            ),
        }];
    }
    match resolve_command(&s.command, cwd, child_path(s).as_deref()) {
        Ok(_) => Vec::new(),
        Err(message) => vec![Problem {
            key: format!("{key}.command"),
            message,
        }],
    }
}

/// The `PATH` the child's command is looked up in: its own `env` entry, else the gateway's.
pub fn child_path(s: &StdioSettings) -> Option<std::ffi::OsString> {
    s.env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| std::ffi::OsString::from(v))
        .or_else(|| std::env::var_os("PATH"))
}

/// Where `command` would be found when spawned: a name with a `/` relative to `cwd` (the child
/// changes directory before it executes the program), a bare name on `PATH`.
pub fn resolve_command(
    command: &str,
    cwd: Option<&Path>,
    path_var: Option<&std::ffi::OsStr>,
) -> Result<PathBuf, String> {
    if command.is_empty() {
        return Err("is empty; name the program that runs the MCP server".into());
    }
    if command.contains('/') {
        let p = Path::new(command);
        let full = match cwd {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p.to_path_buf(),
        };
        return executable(&full).map(|()| full.clone()).map_err(|why| {
            let base = match cwd {
                Some(dir) if p.is_relative() => format!(" (relative to cwd `{}`)", dir.display()),
                _ if p.is_relative() => " (relative to the directory mcp-guard runs in; use an \
                                          absolute path or set upstream.cwd)"
                    .to_string(),
                _ => String::new(),
            };
            format!("`{}`{base} {why}", full.display())
        });
    }
    let dirs: Vec<PathBuf> = path_var
        .map(|p| std::env::split_paths(p).collect())
        .unwrap_or_default();
    for dir in &dirs {
        let candidate = dir.join(command);
        if executable(&candidate).is_ok() {
            return Ok(candidate);
        }
    }
    Err(format!(
        "`{command}` is not found on PATH; install it, or give its full path"
    ))
}

/// `Ok` when `p` is an executable regular file; otherwise why not.
fn executable(p: &Path) -> Result<(), &'static str> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(p).map_err(|_| "does not exist")?;
    if !meta.is_file() {
        return Err("is not a file");
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err("is not executable (chmod +x it)");
    }
    Ok(())
}

fn check_audit_file(file: &Path, problems: &mut Vec<Problem>) {
    // The writer creates missing directories: the nearest existing ancestor must take them.
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let existing = dir.ancestors().find(|a| a.exists()).unwrap_or(dir);
    let problem = if !existing.is_dir() {
        Some(format!("`{}` is not a directory", existing.display()))
    } else if !writable(existing) {
        Some(format!(
            "`{}` is not writable by this user; choose another audit.file or fix its permissions",
            existing.display()
        ))
    } else if file.is_dir() {
        Some(format!("`{}` is a directory; name a file", file.display()))
    } else {
        None
    };
    if let Some(message) = problem {
        problems.push(Problem {
            key: "audit.file".into(),
            message,
        });
    }
}

fn check_spool_dir(dir: &Path, problems: &mut Vec<Problem>) {
    // The shipper creates it when missing: the nearest existing ancestor must take that.
    let existing = dir.ancestors().find(|a| a.exists()).unwrap_or(dir);
    let message = if !existing.is_dir() {
        format!("`{}` is not a directory", existing.display())
    } else if !writable(existing) {
        format!(
            "`{}` is not writable by this user; choose another audit.spool_dir or fix its \
             permissions",
            existing.display()
        )
    } else {
        return;
    };
    problems.push(Problem {
        key: "audit.spool_dir".into(),
        message,
    });
}

/// Whether this process may create files in `dir`.
#[allow(unsafe_code)]
fn writable(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access(2) reads a NUL-terminated path we own for the duration of the call.
    unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_resolve_on_path_or_relative_to_cwd() {
        let path = std::ffi::OsString::from("/nonexistent:/bin:/usr/bin");
        assert!(resolve_command("sh", None, Some(&path)).is_ok());
        let err = resolve_command("no-such-program-here", None, Some(&path)).unwrap_err();
        assert!(err.contains("not found on PATH"), "{err}");
        // A relative path with a slash is resolved from cwd.
        assert!(resolve_command("./sh", Some(Path::new("/bin")), None).is_ok());
        let err = resolve_command("./nope", Some(Path::new("/bin")), None).unwrap_err();
        assert!(err.contains("relative to cwd `/bin`"), "{err}");
        let err = resolve_command("target/none/x", None, None).unwrap_err();
        assert!(
            err.contains("relative to the directory mcp-guard runs in"),
            "{err}"
        );
        // Not executable.
        let dir = std::env::temp_dir().join(format!("preflight-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("plain");
        std::fs::write(&f, "x").unwrap();
        let err = resolve_command(f.to_str().unwrap(), None, None).unwrap_err();
        assert!(err.contains("not executable"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn audit_directories_must_be_creatable() {
        // Under a file: the directory can never be created (whoever runs the test, root too).
        let file = std::env::temp_dir().join(format!("preflight-file-{}", std::process::id()));
        std::fs::write(&file, "x").unwrap();
        let mut p = Vec::new();
        check_audit_file(&file.join("sub/audit.jsonl"), &mut p);
        let _ = std::fs::remove_file(&file);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].message.contains("is not a directory"), "{p:?}");
        let mut p = Vec::new();
        let tmp = std::env::temp_dir().join("a/b/audit.jsonl");
        check_audit_file(&tmp, &mut p);
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn a_spool_directory_must_be_creatable() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        std::fs::write(&file, "x").unwrap();
        let mut p = Vec::new();
        check_spool_dir(&file.join("spool"), &mut p);
        check_spool_dir(&file, &mut p);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p.iter().all(|p| p.key == "audit.spool_dir"), "{p:?}");
        let mut p = Vec::new();
        check_spool_dir(&dir.path().join("a/b/spool"), &mut p);
        assert!(p.is_empty(), "{p:?}");
    }
}
