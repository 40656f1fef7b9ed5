//! RFC 7662 token introspection off the workers: a few threads of their own take jobs from a
//! bounded queue, ask the authorization server's introspection endpoint (client
//! authentication with the gateway's client id and secret), and answer each job on its own
//! channel. A worker never waits on the network: it queues a job (a full queue is a refusal
//! at once, never memory that grows) and awaits the answer with a deadline.

use super::fetch::{self, IdpUrl};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Jobs waiting for a thread; one more is refused at once.
pub const QUEUE: usize = 256;
/// Threads asking the endpoint (each call blocks one for at most [`CALL_TIMEOUT`]).
const THREADS: usize = 4;
/// One call, connect to last byte.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an `active: true` answer without `exp` is trusted before asking again.
pub const CACHE_WITHOUT_EXP: Duration = Duration::from_secs(60);
/// How long a refusal (`active: false`, or a token refused on its claims) is remembered, so
/// a client retrying a dead token does not cost a call each time.
pub const REFUSAL_TTL: Duration = Duration::from_secs(10);
/// The longest user id accepted from an answer.
const MAX_USER: usize = 256;

/// What the endpoint said about a token, as far as the gateway reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Introspected {
    /// `active`.
    pub active: bool,
    /// The user (from the configured `user_id_claim` member), if present and usable.
    pub subject: Option<String>,
    /// `scope`, split.
    pub scopes: Vec<String>,
    /// `exp`.
    pub exp: Option<u64>,
    /// `nbf`.
    pub nbf: Option<u64>,
    /// `aud` (a string or an array of strings).
    pub aud: Vec<String>,
    /// `iss`.
    pub iss: Option<String>,
}

/// The answer a job gets: the endpoint's verdict, or why there is none (an audit reason).
pub type Outcome = Result<Introspected, &'static str>;

struct Job {
    token: Box<str>,
    reply: async_channel::Sender<Outcome>,
}

/// One introspection endpoint, its credentials and its queue.
pub struct Introspector {
    url: IdpUrl,
    client_id: String,
    /// `Basic` credentials (RFC 7662 §2.1 client authentication, RFC 6749 §2.3.1 encoding).
    authorization: String,
    user_id_claim: String,
    queue: SyncSender<Job>,
    jobs: Mutex<Option<Receiver<Job>>>,
}

impl std::fmt::Debug for Introspector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("Introspector")
            .field("url", &self.url.url)
            .field("client_id", &self.client_id)
            .finish()
    }
}

impl Introspector {
    /// An introspector for `url`, authenticating as `client_id` / `client_secret`.
    pub fn new(url: IdpUrl, client_id: &str, client_secret: &str, user_id_claim: &str) -> Self {
        use base64::Engine as _;
        let pair = format!("{}:{}", form_encode(client_id), form_encode(client_secret));
        let (queue, jobs) = std::sync::mpsc::sync_channel(QUEUE);
        Introspector {
            url,
            client_id: client_id.to_string(),
            authorization: format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            ),
            user_id_claim: user_id_claim.to_string(),
            queue,
            jobs: Mutex::new(Some(jobs)),
        }
    }

    /// Whether `other` asks the same endpoint the same way (a reload may keep this one).
    pub fn same_source(&self, other: &Introspector) -> bool {
        self.url == other.url
            && self.authorization == other.authorization
            && self.user_id_claim == other.user_id_claim
    }

    /// Starts the threads (once); they end when the introspector is dropped (its
    /// configuration snapshot was replaced and is gone) and the queue is drained.
    pub fn start(self: &Arc<Self>) {
        let Some(jobs) = self.jobs.lock().ok().and_then(|mut j| j.take()) else {
            return;
        };
        let jobs = Arc::new(Mutex::new(jobs));
        for _ in 0..THREADS {
            let (jobs, me) = (jobs.clone(), Arc::downgrade(self));
            let spawned = std::thread::Builder::new()
                .name("introspect".into())
                .spawn(move || run(&jobs, &me));
            if let Err(e) = spawned {
                tracing::error!(target: "mcp_guard::auth", "cannot start an introspection thread: {e}");
            }
        }
    }

    /// Queues `token` for introspection; the receiver gets the answer. `Err`: the queue is
    /// full (or the threads are gone), an audit reason.
    pub fn ask(&self, token: &str) -> Result<async_channel::Receiver<Outcome>, &'static str> {
        let (reply, answer) = async_channel::bounded(1);
        let job = Job {
            token: token.into(),
            reply,
        };
        match self.queue.try_send(job) {
            Ok(()) => Ok(answer),
            Err(TrySendError::Full(_)) => Err("oauth_introspection_busy"),
            Err(TrySendError::Disconnected(_)) => Err("oauth_introspection_unavailable"),
        }
    }

    /// One call to the endpoint.
    fn introspect(&self, token: &str) -> Outcome {
        let form = format!("token={}&token_type_hint=access_token", form_encode(token));
        let answer = fetch::post_form(
            &self.url,
            &[("authorization", &self.authorization)],
            &form,
            CALL_TIMEOUT,
        )
        .map_err(|e| {
            tracing::warn!(target: "mcp_guard::auth", "introspection at {} failed: {e}", self.url.url);
            "oauth_introspection_unavailable"
        })?;
        if answer.status != 200 {
            tracing::warn!(target: "mcp_guard::auth", "introspection at {} answered HTTP {}", self.url.url, answer.status);
            return Err("oauth_introspection_unavailable");
        }
        parse_answer(&answer.body, &self.user_id_claim).map_err(|why| {
            tracing::warn!(target: "mcp_guard::auth", "introspection at {} answered something unusable: {why}", self.url.url);
            "oauth_introspection_bad_answer"
        })
    }
}

fn run(jobs: &Mutex<Receiver<Job>>, me: &std::sync::Weak<Introspector>) {
    loop {
        // The lock is held only while waiting for the next job; the call runs without it.
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        // A job whose request has given up (its deadline passed) costs no call.
        if job.reply.receiver_count() == 0 {
            continue;
        }
        let Some(introspector) = me.upgrade() else {
            return;
        };
        let outcome = introspector.introspect(&job.token);
        drop(introspector);
        let _ = job.reply.try_send(outcome);
    }
}

/// `application/x-www-form-urlencoded` of `s` (unreserved characters kept, the rest
/// percent-encoded).
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Reads an introspection answer (RFC 7662 §2.2). Hostile answers are refused, never
/// half-read: `active` must be a boolean; every member read must have its registered type.
pub fn parse_answer(body: &[u8], user_id_claim: &str) -> Result<Introspected, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let active = match obj.get("active") {
        Some(serde_json::Value::Bool(b)) => *b,
        Some(_) => return Err("`active` is not a boolean".into()),
        None => return Err("no `active` member".into()),
    };
    if !active {
        // Nothing else in an inactive answer means anything (§2.2).
        return Ok(Introspected {
            active,
            subject: None,
            scopes: Vec::new(),
            exp: None,
            nbf: None,
            aud: Vec::new(),
            iss: None,
        });
    }
    let time = |name: &str| -> Result<Option<u64>, String> {
        match obj.get(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::Number(n)) => n
                .as_u64()
                .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f.floor() as u64))
                .map(Some)
                .ok_or_else(|| format!("`{name}` is not a time")),
            Some(_) => Err(format!("`{name}` is not a number")),
        }
    };
    let string = |name: &str| -> Result<Option<String>, String> {
        match obj.get(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("`{name}` is not a string")),
        }
    };
    let aud = match obj.get("aud") {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or("`aud` holds a non-string")?,
        Some(_) => return Err("`aud` is not a string or an array".into()),
    };
    let scopes = string("scope")?
        .map(|s| {
            s.split(' ')
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let subject = string(user_id_claim)?.filter(|s| {
        !s.trim().is_empty()
            && s.trim() == s
            && s.len() <= MAX_USER
            && !s.chars().any(super::jwt::forbidden_in_identity)
    });
    Ok(Introspected {
        active,
        subject,
        scopes,
        exp: time("exp")?,
        nbf: time("nbf")?,
        aud,
        iss: string("iss")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_strictly() {
        let a = parse_answer(
            br#"{"active":true,"sub":"alice","scope":"a  b","exp":99,"aud":["x","y"],"iss":"i"}"#,
            "sub",
        )
        .unwrap();
        assert_eq!(a.subject.as_deref(), Some("alice"));
        assert_eq!(a.scopes, ["a", "b"]);
        assert_eq!((a.exp, a.aud.len()), (Some(99), 2));
        assert!(
            !parse_answer(br#"{"active":false,"sub":7}"#, "sub")
                .unwrap()
                .active
        );
        for bad in [
            &br#"{"active":"true"}"#[..],
            br#"{"sub":"a"}"#,
            br#"[true]"#,
            br#"not json"#,
            br#"{"active":true,"exp":"99"}"#,
            br#"{"active":true,"aud":[1]}"#,
            br#"{"active":true,"sub":["a"]}"#,
            br#"{"active":true,"exp":-5}"#,
        ] {
            assert!(
                parse_answer(bad, "sub").is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // An unusable user id is no user id (the token is then refused for lacking one).
        let a = parse_answer(br#"{"active":true,"sub":"al\u200bice"}"#, "sub").unwrap();
        assert_eq!(a.subject, None);
    }

    #[test]
    fn a_full_queue_refuses_at_once_instead_of_growing() {
        let url = IdpUrl::parse("http://127.0.0.1:1/introspect").unwrap();
        // Not started: nothing takes jobs off the queue.
        let i = Introspector::new(url, "id", "secret", "sub");
        let held: Vec<_> = (0..QUEUE)
            .map(|n| i.ask(&format!("t{n}")).unwrap())
            .collect();
        assert_eq!(i.ask("one-more").unwrap_err(), "oauth_introspection_busy");
        assert_eq!(held.len(), QUEUE);
        // Its Debug never shows the secret.
        assert!(!format!("{i:?}").contains("secret"));
    }

    #[test]
    fn form_values_are_percent_encoded() {
        assert_eq!(form_encode("a b&c=d+é"), "a%20b%26c%3Dd%2B%C3%A9");
        assert_eq!(form_encode("Az09-._~"), "Az09-._~");
    }
}
