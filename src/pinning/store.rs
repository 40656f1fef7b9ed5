//! The pin file: per server, each tool's approved digest and the change waiting for approval;
//! read at start, on SIGHUP and when it changes on disk, written atomically (temporary file,
//! fsync, rename, fsync of the directory) by the gateway's pin thread and by `mcp-guard pins`.

use super::canon::is_digest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;

/// The file format's version.
pub const VERSION: u32 = 1;
/// Longest description kept for a diff (characters); files written before definitions were
/// kept whole hold only this.
pub const MAX_DESCRIPTION: usize = 2048;
/// Longest canonical definition kept (bytes). A longer one is never pinned nor approvable
/// (reason `too_large`): what the operator approves must be what `pins show` can print whole.
pub const MAX_DEFINITION: usize = 64 * 1024;
/// Most tools recorded per server: beyond, a new tool is not recorded and is hidden in every
/// mode (one `over_cap` event per server says so). This also bounds the pin file and what
/// one answer's publish copies.
pub const MAX_TOOLS: usize = 2_000;
/// Longest tool name recorded (bytes).
pub const MAX_NAME: usize = 256;

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinFile {
    /// [`VERSION`].
    pub version: u32,
    /// Routed server name (`default` for `[upstream]`) → its pins.
    #[serde(default)]
    pub servers: BTreeMap<String, ServerPins>,
}

/// One server's pins.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerPins {
    /// The first complete listing (a page without `nextCursor`) has been seen: from now on a
    /// tool not pinned is new, not trusted on first use.
    #[serde(default)]
    pub sealed: bool,
    /// When the first page of the first listing was answered (unix seconds): first use ends
    /// [`super::FIRST_USE_WINDOW`] later even if no page ends the listing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opened: Option<u64>,
    /// Tool name → pin.
    #[serde(default)]
    pub tools: BTreeMap<String, ToolPin>,
    /// How many tools have a pending change (derived, not stored).
    #[serde(skip)]
    pub pending: usize,
}

/// One tool's pin.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolPin {
    /// The approved definition's digest; `None` for a tool never approved (new, or hidden
    /// text on first sight).
    #[serde(default)]
    pub digest: Option<String>,
    /// The approved definition's description (bounded), for diffs (older files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The approved definition, canonical JSON (at most [`MAX_DEFINITION`] bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<String>,
    /// A definition seen since, waiting for `mcp-guard pins approve`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Pending>,
}

/// A definition that differs from the approved one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pending {
    /// Its digest.
    pub digest: String,
    /// `changed`, `new`, `hidden_text`, `unparseable` or `too_large`.
    pub reason: String,
    /// Its description (bounded; older files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The whole definition, canonical JSON (at most [`MAX_DEFINITION`] bytes; absent when
    /// larger or unparseable): what `pins diff` and `pins show` print.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<String>,
    /// When it was first seen (RFC 3339).
    pub seen: String,
}

impl Pending {
    /// Whether `pins approve` may accept it: an unparseable definition has no digest a later
    /// list could match, and one with hidden text would be refused again on sight.
    pub fn approvable(&self) -> bool {
        self.reason == "changed" || self.reason == "new"
    }
}

impl ServerPins {
    /// Recounts [`ServerPins::pending`].
    pub fn recount(&mut self) {
        self.pending = self.tools.values().filter(|t| t.pending.is_some()).count();
    }
}

/// A description cut to [`MAX_DESCRIPTION`] characters.
pub fn bounded(s: &str) -> String {
    s.chars().take(MAX_DESCRIPTION).collect()
}

impl PinFile {
    /// Parses and checks the file's text.
    pub fn parse(text: &str) -> Result<PinFile, String> {
        let mut f: PinFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if f.version != VERSION {
            return Err(format!(
                "version {} is not supported (expected {VERSION})",
                f.version
            ));
        }
        for (server, pins) in &mut f.servers {
            for (tool, pin) in &pins.tools {
                let bad = pin.digest.as_deref().is_some_and(|d| !is_digest(d))
                    || pin.pending.as_ref().is_some_and(|p| !is_digest(&p.digest));
                if bad {
                    return Err(format!(
                        "server '{server}', tool '{tool}': malformed digest"
                    ));
                }
            }
            pins.recount();
        }
        Ok(f)
    }

    /// Reads `path`: an absent file is an empty store; anything unreadable or malformed is an
    /// error naming the file.
    pub fn load(path: &Path) -> Result<PinFile, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => PinFile::parse(&text)
                .map_err(|e| format!("pin file {} is corrupt: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PinFile {
                version: VERSION,
                servers: BTreeMap::new(),
            }),
            Err(e) => Err(format!("cannot read pin file {}: {e}", path.display())),
        }
    }

    /// Writes `path` atomically: a reader sees the old file or the new one, never a part.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("pins");
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("cannot write pin file {}: {e}", path.display())
        })
    }

    /// Takes in what `disk` (the file as another writer left it) says: the file is the truth
    /// for approvals (`pins approve`, another replica's first pins); what only this process
    /// knows (its own first pins, pending changes not yet written) is kept. A pending change
    /// the file now approves is cleared; a tool this process pinned on first use that the file
    /// pins with another digest takes the file's digest, and the next list marks it changed.
    pub fn merge_from(&mut self, disk: &PinFile) {
        for (server, theirs) in &disk.servers {
            let ours = self.servers.entry(server.clone()).or_default();
            ours.sealed |= theirs.sealed;
            ours.opened = match (ours.opened, theirs.opened) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            for (tool, their) in &theirs.tools {
                let our = ours.tools.entry(tool.clone()).or_default();
                if their.digest.is_some() {
                    our.digest.clone_from(&their.digest);
                    our.description.clone_from(&their.description);
                    our.definition.clone_from(&their.definition);
                }
                let pending = match (our.pending.take(), &their.pending) {
                    (Some(p), _) if Some(&p.digest) != our.digest.as_ref() => Some(p),
                    (Some(_), _) => None,
                    (None, Some(p)) if Some(&p.digest) != our.digest.as_ref() => Some(p.clone()),
                    (None, _) => None,
                };
                our.pending = pending;
                // A pending change the file dropped without approving (`approve` moved it into
                // the digest, which the first arm above already caught) stays.
            }
            ours.recount();
        }
    }

    /// Accepts the pending definition of `tool` on `server` (every approvable one with
    /// `tool = None`). With `digest`, only when the pending definition has that digest (the
    /// one the operator was shown): another is refused and nothing changes. The tools
    /// accepted, with their new digests.
    pub fn approve(
        &mut self,
        server: &str,
        tool: Option<&str>,
        digest: Option<&str>,
    ) -> Result<Vec<(String, String)>, String> {
        let pins = self
            .servers
            .get_mut(server)
            .ok_or_else(|| format!("no pins for server '{}'", shown(server)))?;
        if let Some(t) = tool {
            let Some(pin) = pins.tools.get(t) else {
                return Err(format!(
                    "no tool '{}' pinned on server '{}'",
                    shown(t),
                    shown(server)
                ));
            };
            let Some(p) = &pin.pending else {
                return Err(format!(
                    "tool '{}' on '{}' has no pending definition",
                    shown(t),
                    shown(server)
                ));
            };
            if !p.approvable() {
                return Err(format!(
                    "tool '{}' on '{}' cannot be approved: its definition is {} (fix the server)",
                    shown(t),
                    shown(server),
                    p.reason.replace('_', " ")
                ));
            }
            if let Some(d) = digest
                && d != p.digest
            {
                return Err(format!(
                    "tool '{}' on '{}': the pending definition is now {}, not {d}; nothing approved (run `pins diff` again)",
                    shown(t),
                    shown(server),
                    p.digest
                ));
            }
        }
        let mut accepted = Vec::new();
        for (name, pin) in pins.tools.iter_mut() {
            if tool.is_some_and(|t| t != name) {
                continue;
            }
            match pin.pending.take() {
                Some(p) if p.approvable() => {
                    accepted.push((name.clone(), p.digest.clone()));
                    pin.digest = Some(p.digest);
                    pin.description = p.description;
                    pin.definition = p.definition;
                }
                other => pin.pending = other,
            }
        }
        // Approving is an operator's look at the list: what it did not name is new from now on.
        pins.sealed = true;
        pins.recount();
        Ok(accepted)
    }
}

/// `s` safe to print on a terminal: control, invisible and line-separating characters (and
/// the backslash) written as escapes, everything else as is.
pub fn shown(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '\\' {
            out.push_str("\\\\");
        } else if c.is_control() || super::canon::is_invisible(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn pending(d: &str, reason: &str) -> Pending {
        Pending {
            digest: d.into(),
            reason: reason.into(),
            description: None,
            definition: None,
            seen: "2026-01-01T00:00:00.000Z".into(),
        }
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it_and_an_absent_one_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pins.json");
        assert!(PinFile::load(&path).unwrap().servers.is_empty());
        std::fs::write(&path, "{\"version\":1,\"servers\":").unwrap();
        let e = PinFile::load(&path).unwrap_err();
        assert!(e.contains("pins.json") && e.contains("corrupt"), "{e}");
        std::fs::write(
            &path,
            r#"{"version":1,"servers":{"a":{"tools":{"t":{"digest":"md5:x"}}}}}"#,
        )
        .unwrap();
        assert!(
            PinFile::load(&path)
                .unwrap_err()
                .contains("malformed digest")
        );
        std::fs::write(&path, r#"{"version":9,"servers":{}}"#).unwrap();
        assert!(PinFile::load(&path).unwrap_err().contains("version 9"));
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pins.json");
        let mut f = PinFile {
            version: VERSION,
            ..Default::default()
        };
        let s = f.servers.entry("default".into()).or_default();
        s.tools.insert(
            "echo".into(),
            ToolPin {
                digest: Some(digest('a')),
                description: Some("d".into()),
                definition: Some("{\"name\":\"echo\"}".into()),
                pending: Some(pending(&digest('b'), "changed")),
            },
        );
        s.recount();
        f.save(&path).unwrap();
        assert_eq!(PinFile::load(&path).unwrap(), f);
    }

    #[test]
    fn approve_moves_pending_into_the_pin_but_never_hidden_text() {
        let mut f = PinFile {
            version: VERSION,
            ..Default::default()
        };
        let s = f.servers.entry("x".into()).or_default();
        s.tools.insert(
            "a".into(),
            ToolPin {
                digest: Some(digest('a')),
                description: None,
                definition: None,
                pending: Some(pending(&digest('b'), "changed")),
            },
        );
        s.tools.insert(
            "h".into(),
            ToolPin {
                pending: Some(pending(&digest('c'), "hidden_text")),
                ..Default::default()
            },
        );
        assert!(f.approve("x", Some("h"), None).is_err());
        assert!(f.approve("nope", None, None).is_err());
        assert!(f.approve("x", Some("missing"), None).is_err());
        // Not the digest the operator saw: refused, nothing changes.
        let e = f.approve("x", Some("a"), Some(&digest('c'))).unwrap_err();
        assert!(e.contains("now") && e.contains(&digest('b')), "{e}");
        assert!(f.servers["x"].tools["a"].pending.is_some());
        assert!(!f.servers["x"].sealed);
        assert_eq!(
            f.approve("x", Some("a"), Some(&digest('b'))).unwrap(),
            vec![("a".to_string(), digest('b'))]
        );
        assert!(f.approve("x", None, None).unwrap().is_empty());
        let s = &f.servers["x"];
        assert_eq!(s.tools["a"].digest.as_deref(), Some(digest('b').as_str()));
        assert!(s.tools["h"].pending.is_some());
        assert_eq!(s.pending, 1);
        assert!(s.sealed);
    }

    #[test]
    fn shown_never_lets_a_control_character_through() {
        assert_eq!(shown("add"), "add");
        assert_eq!(
            shown("zz\r  add\n\u{1b}[2K\u{200B}\\"),
            "zz\\u{d}  add\\u{a}\\u{1b}[2K\\u{200b}\\\\"
        );
    }

    #[test]
    fn merge_takes_the_files_approvals_and_keeps_what_only_memory_knows() {
        let mut ours = PinFile::default();
        let s = ours.servers.entry("x".into()).or_default();
        s.tools.insert(
            "a".into(),
            ToolPin {
                digest: Some(digest('a')),
                description: None,
                definition: None,
                pending: Some(pending(&digest('b'), "changed")),
            },
        );
        s.tools.insert(
            "mine".into(),
            ToolPin {
                digest: Some(digest('m')),
                ..Default::default()
            },
        );
        let mut disk = PinFile::default();
        disk.servers.entry("x".into()).or_default().tools.insert(
            "a".into(),
            ToolPin {
                digest: Some(digest('b')),
                ..Default::default()
            },
        );
        ours.merge_from(&disk);
        let s = &ours.servers["x"];
        assert_eq!(s.tools["a"].digest.as_deref(), Some(digest('b').as_str()));
        assert!(s.tools["a"].pending.is_none());
        assert!(s.tools.contains_key("mine"));
        assert_eq!(s.pending, 0);
    }
}
