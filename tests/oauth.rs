//! OAuth discovery and mcp-guard as the authorization server, through the real binary in front
//! of a fake GitHub on loopback: the whole discovery flow as a spec-following client walks it,
//! and each hostile variation (redirect URIs that differ slightly, PKCE `plain` or none, codes
//! replayed or stolen, a missing or reused `state`, refresh tokens reused after rotation, a
//! registration flood, tokens for another resource, forged tokens).

mod common;

use common::oauth::*;
use common::*;
use serde_json::{Value, json};

fn call_echo(g: &Gateway, token: &str) -> Response {
    let sid = {
        let r = initialize_with(g, "/mcp", token);
        assert_eq!(r.status, 200, "{}", r.text());
        r.header("mcp-session-id").unwrap().to_string()
    };
    request(
        g.addr,
        &mcp_post_raw(
            &call(2, "echo", r#"{"text":"hi"}"#),
            Some(&sid),
            &bearer(token),
        ),
    )
}

/// 401 → protected-resource metadata → authorization-server metadata → register → authorize
/// with PKCE → token → call, each step checked as the client would.
#[test]
fn discovery_flow_end_to_end_against_the_facade_with_a_fake_github() {
    let gh = FakeGithub::start();
    let g = facade_gateway(&gh, "");
    let base = base(&g);

    // 1. The unauthenticated request: 401 naming the endpoint's metadata and the scopes.
    let r = request(g.addr, &mcp_post_raw(INIT, None, ""));
    assert_eq!(r.status, 401);
    let challenge = r.header("www-authenticate").unwrap().to_string();
    let prm_url = format!("{base}/.well-known/oauth-protected-resource/mcp");
    assert!(
        challenge.starts_with("Bearer ")
            && challenge.contains(&format!("resource_metadata=\"{prm_url}\""))
            && challenge.contains("scope=\"mcp:all mcp:echo\""),
        "{challenge}"
    );

    // 2. Protected-resource metadata: this endpoint, served by the gateway as its own AS.
    let prm = get_url(&prm_url);
    assert_eq!(prm.status, 200);
    let prm = prm.json();
    assert_eq!(prm["resource"], format!("{base}/mcp"));
    assert_eq!(prm["authorization_servers"], json!([base]));
    assert_eq!(prm["bearer_methods_supported"], json!(["header"]));
    assert_eq!(prm["scopes_supported"], json!(["mcp:all", "mcp:echo"]));

    // 3. Authorization-server metadata at the issuer's well-known address.
    let asm = get_url(&format!("{base}/.well-known/oauth-authorization-server"));
    assert_eq!(asm.status, 200);
    let asm = asm.json();
    assert_eq!(asm["issuer"], base);
    assert_eq!(asm["code_challenge_methods_supported"], json!(["S256"]));
    for key in [
        "authorization_endpoint",
        "token_endpoint",
        "registration_endpoint",
    ] {
        assert!(asm[key].as_str().unwrap().starts_with(&base), "{key}");
    }

    // 4. Dynamic registration.
    let reg = post(
        &g,
        "/oauth/register",
        "application/json",
        &json!({"redirect_uris": [CLIENT_REDIRECT], "client_name": "spec client",
                "grant_types": ["authorization_code", "refresh_token"],
                "token_endpoint_auth_method": "none"})
        .to_string(),
    );
    assert_eq!(reg.status, 201, "{}", reg.text());
    let client = reg.json()["client_id"].as_str().unwrap().to_string();
    assert_eq!(reg.json()["redirect_uris"], json!([CLIENT_REDIRECT]));

    // 5. Authorize with PKCE S256, state, and the resource (RFC 8707); the browser goes to
    // GitHub, back to the gateway, and back to the client with a code and its own state.
    let (verifier, challenge) = pkce();
    let resource = prm["resource"].as_str().unwrap().to_string();
    let mut params = authorize_params(&client, &challenge, "client-state-1", &resource);
    params.push(("scope", "mcp:echo"));
    let authorize = format!(
        "{}?{}",
        asm["authorization_endpoint"].as_str().unwrap(),
        form(&params)
    );
    let back = sign_in(&authorize);
    assert_eq!(back["state"], "client-state-1");
    assert_eq!(back["iss"], base);
    // The IdP saw the gateway's own client, callback and PKCE — nothing of the MCP client's.
    let at_idp = gh.authorize_requests.lock().unwrap()[0].clone();
    assert_eq!(at_idp["client_id"], GH_CLIENT);
    assert_eq!(at_idp["redirect_uri"], format!("{base}/oauth/callback"));
    assert_eq!(at_idp["code_challenge_method"], "S256");
    assert_ne!(at_idp["state"], "client-state-1");
    assert_ne!(at_idp["code_challenge"], challenge);
    let exchanged = gh.token_requests.lock().unwrap()[0].clone();
    assert_eq!(exchanged["client_secret"], GH_SECRET);

    // 6. The token, bound to the resource, with the granted scope; never cached.
    let tok = post(
        &g,
        asm["token_endpoint"]
            .as_str()
            .unwrap()
            .trim_start_matches(&base),
        "application/x-www-form-urlencoded",
        &form(&[
            ("grant_type", "authorization_code"),
            ("code", &back["code"]),
            ("redirect_uri", CLIENT_REDIRECT),
            ("client_id", &client),
            ("code_verifier", &verifier),
            ("resource", &format!("{base}/mcp")),
        ]),
    );
    assert_eq!(tok.status, 200, "{}", tok.text());
    assert_eq!(tok.header("cache-control"), Some("no-store"));
    let tok = tok.json();
    assert_eq!(tok["token_type"], "Bearer");
    assert_eq!(tok["scope"], "mcp:echo");
    let access = tok["access_token"].as_str().unwrap();

    // 7. The call: the identity is the GitHub user; `mcp:echo` grants echo and nothing else.
    let r = call_echo(&g, access);
    assert_eq!(r.status, 200);
    assert_eq!(rpc_result(&r)["result"]["content"][0]["text"], "hi");
    let sid = initialize_with(&g, "/mcp", access)
        .header("mcp-session-id")
        .unwrap()
        .to_string();
    let r = request(
        g.addr,
        &mcp_post_raw(
            &call(3, "add", r#"{"a":1,"b":2}"#),
            Some(&sid),
            &bearer(access),
        ),
    );
    assert!(
        rpc_result(&r)["error"].is_object(),
        "add is not granted: {}",
        r.text()
    );
    assert!(g.wait_log(&format!("oauth:{GH_USER_ID}"), WAIT_LOG));
    assert!(
        g.metric(
            "mcp_guard_auth_total",
            &[("method", "oauth"), ("result", "success")]
        ) >= 2.0
    );

    // 8. A refresh gives a working token again.
    let r = refresh(&g, &client, tok["refresh_token"].as_str().unwrap());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        call_echo(&g, r.json()["access_token"].as_str().unwrap()).status,
        200
    );
}

const WAIT_LOG: std::time::Duration = std::time::Duration::from_secs(10);

#[test]
fn path_suffixed_metadata_names_each_endpoint_and_the_gateway() {
    let gh = FakeGithub::start();
    let g = facade_gateway(&gh, "");
    let base = base(&g);
    for (suffix, resource) in [
        ("", base.clone()),
        ("/mcp", format!("{base}/mcp")),
        ("/mcp/files", format!("{base}/mcp/files")),
        ("/sse", format!("{base}/sse")),
        ("/sse/files", format!("{base}/sse/files")),
    ] {
        let r = get_url(&format!(
            "{base}/.well-known/oauth-protected-resource{suffix}"
        ));
        assert_eq!(r.status, 200, "{suffix}");
        assert_eq!(r.json()["resource"], resource, "{suffix}");
    }
    // No metadata for what is not an endpoint.
    for suffix in ["/nope", "/mcp/files/x", "/mcp/", "/mcp/../mcp"] {
        let r = get_url(&format!(
            "{base}/.well-known/oauth-protected-resource{suffix}"
        ));
        // 404, or 400 for a path not in normal form.
        assert!(matches!(r.status, 400 | 404), "{suffix}: {}", r.status);
    }
    // A routed server's 401 points at its own metadata.
    let r = request(g.addr, &mcp_post_raw_at("/mcp/files", INIT, None, ""));
    assert!(r.header("www-authenticate").unwrap().contains(&format!(
        "resource_metadata=\"{base}/.well-known/oauth-protected-resource/mcp/files\""
    )));
    // Metadata is read-only, and there is no OpenID Connect discovery document (the facade
    // issues no ID tokens, so it could not be a complete one).
    let r = post(
        &g,
        "/.well-known/oauth-protected-resource",
        "application/json",
        "{}",
    );
    assert_eq!(r.status, 405);
    let r = get_url(&format!("{base}/.well-known/openid-configuration"));
    assert_eq!(r.status, 404);
}

#[test]
fn a_token_is_bound_to_its_resource_and_refused_at_another_endpoint() {
    let gh = FakeGithub::start();
    let g = facade_gateway(&gh, "");
    let base = base(&g);
    let (_, tok) = tokens_for(&g, &format!("{base}/mcp/files"), None);
    let access = tok["access_token"].as_str().unwrap();
    assert_eq!(initialize_with(&g, "/mcp/files", access).status, 200);
    let r = initialize_with(&g, "/mcp", access);
    assert_eq!(r.status, 401);
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .contains("error=\"invalid_token\"")
    );
    // A token for the whole gateway works at every endpoint.
    let (_, tok) = tokens_for(&g, &base, None);
    let access = tok["access_token"].as_str().unwrap();
    assert_eq!(initialize_with(&g, "/mcp", access).status, 200);
    assert_eq!(initialize_with(&g, "/mcp/files", access).status, 200);
    // A resource that is not this server is refused at authorize.
    let client = register(&g, &[CLIENT_REDIRECT]);
    let (_, challenge) = pkce();
    let url = authorize_url(
        &g,
        &authorize_params(&client, &challenge, "s", "https://evil.example.com/mcp"),
    );
    let r = get_url(&url);
    assert_eq!((r.status, r.header("location")), (400, None));
    assert!(r.text().contains("invalid_target"));
}

#[test]
fn a_forged_or_tampered_token_is_refused() {
    let gh = FakeGithub::start();
    let g = facade_gateway(&gh, "");
    let (_, tok) = tokens_for(&g, &base(&g), None);
    let access = tok["access_token"].as_str().unwrap();
    let mut parts: Vec<String> = access.split('.').map(str::to_string).collect();
    // Same header and signature, a payload naming someone else.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut claims: Value = serde_json::from_slice(&b64.decode(&parts[1]).unwrap()).unwrap();
    claims["sub"] = "admin".into();
    parts[1] = b64.encode(claims.to_string());
    assert_eq!(initialize_with(&g, "/mcp", &parts.join(".")).status, 401);
    // `alg: none`.
    let none = format!("{}.{}.", b64.encode(r#"{"alg":"none"}"#), parts[1]);
    assert_eq!(initialize_with(&g, "/mcp", &none).status, 401);
    // A token in the query string is not a credential.
    let r = request(
        g.addr,
        &mcp_post_raw_at(&format!("/mcp?access_token={access}"), INIT, None, ""),
    );
    assert_ne!(r.status, 200);
}

#[test]
fn redirect_uris_differing_by_a_segment_a_query_or_a_trailing_slash_are_refused_without_a_redirect()
{
    let gh = FakeGithub::start();
    let g = facade_gateway(&gh, "");
    let client = register(&g, &["https://app.example.com/cb"]);
    let (_, challenge) = pkce();
    for uri in [
        "https://app.example.com/cb/",
        "https://app.example.com/cb/x",
        "https://app.example.com/cb?x=1",
        "https://app.example.com/",
        "https://APP.example.com/cb",
        "https://app.example.com:443/cb",
        "https://app.example.com/cb#",
    ] {
        let url = authorize_url(
            &g,
            &[
                ("response_type", "code"),
                ("client_id", &client),
                ("redirect_uri", uri),
                ("code_challenge", &challenge),
                ("code_challenge_method", "S256"),
                ("state", "s"),
            ],
        );
        let r = get_url(&url);
        assert_eq!(r.status, 400, "{uri}");
        assert!(r.header("location").is_none(), "{uri}");
    }
    // Unknown clients get the same page, not a redirect.
    let url = authorize_url(
        &g,
        &authorize_params("not-registered", &challenge, "s", &base(&g)),
    );
    let r = get_url(&url);
    assert_eq!((r.status, r.header("location")), (400, None));
    // Registration refuses URIs that could not be compared safely or are not web or app ones.
    for bad in [
        json!(["javascript:alert(1)"]),
        json!(["http://evil.example.com/cb"]),
        json!(["https://a.example.com/cb#frag"]),
        json!([]),
        json!("https://a.example.com/cb"),
    ] {
        let r = post(
            &g,
            "/oauth/register",
            "application/json",
            &json!({"redirect_uris": bad}).to_string(),
        );
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.json()["error"], "invalid_redirect_uri", "{bad}");
    }
}

#[test]
fn pkce_plain_or_absent_is_refused_at_authorize_and_a_missing_verifier_at_token() {
    let gh = FakeGithub::start();
    let g = facade_gateway(&gh, "");
    let client = register(&g, &[CLIENT_REDIRECT]);
    let (verifier, challenge) = pkce();
    let base = base(&g);
    let cases: Vec<Vec<(&str, &str)>> = vec![
        // plain
        vec![
            ("response_type", "code"),
            ("client_id", &client),
            ("redirect_uri", CLIENT_REDIRECT),
            ("code_challenge", &verifier),
            ("code_challenge_method", "plain"),
            ("state", "s"),
        ],
        // no method (RFC 7636: that means plain)
        vec![
            ("response_type", "code"),
            ("client_id", &client),
            ("redirect_uri", CLIENT_REDIRECT),
            ("code_challenge", &challenge),
            ("state", "s"),
        ],
        // no challenge
        vec![
            ("response_type", "code"),
            ("client_id", &client),
            ("redirect_uri", CLIENT_REDIRECT),
            ("code_challenge_method", "S256"),
            ("state", "s"),
        ],
    ];
    for params in cases {
        // Shown as a page: before the person approved the client, its redirect URI is not
        // trusted with even an error.
        let r = get_url(&authorize_url(&g, &params));
        assert_eq!((r.status, r.header("location")), (400, None));
        assert!(
            r.text().contains("invalid_request") && r.text().contains("PKCE"),
            "{}",
            r.text()
        );
        assert!(
            gh.authorize_requests.lock().unwrap().is_empty(),
            "nothing reached the IdP"
        );
    }
    // A code redeemed without its verifier, or with another, is refused — and burnt.
    let back = sign_in(&authorize_url(
        &g,
        &authorize_params(&client, &challenge, "s", &base),
    ));
    let r = post(
        &g,
        "/oauth/token",
        "application/x-www-form-urlencoded",
        &form(&[
            ("grant_type", "authorization_code"),
            ("code", &back["code"]),
            ("client_id", &client),
            ("redirect_uri", CLIENT_REDIRECT),
        ]),
    );
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, json!("invalid_request"))
    );
    let back = sign_in(&authorize_url(
        &g,
        &authorize_params(&client, &challenge, "s", &base),
    ));
    let (other, _) = pkce();
    let r = redeem(&g, &client, &back["code"], &other);
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, json!("invalid_grant"))
    );
    let r = redeem(&g, &client, &back["code"], &verifier);
    assert_eq!(
        r.json()["error"],
        "invalid_grant",
        "a burnt code stays burnt"
    );
}

#[test]
fn a_replayed_code_is_refused_and_revokes_the_tokens_it_gave() {
    let gh = FakeGithub::start();
    let g = facade_gateway(&gh, "");
    let client = register(&g, &[CLIENT_REDIRECT]);
    let (verifier, challenge) = pkce();
    let back = sign_in(&authorize_url(
        &g,
        &authorize_params(&client, &challenge, "s", &base(&g)),
    ));
    let first = redeem(&g, &client, &back["code"], &verifier);
    assert_eq!(first.status, 200);
    let first = first.json();
    assert_eq!(
        call_echo(&g, first["access_token"].as_str().unwrap()).status,
        200
    );
    let again = redeem(&g, &client, &back["code"], &verifier);
    assert_eq!(
        (again.status, again.json()["error"].clone()),
        (400, json!("invalid_grant"))
    );
    // What the first exchange gave is revoked: the access token and the refresh token.
    assert_eq!(
        initialize_with(&g, "/mcp", first["access_token"].as_str().unwrap()).status,
        401
    );
    let r = refresh(&g, &client, first["refresh_token"].as_str().unwrap());
    assert_eq!(r.json()["error"], "invalid_grant");
}

#[test]
fn a_code_presented_by_another_client_is_refused() {
    let gh = FakeGithub::start();
    let g = facade_gateway(&gh, "");
    let victim = register(&g, &[CLIENT_REDIRECT]);
    let thief = register(&g, &[CLIENT_REDIRECT]);
    let (verifier, challenge) = pkce();
    let back = sign_in(&authorize_url(
        &g,
        &authorize_params(&victim, &challenge, "s", &base(&g)),
    ));
    let r = redeem(&g, &thief, &back["code"], &verifier);
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, json!("invalid_grant"))
    );
    // …and it is burnt for its own client too.
    let r = redeem(&g, &victim, &back["code"], &verifier);
    assert_eq!(r.json()["error"], "invalid_grant");
    // An unregistered client is not a client at all.
    let r = redeem(&g, "nobody", "x", &verifier);
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (401, json!("invalid_client"))
    );
}

#[test]
fn a_missing_state_or_a_reused_callback_state_is_refused() {
    let gh = FakeGithub::start();
    let g = facade_gateway(&gh, "");
    let client = register(&g, &[CLIENT_REDIRECT]);
    let (_, challenge) = pkce();
    // The client sent no state: refused before the IdP is involved.
    let gateway = base(&g);
    let mut params = authorize_params(&client, &challenge, "", &gateway);
    params.retain(|(n, _)| *n != "state");
    let r = get_url(&authorize_url(&g, &params));
    assert_eq!((r.status, r.header("location")), (400, None));
    assert!(r.text().contains("state is required"));
    assert!(gh.authorize_requests.lock().unwrap().is_empty());
    // The IdP's callback with its state used twice: the second is refused, without a redirect.
    let r = approve(&authorize_url(
        &g,
        &authorize_params(&client, &challenge, "s", &base(&g)),
    ));
    let cookie = cookie_of(&r);
    let r = get_url(r.header("location").unwrap());
    let callback = r.header("location").unwrap().to_string();
    assert_eq!(get_url_with_cookie(&callback, &cookie).status, 302);
    let again = get_url_with_cookie(&callback, &cookie);
    assert_eq!((again.status, again.header("location")), (400, None));
    // A callback with no state, or one the gateway never issued.
    let (addr, target) = split_url(&callback);
    let path = target.split('?').next().unwrap();
    for q in ["code=x", "code=x&state=forged"] {
        let r = get_url(&format!("http://{addr}{path}?{q}"));
        assert_eq!((r.status, r.header("location")), (400, None), "{q}");
    }
}

#[test]
fn a_refresh_token_used_after_rotation_is_refused_and_revokes_its_family() {
    let gh = FakeGithub::start();
    let g = facade_gateway(&gh, "");
    let (client, tok) = tokens_for(&g, &base(&g), None);
    let r1 = tok["refresh_token"].as_str().unwrap().to_string();
    let second = refresh(&g, &client, &r1);
    assert_eq!(second.status, 200);
    let second = second.json();
    assert_ne!(second["refresh_token"], tok["refresh_token"], "rotated");
    // r1 again: refused, and the family's live refresh token and access tokens die with it.
    let replay = refresh(&g, &client, &r1);
    assert_eq!(
        (replay.status, replay.json()["error"].clone()),
        (400, json!("invalid_grant"))
    );
    let r = refresh(&g, &client, second["refresh_token"].as_str().unwrap());
    assert_eq!(r.json()["error"], "invalid_grant");
    assert_eq!(
        initialize_with(&g, "/mcp", second["access_token"].as_str().unwrap()).status,
        401
    );
    // Another client cannot use someone's refresh token.
    let (client2, tok2) = tokens_for(&g, &base(&g), None);
    let _ = client2;
    let r = refresh(&g, &client, tok2["refresh_token"].as_str().unwrap());
    assert_eq!(r.json()["error"], "invalid_grant");
    // A refresh may narrow the scopes, never widen them.
    let (client3, tok3) = tokens_for(&g, &base(&g), Some("mcp:echo"));
    let r = post(
        &g,
        "/oauth/token",
        "application/x-www-form-urlencoded",
        &form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", tok3["refresh_token"].as_str().unwrap()),
            ("client_id", &client3),
            ("scope", "mcp:all"),
        ]),
    );
    assert_eq!(r.json()["error"], "invalid_scope");
}

#[test]
fn a_registration_flood_is_rate_limited_per_address() {
    let gh = FakeGithub::start();
    let g = facade_gateway(&gh, "");
    let body = json!({"redirect_uris": [CLIENT_REDIRECT]}).to_string();
    let mut statuses = Vec::new();
    for _ in 0..15 {
        statuses.push(post(&g, "/oauth/register", "application/json", &body).status);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        10,
        "{statuses:?}"
    );
    let r = post(&g, "/oauth/register", "application/json", &body);
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").is_some());
    // Oversized and malformed documents are refused with a reason.
    let g2 = facade_gateway(&gh, "");
    let huge =
        json!({"redirect_uris": [CLIENT_REDIRECT], "client_name": "x".repeat(20_000)}).to_string();
    assert_eq!(
        post(&g2, "/oauth/register", "application/json", &huge).status,
        400
    );
    assert_eq!(
        post(&g2, "/oauth/register", "application/json", "[1,2]").status,
        400
    );
    assert_eq!(
        post(&g2, "/oauth/register", "text/plain", &body).status,
        400
    );
}

#[test]
fn token_requests_that_are_not_well_formed_forms_are_refused() {
    let gh = FakeGithub::start();
    let g = facade_gateway(&gh, "");
    let client = register(&g, &[CLIENT_REDIRECT]);
    for (ct, body, error) in [
        ("application/json", "{}".to_string(), "invalid_request"),
        (
            "application/x-www-form-urlencoded",
            format!("grant_type=password&client_id={client}"),
            "unsupported_grant_type",
        ),
        (
            "application/x-www-form-urlencoded",
            format!("grant_type=authorization_code&grant_type=refresh_token&client_id={client}"),
            "invalid_request",
        ),
        (
            "application/x-www-form-urlencoded",
            format!("client_id={client}&code=%ZZ"),
            "invalid_request",
        ),
    ] {
        let r = post(&g, "/oauth/token", ct, &body);
        assert_eq!(r.status, 400, "{body}");
        assert_eq!(r.json()["error"], error, "{body}");
    }
}

#[test]
fn an_idp_that_refuses_the_code_sends_an_error_back_to_the_client() {
    let gh = FakeGithub::start();
    // The gateway's secret is wrong at the fake GitHub: its token endpoint refuses the code.
    let g = start_on_a_free_port(|port| {
        format!(
            "[server]\nport = {port}\nworkers = 1\npublic_url = \"http://127.0.0.1:{port}\"\n\
         [upstream]\ntransport = \"stdio\"\ncommand = {DEMO:?}\n\
         [auth.oauth]\nprovider = \"github\"\nclient_id = \"{GH_CLIENT}\"\nclient_secret = \"wrong\"\n\
         authorization_url = \"{}\"\ntoken_url = \"{}\"\nuserinfo_url = \"{}\"\n",
            gh.url("/login/oauth/authorize"),
            gh.url("/login/oauth/access_token"),
            gh.url("/user"),
        )
    });
    let client = register(&g, &[CLIENT_REDIRECT]);
    let (_, challenge) = pkce();
    let r = approve(&authorize_url(
        &g,
        &authorize_params(&client, &challenge, "s", &base(&g)),
    ));
    let cookie = cookie_of(&r);
    let r = get_url(r.header("location").unwrap());
    let r = get_url_with_cookie(r.header("location").unwrap(), &cookie);
    assert_eq!(r.status, 302);
    let loc = r.header("location").unwrap();
    assert!(
        loc.starts_with(CLIENT_REDIRECT)
            && loc.contains("error=server_error")
            && loc.contains("state=s"),
        "{loc}"
    );
    assert!(!loc.contains("code="), "{loc}");
}

/// Every client registered itself, so before the facade signs anyone in at GitHub as the
/// gateway, the person sees which client asks, and approves it on a page no other site can
/// frame or submit (the confused-deputy defence of the MCP security best practices).
#[test]
fn consent_is_asked_for_each_authorization_and_only_the_gateway_page_can_give_it() {
    let gh = FakeGithub::start();
    let g = facade_gateway(&gh, "");
    let r = post(
        &g,
        "/oauth/register",
        "application/json",
        &json!({"redirect_uris": [CLIENT_REDIRECT], "client_name": "<script>alert(1)</script>"})
            .to_string(),
    );
    let client = r.json()["client_id"].as_str().unwrap().to_string();
    let (_, challenge) = pkce();
    let url = authorize_url(&g, &authorize_params(&client, &challenge, "s", &base(&g)));
    let page = get_url(&url);
    assert_eq!(page.status, 200);
    assert_eq!(page.header("x-frame-options"), Some("DENY"));
    assert!(
        page.header("content-security-policy")
            .unwrap()
            .contains("frame-ancestors 'none'")
    );
    let text = page.text();
    assert!(
        text.contains("&lt;script&gt;") && !text.contains("<script>"),
        "{text}"
    );
    assert!(text.contains(CLIENT_REDIRECT));
    assert!(
        gh.authorize_requests.lock().unwrap().is_empty(),
        "nothing reached the IdP yet"
    );
    let ticket = ticket_of(&page);
    // Submitted from another site's page, or not from a browser form at all: refused.
    for origin in [Some("https://evil.example.com"), Some("null"), None] {
        let r = decide(&url, &ticket, "allow", origin);
        assert_eq!((r.status, r.header("location")), (403, None), "{origin:?}");
    }
    // From the gateway's page: once.
    let own = format!("http://{}", g.addr);
    let r = decide(&url, &ticket, "allow", Some(&own));
    assert_eq!(r.status, 302);
    assert!(
        r.header("location")
            .unwrap()
            .starts_with(&gh.url("/login/oauth/authorize"))
    );
    let r = decide(&url, &ticket, "allow", Some(&own));
    assert_eq!((r.status, r.header("location")), (400, None));
    // Denied: the client hears access_denied with its state, and no code.
    let page = get_url(&url);
    let r = decide(&url, &ticket_of(&page), "deny", Some(&own));
    let loc = r.header("location").unwrap();
    assert!(
        loc.starts_with(CLIENT_REDIRECT)
            && loc.contains("error=access_denied")
            && loc.contains("state=s"),
        "{loc}"
    );
    // A consent ticket is not a state the IdP callback accepts.
    let page = get_url(&url);
    let r = get_url(&format!(
        "{}/oauth/callback?code=x&state={}",
        base(&g),
        enc(&ticket_of(&page))
    ));
    assert_eq!((r.status, r.header("location")), (400, None));
}

#[test]
fn without_the_facade_metadata_advertises_the_external_authorization_servers() {
    let g = start_on_a_free_port(|port| {
        format!(
            "[server]\nport = {port}\nworkers = 1\npublic_url = \"http://127.0.0.1:{port}\"\n\
         [upstream]\ntransport = \"stdio\"\ncommand = {DEMO:?}\n\
         [auth.oauth]\nprovider = \"okta\"\nclient_id = \"mcp-guard\"\n\
         authorization_servers = [\"https://example.okta.com/oauth2/default\"]\n\
         scopes = [\"mcp:tools\"]\n"
        )
    });
    let base = base(&g);
    let prm = get_url(&format!("{base}/.well-known/oauth-protected-resource/mcp")).json();
    assert_eq!(prm["resource"], format!("{base}/mcp"));
    assert_eq!(
        prm["authorization_servers"],
        json!(["https://example.okta.com/oauth2/default"])
    );
    assert_eq!(prm["scopes_supported"], json!(["mcp:tools"]));
    let r = request(g.addr, &mcp_post_raw(INIT, None, ""));
    assert_eq!(r.status, 401);
    let challenge = r.header("www-authenticate").unwrap();
    assert!(challenge.contains("scope=\"mcp:tools\""), "{challenge}");
    // mcp-guard is not an authorization server here.
    for path in [
        "/.well-known/oauth-authorization-server",
        "/oauth/authorize",
        "/oauth/callback",
    ] {
        assert_eq!(get_url(&format!("{base}{path}")).status, 404, "{path}");
    }
    assert_eq!(
        post(&g, "/oauth/register", "application/json", "{}").status,
        404
    );
}

#[test]
fn a_reload_keeps_clients_and_tokens_unless_the_identity_provider_client_changes() {
    let gh = FakeGithub::start();
    let g = facade_gateway(&gh, "");
    let (client, tok) = tokens_for(&g, &base(&g), None);
    let access = tok["access_token"].as_str().unwrap().to_string();
    let reloads = |g: &Gateway| {
        g.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("configuration reloaded"))
            .count()
    };
    let reload = |config: String| {
        let before = reloads(&g);
        g.rewrite_config(&config);
        g.signal(libc::SIGHUP);
        let deadline = std::time::Instant::now() + WAIT_LOG;
        while reloads(&g) == before {
            assert!(std::time::Instant::now() < deadline, "reload not applied");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let config = std::fs::read_to_string(&g.config_path).unwrap();
    // A change elsewhere: the same facade goes on, tokens and clients included.
    reload(config.replace(
        "\"mcp:all\" = [\"*\"]",
        "\"mcp:all\" = [\"*\"]\n\"mcp:add\" = [\"add\"]",
    ));
    assert_eq!(initialize_with(&g, "/mcp", &access).status, 200);
    let r = refresh(&g, &client, tok["refresh_token"].as_str().unwrap());
    assert_eq!(r.status, 200, "{}", r.text());
    // Another client at the IdP: a new authorization server, with a key of its own.
    reload(config.replace(GH_SECRET, "another-secret"));
    assert_eq!(initialize_with(&g, "/mcp", &access).status, 401);
}

#[test]
fn browser_clients_may_read_metadata_and_redeem_codes_cross_origin() {
    let gh = FakeGithub::start();
    let g = facade_gateway(&gh, "");
    let r = request(
        g.addr,
        "OPTIONS /oauth/token HTTP/1.1\r\nHost: t\r\nOrigin: https://inspector.example.com\r\nAccess-Control-Request-Method: POST\r\n\r\n",
    );
    assert_eq!(r.status, 204);
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert!(
        r.header("access-control-allow-methods")
            .unwrap()
            .contains("POST")
    );
    let r = get_url(&format!(
        "{}/.well-known/oauth-protected-resource/mcp",
        base(&g)
    ));
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
}

// ---------------------------------------------------------------------------------------------
// Red-team findings (issue 9), each attack replayed against the binary.
// ---------------------------------------------------------------------------------------------

/// One request from the loopback address `src` (any 127.0.0.0/8 address is this host's), so
/// that a test can be several callers.
fn request_from(src: &str, addr: std::net::SocketAddr, raw: &str) -> Response {
    use std::io::Write as _;
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let from: std::net::SocketAddr = format!("{src}:0").parse().unwrap();
    socket.bind(&from.into()).unwrap();
    socket.connect(&addr.into()).unwrap();
    let mut s: std::net::TcpStream = socket.into();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    read_response(&mut s).expect("a response")
}

fn get_from(src: &str, url: &str) -> Response {
    let (addr, target) = split_url(url);
    request_from(
        src,
        addr,
        &format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
}

fn register_from(src: &str, g: &Gateway, doc: &str) -> Response {
    request_from(
        src,
        g.addr,
        &format!(
            "POST /oauth/register HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{doc}",
            doc.len()
        ),
    )
}

fn refresh_with(g: &Gateway, client: &str, token: &str, extra: &[(&str, &str)]) -> Response {
    let mut pairs = vec![
        ("grant_type", "refresh_token"),
        ("refresh_token", token),
        ("client_id", client),
    ];
    pairs.extend_from_slice(extra);
    post(
        g,
        "/oauth/token",
        "application/x-www-form-urlencoded",
        &form(&pairs),
    )
}

/// F1: an attacker registers a client with its own redirect URI, fetches the consent page and
/// posts "Allow" itself with a forged `Origin`, then sends the IdP link it got to a victim
/// signed in at the IdP. The victim's browser comes back to the callback without the cookie
/// the approval set: refused, no code leaves, and the sign-in is spent.
#[test]
fn a_sign_in_approved_by_a_script_cannot_be_finished_in_a_victims_browser() {
    let gh = FakeGithub::start();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let g = facade_gateway(&gh, &format!("[audit]\nfile = {audit:?}\n"));
    let client = register(&g, &[CLIENT_REDIRECT]);
    let (verifier, challenge) = pkce();
    let url = authorize_url(&g, &authorize_params(&client, &challenge, "s", &base(&g)));
    let page = get_url(&url);
    let r = decide(
        &url,
        &ticket_of(&page),
        "allow",
        Some(&format!("http://{}", g.addr)),
    );
    assert_eq!(r.status, 302);
    // The approval sets a one-sign-in cookie: script-proof, not sent cross-site, and (on http,
    // where `__Host-` cannot be used) without that prefix.
    let set = r.header("set-cookie").unwrap().to_string();
    for attr in ["HttpOnly", "SameSite=Lax", "Path=/", "Max-Age="] {
        assert!(set.contains(attr), "{set}");
    }
    assert!(
        set.starts_with("mcp-guard-signin-") && !set.contains("Secure"),
        "{set}"
    );
    let to_idp = r.header("location").unwrap().to_string();
    // The victim's browser: signed in at the IdP, which sends it back at once.
    let r = get_url(&to_idp);
    let to_callback = r.header("location").unwrap().to_string();
    let victim = get_url(&to_callback);
    assert_eq!((victim.status, victim.header("location")), (400, None));
    assert!(victim.text().contains("not approved in this browser"));
    assert!(
        gh.token_requests.lock().unwrap().is_empty(),
        "no IdP code was exchanged"
    );
    // The attacker, holding the cookie, comes too late: the sign-in is spent.
    let late = get_url_with_cookie(&to_callback, &cookie_of(&r_or(&set)));
    assert_eq!((late.status, late.header("location")), (400, None));
    // A cookie with the right name and another value is refused as well.
    let r = approve(&url);
    let (name, _) = cookie_of(&r)
        .split_once('=')
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .unwrap();
    let to_callback = get_url(r.header("location").unwrap())
        .header("location")
        .unwrap()
        .to_string();
    let forged = get_url_with_cookie(&to_callback, &format!("{name}=forged"));
    assert_eq!((forged.status, forged.header("location")), (400, None));
    // The genuine flow (same browser) still works, and its code redeems.
    let back = sign_in(&url);
    assert_eq!(redeem(&g, &client, &back["code"], &verifier).status, 200);
    // The refused callback is audited.
    let text = wait_for_audit(&audit, "oauth_browser_mismatch");
    assert!(text.contains("\"oauth/sign_in\""), "{text}");
}

/// A `Response` carrying only a `Set-Cookie` header (to reuse [`cookie_of`] on a saved value).
fn r_or(set_cookie: &str) -> Response {
    Response {
        status: 302,
        headers: vec![("set-cookie".into(), set_cookie.into())],
        body: Vec::new(),
    }
}

/// Waits until the audit file holds `needle` (the writer is a thread of its own); its text.
fn wait_for_audit(path: &std::path::Path, needle: &str) -> String {
    for _ in 0..100 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!(
        "no {needle} in the audit: {}",
        std::fs::read_to_string(path).unwrap_or_default()
    );
}

/// F2: a refresh refused for asking more (a wider scope, another resource) uses nothing: the
/// next correct refresh works. A refresh token presented by another client has leaked: that
/// family is revoked.
#[test]
fn a_refused_refresh_leaves_the_token_usable_and_another_clients_use_revokes_it() {
    let gh = FakeGithub::start();
    let g = facade_gateway(&gh, "");
    let (client, tok) = tokens_for(&g, &base(&g), Some("mcp:echo"));
    let r1 = tok["refresh_token"].as_str().unwrap();
    let wider = refresh_with(&g, &client, r1, &[("scope", "mcp:echo mcp:all")]);
    assert_eq!(wider.json()["error"], "invalid_scope");
    let other = refresh_with(
        &g,
        &client,
        r1,
        &[("resource", "https://elsewhere.example.com")],
    );
    assert_eq!(other.json()["error"], "invalid_target");
    let fine = refresh(&g, &client, r1);
    assert_eq!(fine.status, 200, "{}", fine.text());
    let fine = fine.json();
    let r2 = fine["refresh_token"].as_str().unwrap();
    // Another (registered) client presents it: refused, and the family ends.
    let thief = register(&g, &[CLIENT_REDIRECT]);
    assert_eq!(refresh(&g, &thief, r2).json()["error"], "invalid_grant");
    assert_eq!(refresh(&g, &client, r2).json()["error"], "invalid_grant");
    assert_eq!(
        initialize_with(&g, "/mcp", fine["access_token"].as_str().unwrap()).status,
        401
    );
}

/// F3: one address opening the consent page over and over (more than the whole table holds)
/// pushes out only its own pending authorizations: another person's still completes.
#[test]
fn a_flood_of_authorizations_from_one_address_does_not_evict_anyone_elses() {
    let gh = FakeGithub::start();
    let g = facade_gateway(&gh, "");
    let client = register(&g, &[CLIENT_REDIRECT]);
    let (_, challenge) = pkce();
    let url = authorize_url(&g, &authorize_params(&client, &challenge, "s", &base(&g)));
    let victim_page = get_from("127.0.0.2", &url);
    assert_eq!(victim_page.status, 200);
    let flooder = register(&g, &[CLIENT_REDIRECT]);
    let flood_url = authorize_url(&g, &authorize_params(&flooder, &challenge, "s", &base(&g)));
    for _ in 0..1050 {
        assert_eq!(get_from("127.0.0.3", &flood_url).status, 200);
    }
    let r = decide(
        &url,
        &ticket_of(&victim_page),
        "allow",
        Some(&format!("http://{}", g.addr)),
    );
    assert_eq!(r.status, 302, "{}", r.text());
}

/// F4: a registration flood from a hundred addresses (ten each, within every address's
/// budget) fills the client table: the clients pushed out are the flood's own, never one
/// that holds a grant, so a signed-in client keeps working.
#[test]
fn a_registration_flood_from_many_addresses_never_evicts_a_client_in_use() {
    let gh = FakeGithub::start();
    let g = facade_gateway(&gh, "");
    let (client, tok) = tokens_for(&g, &base(&g), None);
    let doc = json!({"redirect_uris": [CLIENT_REDIRECT]}).to_string();
    let mut created = 0;
    for a in 0..101 {
        let src = format!("127.0.1.{}", a + 1);
        for _ in 0..10 {
            if register_from(&src, &g, &doc).status == 201 {
                created += 1;
            }
        }
    }
    assert!(created >= 1000, "{created}");
    let r = refresh(&g, &client, tok["refresh_token"].as_str().unwrap());
    assert_eq!(r.status, 200, "{}", r.text());
}

/// L1, L2 and malformed redirect URIs: refused at registration with a reason.
#[test]
fn registrations_with_invisible_names_repeated_members_or_malformed_redirect_uris_are_refused() {
    let gh = FakeGithub::start();
    let g = facade_gateway(&gh, "");
    // Each from an address of its own: the registration budget is spent before the document
    // is read.
    let next = std::cell::Cell::new(0u8);
    let reg = |doc: &str| {
        next.set(next.get() + 1);
        register_from(&format!("127.0.2.{}", next.get()), &g, doc)
    };
    for name in ["Good\u{202e}App", "Cl\u{200b}aude", "\u{feff}App", "   "] {
        let r = reg(&json!({"redirect_uris": [CLIENT_REDIRECT], "client_name": name}).to_string());
        assert_eq!(r.json()["error"], "invalid_client_metadata", "{name:?}");
    }
    let dup = format!(
        r#"{{"redirect_uris":["{CLIENT_REDIRECT}"],"client_name":"Nice","client_name":"Evil"}}"#
    );
    assert_eq!(reg(&dup).json()["error"], "invalid_client_metadata");
    let dup_uris = format!(
        r#"{{"redirect_uris":["{CLIENT_REDIRECT}"],"redirect_uris":["https://evil.example.com/cb"]}}"#
    );
    assert_eq!(reg(&dup_uris).status, 400);
    for uri in [
        "https://[::1/cb",
        "https://app.example.com:99999/cb",
        "https://app.example.com:0/cb",
        "https://app.example.com/cb?code=planted",
        "http://127.0.0.1:1/cb?state=x&iss=y",
    ] {
        let r = reg(&json!({ "redirect_uris": [uri] }).to_string());
        assert_eq!(r.json()["error"], "invalid_redirect_uri", "{uri}");
    }
    // A good registration answers 201 Created; its budget's Retry-After is honest (one per
    // 6 s, rounded up).
    let doc = json!({ "redirect_uris": [CLIENT_REDIRECT] }).to_string();
    let ok = register_from("127.0.3.1", &g, &doc);
    assert_eq!(ok.status, 201);
    let mut last = ok;
    for _ in 0..12 {
        last = register_from("127.0.3.1", &g, &doc);
    }
    assert_eq!(last.status, 429);
    assert_eq!(last.header("retry-after"), Some("6"));
}

/// L4 and the informational findings: the authorization server audits registrations,
/// sign-ins and code replays; its pages are never sniffed; an `Origin` with a trailing slash
/// is not the gateway's; the family claim is random, not a count of sign-ins.
#[test]
fn the_authorization_server_audits_its_decisions_and_hardens_its_pages() {
    use base64::Engine as _;
    let gh = FakeGithub::start();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let g = facade_gateway(&gh, &format!("[audit]\nfile = {audit:?}\n"));
    let client = register(&g, &[CLIENT_REDIRECT]);
    let (verifier, challenge) = pkce();
    let url = authorize_url(&g, &authorize_params(&client, &challenge, "s", &base(&g)));
    let page = get_url(&url);
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    let slash = decide(
        &url,
        &ticket_of(&page),
        "allow",
        Some(&format!("http://{}/", g.addr)),
    );
    assert_eq!(slash.status, 403);
    let back = sign_in(&url);
    let tok = redeem(&g, &client, &back["code"], &verifier).json();
    let replay = redeem(&g, &client, &back["code"], &verifier);
    assert_eq!(replay.json()["error"], "invalid_grant");
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(
                tok["access_token"]
                    .as_str()
                    .unwrap()
                    .split('.')
                    .nth(1)
                    .unwrap(),
            )
            .unwrap(),
    )
    .unwrap();
    assert!(claims["fam"].as_u64().unwrap() > 1_000_000, "{claims}");
    let text = wait_for_audit(&audit, "oauth_code_reused");
    for needle in ["\"oauth/register\"", "\"oauth/sign_in\"", "oauth:4242"] {
        assert!(text.contains(needle), "{needle} in {text}");
    }
    // Never the code or a token.
    assert!(!text.contains(&back["code"]));
    assert!(!text.contains(tok["refresh_token"].as_str().unwrap()));
}

/// L2, L3: an IdP whose userinfo names the user twice, or with an id the gateway would refuse
/// as an identity later (invisible or bidi characters, blank): the sign-in fails at the
/// callback with `server_error`, and no code is issued.
#[test]
fn a_userinfo_with_a_repeated_member_or_an_unusable_id_fails_the_sign_in() {
    let gh = FakeGithub::start();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let g = facade_gateway(&gh, &format!("[audit]\nfile = {audit:?}\n"));
    let client = register(&g, &[CLIENT_REDIRECT]);
    let (_, challenge) = pkce();
    for body in [
        r#"{"id":1001,"id":666}"#.to_string(),
        json!({"id": "alice\u{200b}"}).to_string(),
        json!({"id": "alice\u{202e}"}).to_string(),
        json!({"id": " "}).to_string(),
        json!({"id": "\u{feff}alice"}).to_string(),
    ] {
        *gh.userinfo.lock().unwrap() = Some(body.clone());
        let url = authorize_url(&g, &authorize_params(&client, &challenge, "s", &base(&g)));
        let r = approve(&url);
        let cookie = cookie_of(&r);
        let r = get_url(r.header("location").unwrap());
        let r = get_url_with_cookie(r.header("location").unwrap(), &cookie);
        assert_eq!(r.status, 302, "{body}");
        let loc = r.header("location").unwrap();
        assert!(
            loc.starts_with(CLIENT_REDIRECT) && loc.contains("error=server_error"),
            "{body}: {loc}"
        );
        assert!(!loc.contains("code="), "{body}: {loc}");
    }
    wait_for_audit(&audit, "oauth_sign_in_failed");
}

/// A token minted for one endpoint reaches that endpoint's server only, wherever it is
/// presented: the legacy messages URL names no endpoint of its own, so a token for
/// `/mcp/files` posted into a session of the default server's `/sse` stream is refused (the
/// session is not its caller's), while the stream's own token works there.
#[test]
fn a_token_for_one_endpoint_cannot_post_into_another_servers_legacy_session() {
    use common::legacy::{INIT_2024, Legacy};
    let gh = FakeGithub::start();
    let g = facade_gateway(&gh, "");
    let token = |path: &str| {
        let (_, t) = tokens_for(&g, &format!("{}{path}", base(&g)), Some("mcp:all"));
        t["access_token"].as_str().unwrap().to_string()
    };
    let (sse, files) = (token("/sse"), token("/mcp/files"));
    let l = Legacy::open(g.addr, "/sse", &sse);
    let refused = l.post_as(&files, INIT_2024);
    assert_eq!(refused.status, 404, "{}", refused.text());
    assert_eq!(l.post(INIT_2024).status, 202);
}
