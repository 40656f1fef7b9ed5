//! Streamable HTTP transport rules (MCP 2025-11-25, back to 2025-03-26): Origin, protocol
//! version, Accept and Content-Type, batches, and `Mcp-Method` / `Mcp-Name` agreement.

use crate::error::GatewayError;
use crate::http::request::RequestHead;
use crate::mcp::jsonrpc::{Message, Target};

/// Protocol revisions served, newest first.
pub const SUPPORTED_VERSIONS: &[&str] = &["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];

/// The revision assumed when a request carries no `MCP-Protocol-Version` (the spec's rule for
/// clients that predate the header).
pub const DEFAULT_VERSION: &str = "2025-03-26";

/// A browser `Origin` must be listed; requests without one (non-browser clients) pass.
pub fn check_origin(head: &RequestHead, allowed: &[String]) -> Result<(), GatewayError> {
    let Some(origin) = head.h.origin() else {
        return Ok(());
    };
    let o = origin.trim_end_matches('/').to_ascii_lowercase();
    if allowed.contains(&o) {
        Ok(())
    } else {
        Err(GatewayError::OriginForbidden)
    }
}

/// Validates `MCP-Protocol-Version`; returns the revision in effect.
pub fn check_protocol_version(head: &RequestHead) -> Result<&'static str, GatewayError> {
    match head.h.protocol_version() {
        None => Ok(DEFAULT_VERSION),
        Some(v) => SUPPORTED_VERSIONS
            .iter()
            .find(|s| **s == v)
            .copied()
            .ok_or_else(|| GatewayError::UnsupportedProtocolVersion(truncate(v, 64))),
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// An initialize request whose `params.protocolVersion` names a revision this gateway does not
/// serve, rewritten to ask for the latest one it does; `None` when it needs no change (or is not
/// an initialize the gateway can read, which the upstream then judges as sent).
pub fn initialize_within_served_versions(raw: &[u8]) -> Option<Vec<u8>> {
    let mut message: serde_json::Value = serde_json::from_slice(raw).ok()?;
    let asked = message.pointer("/params/protocolVersion")?.as_str()?;
    if SUPPORTED_VERSIONS.contains(&asked) {
        return None;
    }
    *message.pointer_mut("/params/protocolVersion")? = SUPPORTED_VERSIONS[0].into();
    serde_json::to_vec(&message).ok()
}

/// Batches were removed in 2025-06-18; they remain for 2025-03-26 (and older) clients.
pub fn batch_allowed(version: &str) -> bool {
    version == "2025-03-26" || version == "2024-11-05"
}

/// Whether an Accept header value allows each of `wanted` (type/subtype), in one pass. Each
/// wanted type is decided by the most specific range that names it (exact, then `type/*`, then
/// `*/*`), as RFC 9110 §12.5.1 orders them, so `application/json;q=0, */*` refuses JSON; among
/// equally specific ranges one with a non-zero weight is enough.
fn accepts_each<const N: usize>(accept: &str, wanted: [&str; N]) -> [bool; N] {
    // Per wanted type: how specific its best range was, and whether that range allows it.
    let mut best: [Option<(u8, bool)>; N] = [None; N];
    for item in accept.split(',') {
        let (range, params) = match item.split_once(';') {
            Some((range, params)) => (range.trim(), Some(params)),
            None => (item.trim(), None),
        };
        let mut allowed: Option<bool> = None;
        for (slot, w) in best.iter_mut().zip(wanted) {
            let wtype = w.split_once('/').map_or(w, |(t, _)| t);
            let specificity = if range.eq_ignore_ascii_case(w) {
                3
            } else if range
                .strip_suffix("/*")
                .is_some_and(|t| t != "*" && t.eq_ignore_ascii_case(wtype))
            {
                2
            } else if range == "*/*" {
                1
            } else {
                continue;
            };
            let ok = *allowed.get_or_insert_with(|| !params.is_some_and(weight_is_zero));
            match *slot {
                Some((s, was_ok)) if s > specificity || (s == specificity && was_ok) => {}
                _ => *slot = Some((specificity, ok)),
            }
        }
    }
    best.map(|b| b.is_some_and(|(_, ok)| ok))
}

/// Whether a range's parameters give it weight zero (`q=0`, `q=0.`, up to `q=0.000`).
fn weight_is_zero(params: &str) -> bool {
    params.split(';').any(|p| {
        let p = p.trim();
        let Some(value) = p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")) else {
            return false;
        };
        value.strip_prefix('0').is_some_and(|rest| {
            rest.is_empty()
                || rest
                    .strip_prefix('.')
                    .is_some_and(|d| d.len() <= 3 && d.bytes().all(|b| b == b'0'))
        })
    })
}

/// POST needs `Content-Type: application/json` and an Accept allowing JSON and SSE.
pub fn check_post_headers(head: &RequestHead) -> Result<(), GatewayError> {
    check_content_type(head)?;
    let accept = head.h.accept().unwrap_or("");
    // The form the official SDKs send, and the transport spells, is settled without parsing.
    if accept != "application/json, text/event-stream"
        && accepts_each(accept, ["application/json", "text/event-stream"]) != [true, true]
    {
        return Err(GatewayError::NotAcceptable(
            "both application/json and text/event-stream",
        ));
    }
    Ok(())
}

/// A POSTed body must be declared JSON (both transports).
pub fn check_content_type(head: &RequestHead) -> Result<(), GatewayError> {
    let ct_ok = head.h.content_type().is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
    });
    if !ct_ok {
        return Err(GatewayError::UnsupportedMediaType);
    }
    Ok(())
}

/// GET opens an SSE stream, so Accept must allow text/event-stream.
pub fn check_stream_accept(head: &RequestHead) -> Result<(), GatewayError> {
    if accepts_each(head.h.accept().unwrap_or(""), ["text/event-stream"]) == [true] {
        Ok(())
    } else {
        Err(GatewayError::NotAcceptable("text/event-stream"))
    }
}

/// The sentinel around an `Mcp-Name` value that cannot travel as plain header text (SEP-2243,
/// "Value Encoding": non-ASCII, control characters, edge whitespace, or a plain value that
/// looks like the sentinel itself): `=?base64?{standard Base64 of the UTF-8 bytes}?=`, the
/// markers lowercase and case-sensitive.
const NAME_PREFIX: &str = "=?base64?";
const NAME_SUFFIX: &str = "?=";

/// The name an `Mcp-Name` header value stands for: the value itself, or the decoded sentinel
/// form. Decoding is strict (the standard alphabet with its padding, no whitespace, UTF-8):
/// anything else wearing the markers is refused, never compared as it stands, since a client
/// must encode every value that looks like the sentinel.
pub fn mcp_name(value: &str) -> Result<std::borrow::Cow<'_, str>, String> {
    use base64::Engine;
    let Some(payload) = value
        .strip_prefix(NAME_PREFIX)
        .and_then(|v| v.strip_suffix(NAME_SUFFIX))
    else {
        return Ok(std::borrow::Cow::Borrowed(value));
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload)
        .map_err(|_| "Mcp-Name header is not valid =?base64?…?= (standard Base64 with padding)")?;
    String::from_utf8(bytes)
        .map(std::borrow::Cow::Owned)
        .map_err(|_| "Mcp-Name header's base64 value is not UTF-8".into())
}

/// `Mcp-Method` and `Mcp-Name`, where sent, must say what the body says: an intermediary that
/// routes on headers must not be told one thing while the server is told another. A name in
/// the base64 form is compared decoded.
pub fn check_method_headers(head: &RequestHead, m: &Message) -> Result<(), GatewayError> {
    if let Some(hm) = head.h.mcp_method()
        && Some(hm) != m.method.as_deref()
    {
        return Err(GatewayError::HeaderMismatch(format!(
            "Mcp-Method header `{}` does not match the body's method",
            truncate(hm, 64)
        )));
    }
    if let Some(hn) = head.h.mcp_name() {
        let name = mcp_name(hn).map_err(GatewayError::HeaderMismatch)?;
        let body_name = match &m.target {
            Some(Target::Tool(n)) | Some(Target::Prompt(n)) | Some(Target::Resource(n)) => {
                Some(n.as_str())
            }
            None => None,
        };
        if body_name != Some(&*name) {
            return Err(GatewayError::HeaderMismatch(format!(
                "Mcp-Name header `{}` does not match the body",
                truncate(hn, 64)
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_initialize_for_an_unserved_revision_asks_for_the_latest_served_one() {
        let ask = |v: &str| {
            format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"initialize","params":{{"protocolVersion":"{v}","capabilities":{{}}}}}}"#
            )
        };
        assert!(initialize_within_served_versions(ask("2025-06-18").as_bytes()).is_none());
        let out = initialize_within_served_versions(ask("2099-01-01").as_bytes()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["params"]["protocolVersion"], SUPPORTED_VERSIONS[0]);
        assert_eq!(v["id"], 1);
        assert!(initialize_within_served_versions(b"{}").is_none());
    }

    #[test]
    fn accept_matching_honours_wildcards_and_q0() {
        let accepts = |accept: &str, wanted: &str| accepts_each(accept, [wanted]) == [true];
        assert!(accepts(
            "application/json, text/event-stream",
            "text/event-stream"
        ));
        assert!(accepts("*/*", "application/json"));
        assert!(accepts("application/*;q=0.5", "application/json"));
        assert!(!accepts("application/json;q=0", "application/json"));
        assert!(!accepts("text/html", "application/json"));
        for zero in ["q=0", "Q=0", "q=0.", "q=0.0", "q=0.00", "q=0.000", " q=0 "] {
            assert!(!accepts(
                &format!("application/json;{zero}"),
                "application/json"
            ));
        }
        assert!(accepts("application/json;q=0.001", "application/json"));
        assert!(
            accepts("application/json;q=0.0001", "application/json"),
            "not a qvalue"
        );
        // The most specific range decides.
        assert!(!accepts("application/json;q=0, */*", "application/json"));
        assert!(!accepts("application/*;q=0, */*", "application/json"));
        assert!(accepts("*/*;q=0, application/json", "application/json"));
        assert!(accepts(
            "application/json;q=0, application/json",
            "application/json"
        ));
        assert!(!accepts("*/*;q=0", "application/json"));
        assert!(!accepts("", "application/json"));
        assert!(!accepts("*/json", "application/json"), "not a media range");
        assert_eq!(
            accepts_each(
                "text/event-stream, application/json",
                ["application/json", "text/event-stream"]
            ),
            [true, true]
        );
        assert_eq!(
            accepts_each(
                "application/json",
                ["application/json", "text/event-stream"]
            ),
            [true, false]
        );
    }

    #[test]
    fn a_base64_mcp_name_is_decoded_strictly() {
        let plain = |v: &str| mcp_name(v).map(|c| c.into_owned());
        assert_eq!(plain("read_file").as_deref(), Ok("read_file"));
        // "Привет" and the spec's own example, whose payload holds `/`.
        assert_eq!(
            plain("=?base64?0J/RgNC40LLQtdGC?=").as_deref(),
            Ok("Привет")
        );
        assert_eq!(
            plain("=?base64?PT9iYXNlNjQ/bGl0ZXJhbD89?=").as_deref(),
            Ok("=?base64?literal?=")
        );
        assert_eq!(plain("=?base64??=").as_deref(), Ok(""));
        for bad in [
            "=?base64?0J/RgNC40LLQtdGC=?=",
            "=?base64?0J_RgNC40LLQtdGC?=",
            "=?base64?0J/R gNC40LLQtdGC?=",
            "=?base64?YQ?=",
            "=?base64?/w==?=",
            "=?base64?!!!!?=",
        ] {
            assert!(mcp_name(bad).is_err(), "{bad}");
        }
        // Other spellings of the markers are not the sentinel: compared as they stand.
        assert_eq!(plain("=?BASE64?YQ==?=").as_deref(), Ok("=?BASE64?YQ==?="));
    }

    #[test]
    fn batches_only_for_old_revisions() {
        assert!(batch_allowed("2025-03-26"));
        assert!(!batch_allowed("2025-06-18"));
        assert!(!batch_allowed("2025-11-25"));
    }
}
