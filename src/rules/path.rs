//! The `path_under` check: a path argument, decoded and normalised lexically, must stay under
//! a configured root, on a path-segment boundary.
//!
//! Order matters: percent-decoding comes first (an upstream that decodes `%2e%2e` would
//! otherwise walk a `..` the check never saw), once only (a `%` left after it — `%252e` — is
//! refused rather than decoded again, since whoever decodes twice disagrees with whoever
//! decodes once), then `.`, `..` and empty segments are resolved. A `..` may climb only below
//! the root it is checked against: `/srv/data/a/../b` passes, `/srv/data/../data/b` does not,
//! so no `..` ever reaches a directory outside the root even for a moment (a symlinked segment
//! makes such round trips mean something else on disk). Symlinks themselves are not resolved:
//! the gateway does not see the server's file system.
//!
//! Only a *plain* path is read at all: one no consumer could read as something else. Servers
//! differ (Windows drops trailing dots and spaces from a segment, Tomcat cuts a segment at `;`,
//! URL parsers at `?` and `#`, a Unicode-normalising server folds `．．` into `..`, a leading
//! `//` names a network share to some), so a path one of them could read as a parent
//! reference or another root is refused rather than guessed at; [`normalise`] lists the rules.

/// Why a path was refused (stable words, never the path itself).
pub type Refusal = &'static str;

/// Characters that a Unicode-normalising upstream (NFKC) could turn into `.` or `/` or `\`,
/// so a segment made of them would become `..` after the check: refused outright.
const LOOKALIKES: &[char] = &[
    '\u{3002}', // ideographic full stop (IDNA maps it to `.`)
    '\u{ff61}', // halfwidth ideographic full stop (likewise)
    '\u{2024}', // one dot leader
    '\u{2025}', // two dot leader
    '\u{2026}', // horizontal ellipsis
    '\u{fe52}', // small full stop
    '\u{ff0e}', // fullwidth full stop
    '\u{2044}', // fraction slash
    '\u{2215}', // division slash
    '\u{29f8}', // big solidus
    '\u{ff0f}', // fullwidth solidus
    '\u{2216}', // set minus
    '\u{29f5}', // reverse solidus operator
    '\u{fe68}', // small reverse solidus
    '\u{ff3c}', // fullwidth reverse solidus
    // Windows "best fit" conversion to the Japanese and Korean ANSI code pages turns the yen and
    // won signs into `\` (they share its byte there): `..¥..¥etc` would climb.
    '\u{a5}',   // yen sign
    '\u{20a9}', // won sign
    '\u{ffe5}', // fullwidth yen sign
    '\u{ffe6}', // fullwidth won sign
];

/// A configured root, already checked to be in normal form, as its segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root(Vec<String>);

impl Root {
    /// Parses a root from the config: absolute, in normal form (no `.`, `..`, empty segments,
    /// trailing slash, `%`, backslash or NUL), so what the operator wrote is what is compared.
    pub fn parse(root: &str) -> Result<Root, String> {
        if !root.starts_with('/') {
            return Err(format!("`{root}` is not an absolute path"));
        }
        if root.contains(['%', '\\', '\0']) || root.contains(LOOKALIKES) {
            return Err(format!(
                "`{}` must be written plainly (no %, backslash, NUL or lookalike characters)",
                root.escape_debug()
            ));
        }
        if root == "/" {
            return Ok(Root(Vec::new()));
        }
        let segments: Vec<String> = root[1..].split('/').map(str::to_string).collect();
        if segments
            .iter()
            .any(|s| s.is_empty() || s == "." || s == ".." || !is_plain_segment(s))
            || root.chars().any(crate::pinning::canon::is_invisible)
        {
            return Err(format!(
                "`{}` is not in normal form (no `.`, `..`, `//`, trailing slash, invisible \
                 characters or segments like `...`, `..;`, `.. `)",
                root.escape_debug()
            ));
        }
        Ok(Root(segments))
    }
}

/// Whether `value` names a path under one of `roots`; `Err` says why not.
pub fn check_under(value: &str, roots: &[Root]) -> Result<(), Refusal> {
    let segments = normalise(value)?;
    let admitted = roots.iter().any(|root| {
        let k = root.0.len();
        segments.len() >= k
            && segments.path[..k].iter().zip(&root.0).all(|(a, b)| a == b)
            // A `..` that popped at depth k or less left the root, even if it came back.
            && segments.lowest_pop.is_none_or(|depth| depth > k)
    });
    if admitted {
        Ok(())
    } else {
        Err("not under an allowed root")
    }
}

/// A normalised path, and the lowest depth a `..` popped from on the way.
#[derive(Debug, PartialEq, Eq)]
pub struct Normalised {
    /// The segments, none empty, `.` or `..`.
    pub path: Vec<String>,
    /// The smallest depth (segments on the stack) any `..` was applied at.
    pub lowest_pop: Option<usize>,
}

impl Normalised {
    fn len(&self) -> usize {
        self.path.len()
    }
}

/// Decodes `value` once and resolves its segments; refuses what has no safe reading.
///
/// A plain path, after one percent-decoding: no `%` left (`%252e`), no NUL, backslash,
/// control or invisible character (zero-width, soft hyphen, bidi marks, BOM, variation
/// selectors: [`is_invisible`]), no character that reads as a dot or slash ([`LOOKALIKES`]);
/// absolute, not starting with `//`; and no segment that begins or ends with a space or tab,
/// or that begins with `.` or `..` followed by another `.`, `;`, `?` or `#` (`...`, `..;x`,
/// `..?`, `.;`). Segments `.` and `..` themselves are resolved; `.hidden` and `a..b` are plain.
///
/// [`is_invisible`]: crate::pinning::canon::is_invisible
pub fn normalise(value: &str) -> Result<Normalised, Refusal> {
    if value.contains(['\0', '\\']) {
        return Err("contains a NUL or backslash");
    }
    let decoded = crate::http::percent_decoded(value).ok_or("has a malformed percent escape")?;
    if decoded.contains('%') {
        return Err("is percent-encoded twice");
    }
    if decoded.contains(['\0', '\\']) {
        return Err("contains a NUL or backslash");
    }
    if decoded.contains(LOOKALIKES) {
        return Err("contains a character that reads as a dot or slash");
    }
    if decoded
        .chars()
        .any(|c| c.is_control() || crate::pinning::canon::is_invisible(c))
    {
        return Err("contains a control or invisible character");
    }
    let Some(rest) = decoded.strip_prefix('/') else {
        return Err("is not an absolute path");
    };
    if rest.starts_with('/') {
        return Err("starts with // (a network path to some readers)");
    }
    let mut out = Normalised {
        path: Vec::new(),
        lowest_pop: None,
    };
    for segment in rest.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                let depth = out.path.len();
                if out.path.pop().is_none() {
                    return Err("climbs above /");
                }
                out.lowest_pop = Some(out.lowest_pop.map_or(depth, |d| d.min(depth)));
            }
            s if !is_plain_segment(s) => {
                return Err("has a segment other readers could take for . or ..");
            }
            s => out.path.push(s.to_string()),
        }
    }
    Ok(out)
}

/// Whether a segment (not `.`, `..` or empty) reads as itself to every consumer: Windows
/// drops trailing dots and spaces (`.. ` and `...` become `..`), Tomcat cuts at `;` (`..;x`),
/// URL parsers at `?` and `#`.
fn is_plain_segment(s: &str) -> bool {
    let b = s.as_bytes();
    // Only dots and blanks (`.. .`, `.. ..`): Windows trims trailing dots and spaces, which
    // leaves `..` or nothing.
    if b.iter().all(|c| matches!(c, b'.' | b' ' | b'\t')) {
        return false;
    }
    let edge_blank = |c: Option<&u8>| matches!(c, Some(b' ' | b'\t'));
    if edge_blank(b.first()) || edge_blank(b.last()) {
        return false;
    }
    let dots = b.iter().take_while(|&&c| c == b'.').count();
    let after_dots = b.get(dots.min(2));
    !(dots >= 1 && matches!(after_dots, Some(b'.' | b';' | b'?' | b'#')))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots(r: &[&str]) -> Vec<Root> {
        r.iter().map(|r| Root::parse(r).unwrap()).collect()
    }

    #[test]
    fn paths_under_the_root_pass() {
        let r = roots(&["/srv/data"]);
        for ok in [
            "/srv/data",
            "/srv/data/",
            "/srv/data/a.txt",
            "/srv/data//a/./b",
            "/srv/data/a/../b",
            "/srv/data/%61",
            "/srv/data/r%C3%A9sum%C3%A9.md",
            "/srv/data/.hidden",
            "/srv/data/a..b",
            "/srv/data/x..",
            "/srv/data/..x",
            "/srv/data/a b/c;d",
        ] {
            assert_eq!(check_under(ok, &r), Ok(()), "{ok}");
        }
    }

    #[test]
    fn escapes_and_tricks_are_refused() {
        let r = roots(&["/srv/data"]);
        for bad in [
            "/srv/data/../../etc/passwd",
            "/srv/data/%2e%2e/x",
            "/srv/data/%2E%2E/%2e%2e/etc",
            "/srv/data//..//x",
            "/srv/data/%252e%252e/x",
            "/srv/data/../data/x",
            "/srv/database",
            "/srv/database/x",
            "/srv",
            "/",
            "srv/data/x",
            "",
            "../srv/data",
            "/srv/data/\0",
            "/srv/data/%00",
            "/srv/data\\..\\..\\etc",
            "/srv/data/%5c..%5cx",
            "/srv/data/%2",
            "/srv/data/%zz",
            "/srv/data/\u{ff0e}\u{ff0e}/x",
            "/srv/data/\u{2025}/x",
            "/srv/data/a\u{ff0f}..",
            "/srv/data/%ff",
            "/srv/data/a\nb",
            "/..",
            "/../srv/data/x",
        ] {
            assert!(check_under(bad, &r).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parent_readings_of_other_consumers_are_refused() {
        let r = roots(&["/srv/data"]);
        for bad in [
            // A leading `//` is implementation-defined (POSIX) and a network path to some.
            "//srv/data/x",
            "/%2fsrv/data/x",
            // Tomcat path parameters, URL query and fragment, Windows trailing dots/spaces.
            "/srv/data/a/..;/../../etc",
            "/srv/data/..;/x",
            "/srv/data/..;jsessionid=1/x",
            "/srv/data/..?/x",
            "/srv/data/..#/x",
            "/srv/data/.. /x",
            "/srv/data/..%20/x",
            "/srv/data/..\t/x",
            "/srv/data/ ../x",
            "/srv/data/.../x",
            "/srv/data/..../x",
            "/srv/data/.;/x",
            "/srv/data/%2e%2e%3b/x",
            // Segments of dots and blanks only, which Windows trims to `..` or nothing.
            "/srv/data/.. ./secret",
            "/srv/data/x/.. ./.. ./.. ./etc/passwd",
            "/srv/data/x/.. ../etc",
            "/srv/data/x/..  ./y",
            "/srv/data/x/..%20./..%20./etc",
            // Best-fit backslashes: yen and won signs, raw and encoded.
            "/srv/data/x/..\u{a5}..\u{a5}..\u{a5}etc",
            "/srv/data/x/..%C2%A5..%C2%A5etc",
            "/srv/data/x/..\u{20a9}..\u{20a9}etc",
            "/srv/data/x/..\u{ffe5}etc",
            // Invisible characters between or around the dots, raw and percent-encoded.
            "/srv/data/.\u{200b}./x",
            "/srv/data/..\u{200b}/x",
            "/srv/data/.\u{ad}./x",
            "/srv/data/.%C2%AD./x",
            "/srv/data/.\u{200e}./x",
            "/srv/data/..\u{202e}/x",
            "/srv/data/.%E2%80%8B./x",
            "/srv/data/\u{feff}../x",
            "/srv/data/.\u{fe0f}./x",
            // Other Unicode dots, raw and encoded.
            "/srv/data/\u{ff0e}\u{ff0e}/x",
            "/srv/data/%EF%BC%8E%EF%BC%8E/x",
            "/srv/data/\u{3002}\u{3002}/x",
            "/srv/data/\u{ff61}\u{ff61}/x",
            "/srv/data/\u{2024}\u{2024}/x",
            // Backslash and NUL, raw, encoded once and twice.
            "/srv/data/..\\x",
            "/srv/data/%2e%2e%5c..%5cetc",
            "/srv/data/%2e%2e%5Cx",
            "/srv/data/%252e%252e%255cx",
            "/srv/data/a%00b",
            "/srv/data/%2500",
        ] {
            assert!(check_under(bad, &r).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_root_matches_on_a_segment_boundary_and_slash_admits_all_absolute_paths() {
        let r = roots(&["/srv/data", "/tmp"]);
        assert!(check_under("/tmp/x", &r).is_ok());
        assert!(check_under("/tmpx", &r).is_err());
        let all = roots(&["/"]);
        assert!(check_under("/etc/passwd", &all).is_ok());
        assert!(check_under("/a/../b", &all).is_ok());
        assert!(check_under("/a/b/../c", &all).is_ok());
    }

    #[test]
    fn roots_must_be_written_in_normal_form() {
        for bad in [
            "srv",
            "/srv/",
            "/srv//x",
            "/srv/./x",
            "/srv/../x",
            "/srv/%2e",
            "/srv/...",
            "/srv/..;x",
            "/srv/data ",
            "/srv/da\u{200b}ta",
            "/a\\b",
            "",
        ] {
            assert!(Root::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Root::parse("/").is_ok() && Root::parse("/srv/data").is_ok());
    }
}
