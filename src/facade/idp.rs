//! The facade's calls to the upstream identity provider (GitHub, Google, Okta, any OAuth
//! server): provider defaults, and the threads that exchange a sign-in's code and read the
//! user's id. The calls block, so they run here, never on a worker: a worker sends a job and
//! awaits the answer on a channel with a deadline.

use crate::auth::fetch::{self, IdpUrl};
use crate::config::schema::OauthProvider;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One IdP request, connect to last byte.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a worker waits for a whole job (code exchange and user lookup).
pub const JOB_TIMEOUT: Duration = Duration::from_secs(25);
/// Threads serving jobs; a slow IdP holds one of them per sign-in.
const THREADS: usize = 4;
/// Jobs waiting beyond the busy threads; more is refused at once ("try again").
const QUEUE: usize = 64;
/// The longest user id accepted from an IdP.
const MAX_USER_ID: usize = 256;

/// Where a provider's endpoints are, and which scopes and user-id field it uses by default.
pub struct Defaults {
    /// Authorization endpoint (the browser is sent there).
    pub authorization_url: Option<&'static str>,
    /// Token endpoint.
    pub token_url: Option<&'static str>,
    /// Who signed in.
    pub userinfo_url: Option<&'static str>,
    /// Scopes asked of the IdP.
    pub scopes: &'static [&'static str],
    /// The userinfo member that names the user.
    pub user_id_claim: &'static str,
}

/// The defaults of `provider`; `okta` and `custom` have no URLs of their own.
pub fn defaults(provider: OauthProvider) -> Defaults {
    match provider {
        OauthProvider::Github => Defaults {
            authorization_url: Some("https://github.com/login/oauth/authorize"),
            token_url: Some("https://github.com/login/oauth/access_token"),
            userinfo_url: Some("https://api.github.com/user"),
            scopes: &["read:user"],
            // The numeric id: a login can be renamed and then taken by someone else.
            user_id_claim: "id",
        },
        OauthProvider::Google => Defaults {
            authorization_url: Some("https://accounts.google.com/o/oauth2/v2/auth"),
            token_url: Some("https://oauth2.googleapis.com/token"),
            userinfo_url: Some("https://openidconnect.googleapis.com/v1/userinfo"),
            scopes: &["openid", "email"],
            user_id_claim: "sub",
        },
        OauthProvider::Okta | OauthProvider::Custom => Defaults {
            authorization_url: None,
            token_url: None,
            userinfo_url: None,
            scopes: &["openid", "profile"],
            user_id_claim: "sub",
        },
    }
}

/// The facade's own client at the IdP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdpClient {
    /// Client id.
    pub client_id: String,
    /// Client secret (sent in the token request's body).
    pub client_secret: Option<String>,
    /// Authorization endpoint, as a URL the browser is sent to.
    pub authorization_url: String,
    /// Token endpoint.
    pub token_url: IdpUrl,
    /// Userinfo endpoint.
    pub userinfo_url: IdpUrl,
    /// The facade's callback, registered at the IdP.
    pub redirect_uri: String,
    /// Scopes asked of the IdP.
    pub scopes: Vec<String>,
    /// The userinfo member naming the user.
    pub user_id_claim: String,
}

/// A sign-in to finish: the IdP's code and the verifier the facade sent the challenge of.
pub struct Job {
    /// The IdP's authorization code.
    pub code: String,
    /// The facade's own PKCE verifier for this sign-in.
    pub verifier: String,
    /// Where the user id (or why there is none) goes.
    pub reply: async_channel::Sender<Result<String, String>>,
}

/// The job queue and its threads (started on first use, ended when the facade is dropped).
pub struct Calls {
    client: Arc<IdpClient>,
    queue: Mutex<Option<SyncSender<Job>>>,
}

impl std::fmt::Debug for Calls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Calls")
            .field("token_url", &self.client.token_url.url)
            .finish()
    }
}

impl Calls {
    /// Calls for `client`; no thread runs until [`Calls::start`].
    pub fn new(client: IdpClient) -> Calls {
        Calls {
            client: Arc::new(client),
            queue: Mutex::new(None),
        }
    }

    /// The client these calls are made as.
    pub fn client(&self) -> &IdpClient {
        &self.client
    }

    /// Starts the threads (once).
    pub fn start(&self) {
        let Ok(mut queue) = self.queue.lock() else {
            return;
        };
        if queue.is_some() {
            return;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..THREADS {
            let (rx, client) = (rx.clone(), self.client.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("mcp-guard-idp-{i}"))
                .spawn(move || serve(&rx, &client));
            if let Err(e) = spawned {
                tracing::error!(target: "mcp_guard::auth", "cannot start an identity-provider thread: {e}");
            }
        }
        *queue = Some(tx);
    }

    /// Queues `job`; `Err` when the queue is full or the threads are gone.
    pub fn submit(&self, job: Job) -> Result<(), &'static str> {
        let queue = self
            .queue
            .lock()
            .map_err(|_| "identity-provider calls unavailable")?;
        let tx = queue
            .as_ref()
            .ok_or("identity-provider calls not started")?;
        tx.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => "too many sign-ins in progress",
            TrySendError::Disconnected(_) => "identity-provider calls unavailable",
        })
    }
}

fn serve(rx: &Mutex<Receiver<Job>>, client: &IdpClient) {
    loop {
        let job = match rx.lock() {
            Ok(rx) => match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
            Err(_) => return,
        };
        let result = finish_sign_in(client, &job.code, &job.verifier);
        if let Err(e) = &result {
            tracing::warn!(target: "mcp_guard::auth", "sign-in at the identity provider failed: {e}");
        }
        let _ = job.reply.try_send(result);
    }
}

/// Exchanges the IdP's `code` for its access token, then asks who that is.
pub fn finish_sign_in(client: &IdpClient, code: &str, verifier: &str) -> Result<String, String> {
    let mut form = vec![
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", client.redirect_uri.as_str()),
        ("client_id", client.client_id.as_str()),
        ("code_verifier", verifier),
    ];
    if let Some(secret) = &client.client_secret {
        form.push(("client_secret", secret.as_str()));
    }
    let answer = fetch::post_form(
        &client.token_url,
        &[],
        &super::form::encode_pairs(&form),
        CALL_TIMEOUT,
    )?;
    if answer.status != 200 {
        return Err(format!("token endpoint answered {}", answer.status));
    }
    let token = access_token(&answer.body)?;
    let bearer = format!("Bearer {token}");
    let answer = fetch::get(
        &client.userinfo_url,
        &[("authorization", &bearer)],
        CALL_TIMEOUT,
    )?;
    if answer.status != 200 {
        return Err(format!("userinfo endpoint answered {}", answer.status));
    }
    user_id(&answer.body, &client.user_id_claim)
}

/// The `access_token` of a token response (GitHub answers 200 with an `error` member when a
/// code is bad, so that is checked first).
fn access_token(body: &[u8]) -> Result<String, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| "token response is not JSON".to_string())?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(format!(
            "token endpoint refused the code: {}",
            e.chars().take(64).collect::<String>()
        ));
    }
    let token = v
        .get("access_token")
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty() && t.len() <= 8192 && t.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or("token response has no usable access_token")?;
    Ok(token.to_string())
}

/// The user id `claim` of a userinfo document: a string, or a whole number (GitHub's `id`).
pub fn user_id(body: &[u8], claim: &str) -> Result<String, String> {
    // A member named twice is refused: which one names the user would depend on the parser.
    let v = crate::auth::jwt::parse_object(body)
        .map_err(|_| "userinfo is not a JSON object with unique members".to_string())?;
    let id = match v.get(claim) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Number(n)) if n.is_u64() || n.is_i64() => n.to_string(),
        _ => return Err(format!("userinfo has no string or integer `{claim}`")),
    };
    // The id becomes the identity `oauth:<id>`, which the gateway refuses later when it holds
    // bidi, zero-width or other invisible characters, or blank edges: refused here instead,
    // so the sign-in fails visibly rather than yielding a token that never works.
    if id.trim().is_empty()
        || id.trim() != id
        || id.len() > MAX_USER_ID
        || id.chars().any(crate::auth::jwt::forbidden_in_identity)
    {
        return Err(format!(
            "userinfo `{claim}` is empty, blank-edged, too long, or has control or invisible \
             characters"
        ));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_strings_or_integers_without_control_characters() {
        assert_eq!(user_id(br#"{"id":42,"login":"a"}"#, "id").unwrap(), "42");
        assert_eq!(user_id(br#"{"sub":"abc"}"#, "sub").unwrap(), "abc");
        for bad in [
            &br#"{"id":1.5}"#[..],
            br#"{"id":""}"#,
            br#"{"id":"a\nb"}"#,
            br#"{"id":["x"]}"#,
            br#"{}"#,
            br#"{"id":1,"id":2}"#,
            br#"{"id":" "}"#,
            "{\"id\":\"alice\u{200b}\"}".as_bytes(),
            "{\"id\":\"alice\u{202e}\"}".as_bytes(),
            br#"{"id":"alice\u200b"}"#,
            br#"{"id":" alice"}"#,
            b"not json",
        ] {
            assert!(user_id(bad, "id").is_err());
        }
        assert!(
            user_id(
                format!(r#"{{"id":"{}"}}"#, "x".repeat(300)).as_bytes(),
                "id"
            )
            .is_err()
        );
    }

    #[test]
    fn token_responses_with_an_error_member_are_refused() {
        assert!(access_token(br#"{"error":"bad_verification_code"}"#).is_err());
        assert!(access_token(br#"{"access_token":"a b"}"#).is_err());
        assert_eq!(
            access_token(br#"{"access_token":"gho_x"}"#).unwrap(),
            "gho_x"
        );
    }
}
