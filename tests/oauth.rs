//! Signing in with OAuth2 against a real authorization server
//! (oauth2-mock-server) whose RS256 tokens the stack's Dovecot and Postfix
//! accept for XOAUTH2: the sign-in flow (R1), token renewal, and what makes a
//! mailbox `needs_reauth` and what does not (R20).

mod support;

use reqwest::Method;
use support::{
    DEADLINE, eventually,
    oauth::OAuthServer,
    world::{World, mail},
};

/// The `imap` provider with the stack's servers and the test provider's OAuth client.
async fn world() -> (World, OAuthServer) {
    let oauth = OAuthServer::get();
    let settings = oauth.clone();
    let world = World::started_with(move |config| with_test_provider(config, &settings)).await;
    world
        .api
        .put_contact("L1", "c-ann", &world.ann.address, &["u1"])
        .await;
    (world, oauth)
}

const CLIENT_SECRET: &str = "test-client-secret-5f1c";

/// The `imap` provider points at the stack and signs in with the test provider.
fn with_test_provider(config: &mut mailbridge::config::Config, oauth: &OAuthServer) {
    let stack = support::stack::Stack::get();
    let provider = &mut config.providers.imap;
    provider.imap = Some(stack.imap_endpoint());
    provider.smtp = Some(stack.smtp_endpoint());
    provider.oauth = mailbridge::config::OAuthOverrides {
        client_id: Some("mailbridge-test".into()),
        client_secret: Some(CLIENT_SECRET.into()),
        auth_url: Some(oauth.auth_url()),
        token_url: Some(oauth.token_url()),
        userinfo_url: Some(oauth.userinfo_url()),
        scopes: Some(vec!["openid".into(), "email".into()]),
        ..Default::default()
    };
    config.server.public_url = "https://bridge.example".into();
}

/// Asks the bridge where to send the person; `{"url": …}` with JSON.
async fn start_url(world: &World, provider: &str, return_to: &str) -> String {
    start_url_as(world, provider, "u1", return_to).await
}

async fn start_url_as(world: &World, provider: &str, user: &str, return_to: &str) -> String {
    let response = world
        .api
        .http
        .get(format!(
            "{}/v1/oauth/{provider}/start?location_id=L1&user_id={user}&return_to={}",
            world.daemon.base,
            urlencode(return_to)
        ))
        .bearer_auth(support::daemon::API_KEY)
        .header("accept", "application/json")
        .send()
        .await
        .expect("daemon reachable");
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    assert_eq!(status, 200, "{body}");
    body["url"].as_str().expect("url").to_string()
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Follows the provider's redirect to the bridge's callback, as the browser
/// would (no API key); returns the status and the Location it answers with.
async fn follow_callback(world: &World, provider_redirect: &str) -> (u16, Option<String>) {
    let url = reqwest::Url::parse(provider_redirect).expect("callback URL");
    assert_eq!(url.path(), "/v1/oauth/imap/callback");
    let at_daemon = format!(
        "{}{}?{}",
        world.daemon.base,
        url.path(),
        url.query().unwrap_or("")
    );
    let response = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(at_daemon)
        .send()
        .await
        .expect("daemon reachable");
    let location = response
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (response.status().as_u16(), location)
}

fn query_of(url: &str) -> std::collections::HashMap<String, String> {
    reqwest::Url::parse(url)
        .expect("url")
        .query_pairs()
        .into_owned()
        .collect()
}

/// Connects me with tokens as a CRM's own consent screen would hand them over.
async fn connect_with_tokens(world: &World, oauth: &OAuthServer) -> serde_json::Value {
    connect_with_tokens_and(world, oauth, serde_json::json!({})).await
}

/// As `connect_with_tokens`, with `extra` merged into the request.
async fn connect_with_tokens_and(
    world: &World,
    oauth: &OAuthServer,
    extra: serde_json::Value,
) -> serde_json::Value {
    let grant = oauth.grant(&world.me.address).await;
    let mut request = serde_json::json!({
        "email": world.me.address,
        "provider": "imap",
        "auth": {"type": "oauth2", "refresh_token": grant.refresh_token,
                 "access_token": grant.access_token, "expires_at": grant.expires_at},
    });
    if let (Some(body), serde_json::Value::Object(extra)) = (request.as_object_mut(), extra) {
        body.extend(extra);
    }
    let (status, body) = world
        .api
        .send(
            Method::PUT,
            "/v1/locations/L1/users/u1/mailbox",
            Some(request),
        )
        .await;
    assert_eq!(status, 200, "connect with tokens: {body}");
    world.api.wait_active("L1", "u1").await;
    body
}

/// Waits until an access token issued now with `lifetime_secs` is past its expiry.
async fn outlive(lifetime_secs: u64) {
    let expired_at =
        tokio::time::Instant::now() + std::time::Duration::from_secs(lifetime_secs + 1);
    eventually("the access token to expire", DEADLINE, async || {
        (tokio::time::Instant::now() >= expired_at).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r01_sign_in_flow_connects_the_consenting_account_and_mail_flows_both_ways() {
    let (world, oauth) = world().await;
    let url = start_url(&world, "imap", "https://crm.example/done?x=1").await;
    let query = query_of(&url);
    assert!(url.starts_with(&oauth.auth_url()), "{url}");
    assert_eq!(query["code_challenge_method"], "S256");
    assert_eq!(query["prompt"], "consent");
    assert_eq!(
        query["redirect_uri"],
        "https://bridge.example/v1/oauth/imap/callback"
    );

    // Without `Accept: application/json` the answer is the redirect itself.
    let response = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!(
            "{}/v1/oauth/imap/start?location_id=L1&user_id=u1",
            world.daemon.base
        ))
        .bearer_auth(support::daemon::API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 302);

    let callback = oauth.authorize(&url, &world.me.address).await;
    let (status, location) = follow_callback(&world, &callback).await;
    assert_eq!(status, 302, "{location:?}");
    let location = location.expect("redirect to return_to");
    let outcome = query_of(&location);
    assert!(
        location.starts_with("https://crm.example/done?x=1&"),
        "{location}"
    );
    assert_eq!(outcome["status"], "connected", "{location}");
    assert_eq!(outcome["email"], world.me.address);
    assert_eq!(oauth.stats(&world.me.address).await.code_exchanges, 1);
    world.api.wait_active("L1", "u1").await;
    world
        .receiver
        .wait_for("mailbox.connected", |r| r.kind() == "mailbox.connected")
        .await;

    mail(&world.stack, &world.ann, &world.me, "over oauth", None).await;
    let inbound = world
        .receiver
        .wait_for("the inbound message", |r| r.subject() == "over oauth")
        .await;
    assert_eq!(inbound.kind(), "message.inbound");

    let (code, sent, _) = world
        .send(serde_json::json!({"contact_id": "c-ann", "subject": "sent with xoauth2", "text": "hi"}))
        .await;
    assert_eq!(code, 202, "{sent}");
    world
        .receiver
        .wait_for("message.sent", |r| r.kind() == "message.sent")
        .await;
    world.stack.wait_count(&world.ann, "INBOX", 1).await;

    // Tokens never show in answers or events.
    let (_, status) = world
        .api
        .send(Method::GET, "/v1/locations/L1/users/u1/mailbox", None)
        .await;
    let everything = format!(
        "{status}{:?}",
        world
            .receiver
            .all()
            .iter()
            .map(|r| r.data().to_string())
            .collect::<Vec<_>>()
    );
    assert!(
        !everything.contains("refresh_token") && !everything.contains("eyJ"),
        "{everything}"
    );
    world.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r01_tampered_replayed_or_refused_sign_ins_connect_nothing() {
    let (world, oauth) = world().await;
    let url = start_url(&world, "imap", "https://crm.example/done").await;
    let callback = oauth.authorize(&url, &world.me.address).await;

    // A state altered by one character: not this bridge's, and nowhere to send the person.
    let state = query_of(&callback)["state"].clone();
    let mut tampered = state.clone().into_bytes();
    tampered[3] = if tampered[3] == b'A' { b'B' } else { b'A' };
    let tampered = callback.replace(&state, &String::from_utf8(tampered).unwrap());
    let (status, _) = follow_callback(&world, &tampered).await;
    assert_eq!(status, 400);

    // The real one works once; the same answer again is refused.
    let (status, location) = follow_callback(&world, &callback).await;
    assert_eq!(status, 302);
    assert_eq!(query_of(&location.unwrap())["status"], "connected");
    let (status, location) = follow_callback(&world, &callback).await;
    assert_eq!(status, 302);
    let outcome = query_of(&location.unwrap());
    assert_eq!(outcome["status"], "error");
    assert!(outcome["reason"].contains("already used"), "{outcome:?}");
    assert_eq!(
        oauth.stats(&world.me.address).await.code_exchanges,
        1,
        "a replay exchanges no code"
    );

    // Consent refused: an error for the CRM, no mailbox for u2.
    let url = start_url_as(&world, "imap", "u2", "https://crm.example/done").await;
    let denied = oauth.deny(&url).await;
    let (status, location) = follow_callback(&world, &denied).await;
    assert_eq!(status, 302);
    let outcome = query_of(&location.unwrap());
    assert_eq!(outcome["status"], "error");
    assert!(outcome["reason"].contains("access_denied"), "{outcome:?}");
    let (status, _) = world
        .api
        .send(Method::GET, "/v1/locations/L1/users/u2/mailbox", None)
        .await;
    assert_eq!(status, 404);

    // A provider without an OAuth client: a clear 422 naming the key.
    let (status, body) = world
        .api
        .send(
            Method::GET,
            "/v1/oauth/outlook/start?location_id=L1&user_id=u1",
            None,
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("providers.outlook.oauth.client_id"),
        "{body}"
    );
    // Starting needs the API key; the callback does not (its state authenticates it).
    let response = reqwest::get(format!(
        "{}/v1/oauth/imap/start?location_id=L1&user_id=u1",
        world.daemon.base
    ))
    .await
    .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    world.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r20_an_access_token_that_expires_while_idle_is_renewed_and_nothing_is_lost() {
    let (world, oauth) = world().await;
    oauth.set_lifetime(&world.me.address, 6).await;
    connect_with_tokens(&world, &oauth).await;
    let before = oauth.stats(&world.me.address).await.refreshes;

    // Gmail and Exchange end a session when its token expires; the bridge
    // logs in again with a renewed token shortly before that, by itself.
    eventually(
        "the bridge to renew the token while idle",
        DEADLINE,
        async || (oauth.stats(&world.me.address).await.refreshes > before).then_some(()),
    )
    .await;
    mail(&world.stack, &world.ann, &world.me, "after renewal", None).await;
    world
        .receiver
        .wait_for("the message after the renewal", |r| {
            r.subject() == "after renewal"
        })
        .await;

    // Sessions ended by the server once the first token is long expired: the
    // bridge logs in again with a current token and catches up.
    outlive(6).await;
    world.stack.kick(&world.me);
    mail(&world.stack, &world.ann, &world.me, "after expiry", None).await;
    world
        .receiver
        .wait_for("the message after the token expired", |r| {
            r.subject() == "after expiry"
        })
        .await;
    let (code, sent, _) = world
        .send(serde_json::json!({"contact_id": "c-ann", "subject": "sent after renewal", "text": "hi"}))
        .await;
    assert_eq!(code, 202, "{sent}");
    world
        .receiver
        .wait_for("message.sent", |r| r.kind() == "message.sent")
        .await;
    let refreshes = oauth.stats(&world.me.address).await.refreshes - before;
    assert!(refreshes >= 1, "the token was renewed");
    // Two IDLE sessions and a send share renewals: one per token (renewed
    // 2 s before its 6 s are up), not one per session.
    assert!(refreshes <= 6, "{refreshes} renewals");
    assert!(
        world
            .receiver
            .all()
            .iter()
            .all(|r| r.kind() != "mailbox.needs_reauth")
    );
    world.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r20_a_revoked_grant_is_reported_once_stops_all_requests_and_reauth_resumes_from_the_cursor()
 {
    let (world, oauth) = world().await;
    oauth.set_lifetime(&world.me.address, 6).await;
    connect_with_tokens_and(&world, &oauth, serde_json::json!({"daily_send_limit": 7})).await;
    mail(&world.stack, &world.ann, &world.me, "before revoke", None).await;
    world
        .receiver
        .wait_for("the first message", |r| r.subject() == "before revoke")
        .await;

    // The bridge meets the revocation when it renews the token, shortly
    // before the current one expires.
    oauth.revoke(&world.me.address).await;
    world
        .receiver
        .wait_for("mailbox.needs_reauth", |r| {
            r.kind() == "mailbox.needs_reauth"
        })
        .await;
    let (_, status) = world
        .api
        .send(Method::GET, "/v1/locations/L1/users/u1/mailbox", None)
        .await;
    assert_eq!(status["state"], "needs_reauth");
    assert!(
        status["last_error"]
            .as_str()
            .unwrap()
            .contains("invalid_grant"),
        "{status}"
    );
    let (code, error, _) = world
        .send(serde_json::json!({"contact_id": "c-ann", "subject": "s", "text": "x"}))
        .await;
    assert_eq!(code, 409, "{error}");

    // Mail arrives meanwhile; the bridge asks the provider nothing more.
    let stats = oauth.stats(&world.me.address).await;
    mail(&world.stack, &world.ann, &world.me, "during reauth", None).await;
    world.stack.wait_count(&world.me, "INBOX", 2).await;
    // A reconnect would come within the test's 1 s backoff cap; give it three.
    let quiet_until = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
    eventually("three reconnect periods to pass", DEADLINE, async || {
        (tokio::time::Instant::now() >= quiet_until).then_some(())
    })
    .await;
    assert_eq!(
        oauth.stats(&world.me.address).await,
        stats,
        "no token request after needs_reauth"
    );
    assert!(stats.refreshes <= 2, "bounded renewals: {stats:?}");

    // The person signs in again: the message from meanwhile syncs, once, and
    // the mailbox keeps its settings.
    let url = start_url(&world, "imap", "https://crm.example/again").await;
    let callback = oauth.authorize(&url, &world.me.address).await;
    let (_, location) = follow_callback(&world, &callback).await;
    assert_eq!(query_of(&location.unwrap())["status"], "connected");
    world.api.wait_active("L1", "u1").await;
    let (_, status) = world
        .api
        .send(Method::GET, "/v1/locations/L1/users/u1/mailbox", None)
        .await;
    assert_eq!(status["daily_send_limit"], 7, "{status}");
    world
        .receiver
        .wait_for("the message from meanwhile", |r| {
            r.subject() == "during reauth"
        })
        .await;
    mail(&world.stack, &world.ann, &world.me, "after reauth", None).await;
    world
        .receiver
        .wait_for("the next message", |r| r.subject() == "after reauth")
        .await;
    let receiver = &world.receiver;
    assert_eq!(receiver.distinct(|r| r.kind() == "mailbox.needs_reauth"), 1);
    assert_eq!(receiver.distinct(|r| r.subject() == "during reauth"), 1);
    assert_eq!(receiver.distinct(|r| r.subject() == "before revoke"), 1);
    world.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r20_an_unavailable_token_endpoint_is_not_needs_reauth() {
    let (world, oauth) = world().await;
    oauth.set_lifetime(&world.me.address, 6).await;
    connect_with_tokens(&world, &oauth).await;
    // The renewal due 2 s before the token's 6 s are up meets three 503s.
    oauth.fail_next(&world.me.address, 503, 3).await;
    eventually("the renewals to meet the outage", DEADLINE, async || {
        (oauth.stats(&world.me.address).await.failed >= 3).then_some(())
    })
    .await;
    mail(
        &world.stack,
        &world.ann,
        &world.me,
        "after the outage",
        None,
    )
    .await;
    world
        .receiver
        .wait_for("the message after the token endpoint recovered", |r| {
            r.subject() == "after the outage"
        })
        .await;
    let stats = oauth.stats(&world.me.address).await;
    assert!(stats.failed >= 3, "the outage was met: {stats:?}");
    assert!(
        world
            .receiver
            .all()
            .iter()
            .all(|r| r.kind() != "mailbox.needs_reauth"),
        "a 503 is no verdict on the grant"
    );
    world.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r01_a_stale_access_token_handed_over_without_expiry_is_renewed_at_connect() {
    let (world, oauth) = world().await;
    oauth.set_lifetime(&world.me.address, 1).await;
    let grant = oauth.grant(&world.me.address).await;
    outlive(1).await;
    oauth.set_lifetime(&world.me.address, 3600).await;
    let (status, body) = world
        .api
        .send(
            Method::PUT,
            "/v1/locations/L1/users/u1/mailbox",
            Some(serde_json::json!({
                "email": world.me.address,
                "provider": "imap",
                // No expires_at: the bridge learns the token is stale from the server.
                "auth": {"type": "oauth2", "refresh_token": grant.refresh_token,
                         "access_token": grant.access_token},
            })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(oauth.stats(&world.me.address).await.refreshes, 1);
    world.api.wait_active("L1", "u1").await;

    // A refresh token the provider refuses: 422, nothing stored.
    oauth.revoke(&world.me.address).await;
    let (status, body) = world
        .api
        .send(
            Method::PUT,
            "/v1/locations/L2/users/u9/mailbox",
            Some(serde_json::json!({
                "email": world.me.address,
                "provider": "imap",
                "auth": {"type": "oauth2", "refresh_token": grant.refresh_token},
            })),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_credentials");
    assert!(
        !body.to_string().contains(&grant.refresh_token),
        "the token is not echoed: {body}"
    );
    let (status, _) = world
        .api
        .send(Method::GET, "/v1/locations/L2/users/u9/mailbox", None)
        .await;
    assert_eq!(status, 404);
    world.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_or_client_secret_reaches_the_log_even_at_debug_and_trace_levels() {
    let oauth = OAuthServer::get();
    let stack = support::stack::Stack::get();
    let receiver = support::receiver::Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = support::daemon::test_config(&dir.path().join("data"), &stack, &receiver);
    with_test_provider(&mut config, &oauth);
    let me = stack.new_user("me").await;
    let ann = stack.new_user("ann").await;
    let daemon = support::child::ChildDaemon::start_logging(
        &config,
        dir.path(),
        // lettre logs what it writes at debug, async-imap at trace.
        "debug,lettre=trace,async_imap=trace",
    )
    .await;
    let api = support::daemon::Api::new(&daemon.base);
    api.put_contact("L1", "c-ann", &ann.address, &["u1"]).await;

    // Connect with tokens, let the bridge renew one, send, get revoked, and
    // be handed the dead token again: every path that touches a secret.
    oauth.set_lifetime(&me.address, 6).await;
    let grant = oauth.grant(&me.address).await;
    let connect = |refresh_token: &str, access_token: Option<(&str, &str)>| {
        let mut auth = serde_json::json!({"type": "oauth2", "refresh_token": refresh_token});
        if let Some((token, expires_at)) = access_token {
            auth["access_token"] = token.into();
            auth["expires_at"] = expires_at.into();
        }
        serde_json::json!({"email": me.address, "provider": "imap", "auth": auth})
    };
    let (status, body) = api
        .send(
            Method::PUT,
            "/v1/locations/L1/users/u1/mailbox",
            Some(connect(
                &grant.refresh_token,
                Some((&grant.access_token, &grant.expires_at)),
            )),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    api.wait_active("L1", "u1").await;
    eventually("a renewal", DEADLINE, async || {
        (oauth.stats(&me.address).await.refreshes >= 1).then_some(())
    })
    .await;
    let (code, sent, _) = api
        .send_message(
            "L1",
            "u1",
            serde_json::json!({"contact_id": "c-ann", "subject": "s", "text": "x"}),
            None,
        )
        .await;
    assert_eq!(code, 202, "{sent}");
    receiver
        .wait_for("message.sent", |r| r.kind() == "message.sent")
        .await;
    oauth.revoke(&me.address).await;
    receiver
        .wait_for("mailbox.needs_reauth", |r| {
            r.kind() == "mailbox.needs_reauth"
        })
        .await;
    let (status, _) = api
        .send(
            Method::PUT,
            "/v1/locations/L1/users/u1/mailbox",
            Some(connect(&grant.refresh_token, None)),
        )
        .await;
    assert_eq!(status, 422);
    let log = daemon.log();
    daemon.terminate().await;

    assert!(log.contains("invalid_grant"), "the log was captured: {log}");
    // SASL carries the token base64-encoded after `user=…\x01auth=Bearer `.
    let sasl_prefix = {
        use base64::Engine as _;
        let encoded = base64::engine::general_purpose::STANDARD
            .encode(format!("user={}\x01auth=Bearer ", me.address));
        encoded[..encoded.len() - 4].to_string()
    };
    for (what, secret) in [
        ("refresh token", grant.refresh_token.as_str()),
        ("access token", grant.access_token.as_str()),
        ("client secret", CLIENT_SECRET),
        // Every access and id token of the test provider is a JWT.
        ("a JWT", "eyJ"),
        ("a SASL XOAUTH2 response", sasl_prefix.as_str()),
    ] {
        assert!(!log.contains(secret), "{what} in the log");
    }
}

/// Issue 10: a location that claimed an address with a server of its own
/// (one that takes any login) never receives the owner's access token: the
/// owner's sign-in uses the provider's servers, not the ones stored with the
/// address, and is refused (`mailbox_in_use`) rather than connected there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_in_never_sends_the_token_to_a_server_claimed_by_another_location() {
    let (world, oauth) = world().await;
    let squatter = support::scripted_gmail::ScriptedGmail::start().await;
    let (status, body) = world
        .api
        .send(
            reqwest::Method::PUT,
            "/v1/locations/L2/users/squatter/mailbox",
            Some(serde_json::json!({
                "email": world.me.address,
                "provider": "imap",
                "auth": {"type": "password", "username": world.me.address, "password": "any"},
                "imap": squatter.endpoint(),
                "smtp": squatter.endpoint(),
            })),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    let url = start_url(&world, "imap", "https://crm.example/done").await;
    let callback = oauth.authorize(&url, &world.me.address).await;
    let (_, location) = follow_callback(&world, &callback).await;
    let location = location.expect("redirect to return_to");
    assert_eq!(query_of(&location)["status"], "error", "{location}");
    assert_eq!(
        squatter.authentications(),
        0,
        "no access token was offered to the other location's server"
    );
    world.daemon.stop().await;
}
