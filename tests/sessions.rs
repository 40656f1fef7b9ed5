//! Session ids across replicas, restarts and key rotation: with `server.session_keys` (or a key
//! file) every gateway holding the same keys accepts a session any of them opened, a restart
//! keeps sessions, a rotated-out key stops verifying at the reload that removes it, and a
//! gateway with other keys does not know the session.

mod common;

use common::*;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);
/// Two keys, each the base64 of 32 bytes.
const KEY_A: &str = "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=";
const KEY_B: &str = "ESIzRFVmd4iZqrvM3e7/ABEiM0RVZneImaq7zN3u/wA=";

fn config(up: &DemoHttp, keys: &[&str]) -> String {
    let keys: Vec<String> = keys.iter().map(|k| format!("{k:?}")).collect();
    http_config(
        "auto",
        &up.url(),
        &format!("session_keys = [{}]", keys.join(", ")),
        "",
    )
}

/// A tools/call in session `sid` at `g`: the HTTP status and the echoed text, if any.
fn echo(g: &Gateway, sid: &str) -> (u16, Option<String>) {
    let r = mcp_post(g.addr, &call(7, "echo", r#"{"text":"across"}"#), Some(sid));
    if r.status != 200 {
        return (r.status, None);
    }
    let text = rpc_result(&r)["result"]["content"][0]["text"]
        .as_str()
        .map(str::to_string);
    (r.status, text)
}

#[test]
fn a_session_opened_on_one_replica_is_served_by_another_with_the_same_keys() {
    let up = DemoHttp::start(&[]);
    let a = Gateway::start(&config(&up, &[KEY_A]));
    let b = Gateway::start(&config(&up, &[KEY_A]));
    let sid = initialize(a.addr);
    let (status, text) = echo(&b, &sid);
    assert_eq!(status, 200);
    assert!(text.is_some_and(|t| t.contains("across")));
    // A replica with another key does not know the session: 404, the client starts over.
    let other = Gateway::start(&config(&up, &[KEY_B]));
    assert_eq!(echo(&other, &sid).0, 404);
}

#[test]
fn a_restart_keeps_sessions_when_the_keys_are_configured() {
    let up = DemoHttp::start(&[]);
    let first = Gateway::start(&config(&up, &[KEY_A]));
    let sid = initialize(first.addr);
    drop(first);
    let restarted = Gateway::start(&config(&up, &[KEY_A]));
    assert_eq!(echo(&restarted, &sid).0, 200);
}

#[test]
fn without_configured_keys_a_reload_keeps_sessions_and_another_process_does_not_know_them() {
    let up = DemoHttp::start(&[]);
    let plain = http_config("auto", &up.url(), "", "");
    let g = Gateway::start(&plain);
    let sid = initialize(g.addr);
    // A reload (of an unrelated key) draws no new key.
    g.reload(
        &plain.replace("timeout_secs = 10", "timeout_secs = 11"),
        WAIT,
    );
    assert_eq!(echo(&g, &sid).0, 200);
    let other = Gateway::start(&plain);
    assert_eq!(echo(&other, &sid).0, 404);
}

#[test]
fn rotation_old_sessions_live_while_their_key_is_listed_and_end_when_it_is_removed() {
    let up = DemoHttp::start(&[]);
    let g = Gateway::start(&config(&up, &[KEY_A]));
    let old = initialize(g.addr);
    // Step 1: the new key first, the old one still verifying.
    g.reload(&config(&up, &[KEY_B, KEY_A]), WAIT);
    assert_eq!(echo(&g, &old).0, 200, "the old key still verifies");
    let new = initialize(g.addr);
    // Step 2: the old key removed. Its sessions end at once, also on workers that had already
    // verified (and cached) them.
    g.reload(&config(&up, &[KEY_B]), WAIT);
    for _ in 0..4 {
        assert_eq!(echo(&g, &old).0, 404, "a removed key verifies nothing");
        assert_eq!(echo(&g, &new).0, 200);
    }
}

#[test]
fn keys_come_from_a_file_reread_at_each_reload() {
    let up = DemoHttp::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("session.keys");
    std::fs::write(&file, format!("# current\n{KEY_A}\n")).unwrap();
    let config = http_config(
        "auto",
        &up.url(),
        &format!("session_key_file = {:?}", file.display().to_string()),
        "",
    );
    let a = Gateway::start(&config);
    let b = Gateway::start(&config);
    let sid = initialize(a.addr);
    assert_eq!(echo(&b, &sid).0, 200);
    // The file alone changes; the reload reads it again.
    std::fs::write(&file, format!("{KEY_B}\n")).unwrap();
    b.reload(&config, WAIT);
    assert_eq!(echo(&b, &sid).0, 404);
}

#[test]
fn weak_malformed_or_doubled_keys_are_refused_without_echoing_them() {
    let up = DemoHttp::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("k");
    std::fs::write(&file, "").unwrap();
    let short = "c2hvcnQta2V5LW9mLTIwLWJ5dGVz"; // 20 bytes
    let cases = [
        (config(&up, &[short]), "at least 32", Some(short)),
        (
            config(&up, &["not base64 at all!"]),
            "not base64",
            Some("not base64 at all"),
        ),
        (
            http_config(
                "auto",
                &up.url(),
                &format!(
                    "session_keys = [{KEY_A:?}]\nsession_key_file = {:?}",
                    file.display().to_string()
                ),
                "",
            ),
            "not both",
            Some(KEY_A),
        ),
        (
            http_config(
                "auto",
                &up.url(),
                &format!("session_key_file = {:?}", file.display().to_string()),
                "",
            ),
            "holds no key",
            None,
        ),
    ];
    for (config, want, secret) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("guard.toml");
        std::fs::write(&path, &config).unwrap();
        let out = std::process::Command::new(GUARD)
            .args(["validate", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{config}\n{text}");
        assert!(text.contains(want), "want {want:?} in:\n{text}");
        if let Some(secret) = secret {
            assert!(!text.contains(secret), "the key is echoed:\n{text}");
        }
    }
}
