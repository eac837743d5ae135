//! The HTTP contract: authentication, the error shape, contacts, and mailbox
//! connection checked against the real IMAP server.

mod support;

use reqwest::Method;
use support::{
    daemon::{API_KEY, Api, Daemon, test_config},
    receiver::Receiver,
    stack::Stack,
};

async fn daemon() -> (Daemon, Api, Stack, tempfile::TempDir) {
    let stack = Stack::get();
    let receiver = Receiver::start().await;
    let data = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(test_config(data.path(), &stack, &receiver)).await;
    let api = Api::new(&daemon.base);
    (daemon, api, stack, data)
}

fn assert_error_shape(body: &serde_json::Value) {
    assert!(body["error"]["code"].is_string(), "error code in {body}");
    assert!(
        body["error"]["message"].is_string(),
        "error message in {body}"
    );
}

#[tokio::test]
async fn every_v1_route_needs_the_api_key_and_health_does_not() {
    let (daemon, _api, _stack, _data) = daemon().await;
    let http = reqwest::Client::new();
    for (method, path) in [
        (Method::GET, "/v1/locations/L1/contacts/c1"),
        (Method::PUT, "/v1/locations/L1/contacts/c1"),
        (Method::POST, "/v1/locations/L1/contacts/bulk"),
        (Method::GET, "/v1/locations/L1/users/u1/mailbox"),
        (Method::DELETE, "/v1/locations/L1/users/u1/mailbox"),
        (Method::POST, "/v1/locations/L1/users/u1/messages"),
        (Method::GET, "/v1/locations/L1/contacts/c1/messages"),
        (Method::GET, "/v1/messages/msg_1"),
        (Method::GET, "/v1/messages/msg_1/raw"),
        (Method::GET, "/v1/messages/msg_1/attachments/0"),
        (
            Method::GET,
            "/v1/oauth/gmail/start?location_id=L1&user_id=u1",
        ),
        (Method::GET, "/v1/dead-letters"),
        (Method::POST, "/v1/dead-letters/1/retry"),
        (Method::DELETE, "/v1/dead-letters/1"),
        (Method::GET, "/v1/locations/L1/users/u1/auto-bcc"),
        (Method::PUT, "/v1/auto-bcc/mailbox"),
        (Method::GET, "/v1/auto-bcc/mailbox"),
        (Method::DELETE, "/v1/auto-bcc/mailbox"),
        (Method::POST, "/v1/inspect?mailbox=me@example.test"),
        (Method::PATCH, "/v1/messages/msg_1"),
        (Method::DELETE, "/v1/messages/msg_1"),
    ] {
        for auth in [None, Some("Bearer wrong-key"), Some(API_KEY)] {
            let mut request = http.request(method.clone(), format!("{}{path}", daemon.base));
            if let Some(auth) = auth {
                request = request.header("authorization", auth);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 401, "{method} {path} with {auth:?}");
            let body: serde_json::Value = response.json().await.unwrap();
            assert_error_shape(&body);
        }
    }
    for path in ["/healthz", "/readyz", "/metrics"] {
        let response = http
            .get(format!("{}{path}", daemon.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    daemon.stop().await;
}

#[tokio::test]
async fn malformed_requests_get_the_error_shape_never_a_500() {
    let (daemon, api, _stack, _data) = daemon().await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/locations/L1/contacts/c1", daemon.base);
    let cases: Vec<(&str, &str, u16)> = vec![
        ("broken JSON", "{\"emails\": [", 400),
        ("wrong type", "{\"emails\": \"ann@x.test\"}", 422),
        (
            "unknown field",
            "{\"emails\": [\"a@x.test\"], \"nope\": 1}",
            422,
        ),
        ("no emails", "{\"emails\": []}", 422),
        (
            "CRLF in an address",
            "{\"emails\": [\"a@x.test\\r\\nBcc: evil@x.test\"]}",
            422,
        ),
        ("not an address", "{\"emails\": [\"nobody\"]}", 422),
        ("binary junk", "\u{0}\u{1}\u{2}", 400),
    ];
    for (name, body, status) in cases {
        let response = http
            .put(&url)
            .bearer_auth(API_KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{name}");
        let json: serde_json::Value = response.json().await.unwrap();
        assert_error_shape(&json);
    }
    let (status, body) = api.send(Method::GET, "/v1/nope", None).await;
    assert_eq!(status, 404);
    assert_error_shape(&body);
    let (status, body) = api
        .send(Method::PATCH, "/v1/locations/L1/contacts/c1", None)
        .await;
    assert_eq!(status, 405);
    assert_error_shape(&body);
    let (status, _) = api
        .send(Method::GET, "/v1/locations/L1/contacts/c1", None)
        .await;
    assert_eq!(status, 404, "nothing was stored by the refused requests");
    daemon.stop().await;
}

#[tokio::test]
async fn contacts_put_get_delete() {
    let (daemon, api, _stack, _data) = daemon().await;
    let path = "/v1/locations/L1/contacts/c1";
    let (status, body) = api
        .send(
            Method::PUT,
            path,
            Some(serde_json::json!({"emails": ["Ann@Example.COM"], "name": "Ann", "assigned_user_ids": ["u1"], "created_at": "2026-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["emails"][0], "ann@example.com");
    let (status, body) = api.send(Method::GET, path, None).await;
    assert_eq!(status, 200);
    assert_eq!(body["name"], "Ann");
    assert_eq!(body["created_at"], "2026-01-01T00:00:00Z");
    let (status, _) = api.send(Method::DELETE, path, None).await;
    assert_eq!(status, 204);
    let (status, body) = api.send(Method::GET, path, None).await;
    assert_eq!(status, 404);
    assert_error_shape(&body);
    let (status, _) = api.send(Method::DELETE, path, None).await;
    assert_eq!(status, 404);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_upserts_100_000_contacts_in_one_call() {
    let (daemon, api, _stack, _data) = daemon().await;
    let contacts: Vec<serde_json::Value> = (0..100_000)
        .map(|i| serde_json::json!({"id": format!("c{i}"), "emails": [format!("person{i}@bulk.test")], "assigned_user_ids": ["u1"]}))
        .collect();
    let (status, body) = api
        .send(
            Method::POST,
            "/v1/locations/L1/contacts/bulk",
            Some(serde_json::Value::Array(contacts)),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["upserted"], 100_000);
    let (status, body) = api
        .send(Method::GET, "/v1/locations/L1/contacts/c99999", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["emails"][0], "person99999@bulk.test");

    // One bad entry refuses the whole call, naming it.
    let (status, body) = api
        .send(
            Method::POST,
            "/v1/locations/L1/contacts/bulk",
            Some(serde_json::json!([{"id": "ok", "emails": ["a@b.test"]}, {"id": "bad", "emails": ["nope"]}])),
        )
        .await;
    assert_eq!(status, 422);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("[1].emails[0]"),
        "{body}"
    );
    let (status, _) = api
        .send(Method::GET, "/v1/locations/L1/contacts/ok", None)
        .await;
    assert_eq!(status, 404);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r01_connect_checks_the_password_against_the_server_and_stores_nothing_on_failure() {
    let (daemon, api, stack, _data) = daemon().await;
    let me = stack.new_user("me").await;
    let body = |password: &str| {
        serde_json::json!({
            "email": me.address,
            "provider": "imap",
            "auth": {"type": "password", "username": me.address, "password": password},
            "imap": stack.imap_endpoint(),
            "smtp": stack.smtp_endpoint(),
        })
    };
    let path = "/v1/locations/L1/users/u1/mailbox";
    let (status, error) = api
        .send(Method::PUT, path, Some(body("wrong-password")))
        .await;
    assert_eq!(status, 422, "{error}");
    assert_eq!(error["error"]["code"], "invalid_credentials");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("[AUTHENTICATIONFAILED]"),
        "carries the server's words: {error}"
    );
    let (status, _) = api.send(Method::GET, path, None).await;
    assert_eq!(status, 404, "nothing stored");

    let (status, connected) = api.send(Method::PUT, path, Some(body(&me.password))).await;
    assert_eq!(status, 200, "{connected}");
    assert_eq!(connected["email"], me.address.as_str());
    assert!(
        connected["smart_bcc_address"]
            .as_str()
            .unwrap()
            .contains('@')
    );
    api.wait_active("L1", "u1").await;

    let (status, _) = api.send(Method::DELETE, path, None).await;
    assert_eq!(status, 204);
    let (status, _) = api.send(Method::GET, path, None).await;
    assert_eq!(status, 404);
    daemon.stop().await;
}

#[tokio::test]
async fn connect_refuses_unencrypted_remote_servers_and_unreachable_ones() {
    let (daemon, api, _stack, _data) = daemon().await;
    let mut body = serde_json::json!({
        "email": "me@example.com",
        "provider": "imap",
        "auth": {"type": "password", "password": "x"},
        "imap": {"host": "mail.example.com", "port": 143, "security": "plain"},
        "smtp": {"host": "mail.example.com", "port": 465, "security": "tls"},
    });
    let path = "/v1/locations/L1/users/u1/mailbox";
    let (status, error) = api.send(Method::PUT, path, Some(body.clone())).await;
    assert_eq!(status, 422);
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("imap.security"),
        "{error}"
    );

    // A port nothing listens on: a clear 422, not a hang or a 500.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    body["imap"] = serde_json::json!({"host": "127.0.0.1", "port": closed, "security": "tls"});
    let (status, error) = api.send(Method::PUT, path, Some(body)).await;
    assert_eq!(status, 422, "{error}");
    assert_eq!(error["error"]["code"], "imap_connection_failed");
    daemon.stop().await;
}

/// Issue 10: with `[server] metrics_public = false`, `/metrics` takes the
/// API key like `/v1`; health checks stay open.
#[tokio::test]
async fn metrics_can_be_put_behind_the_api_key() {
    let stack = Stack::get();
    let receiver = Receiver::start().await;
    let data = tempfile::tempdir().unwrap();
    let mut config = test_config(data.path(), &stack, &receiver);
    config.server.metrics_public = false;
    let daemon = Daemon::start(config).await;
    let http = reqwest::Client::new();
    let metrics = format!("{}/metrics", daemon.base);
    for auth in [None, Some("Bearer wrong-key")] {
        let mut request = http.get(&metrics);
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{auth:?}");
        assert_error_shape(&response.json().await.unwrap());
    }
    let response = http
        .get(&metrics)
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = http
        .get(format!("{}/healthz", daemon.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    daemon.stop().await;
}

/// Issue 10: the document the daemon serves names only routes it has, and
/// each route it names answers from its handler, not from the fallback;
/// `/docs` renders it from the daemon's own assets.
#[tokio::test]
async fn the_api_describes_itself_at_openapi_json_and_docs() {
    let stack = Stack::get();
    let receiver = Receiver::start().await;
    let data = tempfile::tempdir().unwrap();
    let mut config = test_config(data.path(), &stack, &receiver);
    config.server.metrics_public = false;
    let daemon = Daemon::start(config).await;
    let http = reqwest::Client::new();

    let response = http
        .get(format!("{}/openapi.json", daemon.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "the document needs no key");
    let document: serde_json::Value = response.json().await.unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    assert!(
        document["paths"]["/metrics"]["get"]["security"].is_array(),
        "metrics_public = false shows in the document"
    );
    let paths = document["paths"].as_object().unwrap();
    let mut checked = 0;
    for (path, item) in paths {
        let url = path
            .replace("{index}", "0")
            .replace("{provider}", "gmail")
            .split('/')
            .map(|part| match part.starts_with('{') {
                true => "x",
                false => part,
            })
            .collect::<Vec<_>>()
            .join("/");
        for method in item.as_object().unwrap().keys() {
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let response = http
                .request(method.clone(), format!("{}{url}", daemon.base))
                .bearer_auth(API_KEY)
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            let status = response.status();
            let body = response.text().await.unwrap();
            assert_ne!(status, 405, "{method} {path}: {body}");
            assert!(
                !body.contains("no such route"),
                "{method} {path} is documented but not routed: {body}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 25, "only {checked} operations documented");

    let page = http
        .get(format!("{}/docs/", daemon.base))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "{html}");
    for attribute in ["src=\"http", "href=\"http", "src='http", "href='http"] {
        assert!(
            !html.contains(attribute),
            "the page fetches from elsewhere: {html}"
        );
    }
    let initializer = http
        .get(format!("{}/docs/swagger-initializer.js", daemon.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(initializer.contains("/openapi.json"), "{initializer}");
    assert!(
        initializer
            .replace([' ', '\n'], "")
            .contains("\"validatorUrl\":\"none\""),
        "the page would ask validator.swagger.io: {initializer}"
    );
    daemon.stop().await;
}
