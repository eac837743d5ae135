//! The API described. The routes and their OpenAPI 3.1 document come from
//! one list (`described_routes`): each handler carries its own annotation,
//! and the bodies are the handlers' own types, so a route cannot exist
//! without its description or answer with a shape the document does not
//! name. Served at `GET /openapi.json`, readable at `/docs`.

use utoipa::{
    OpenApi,
    openapi::{
        self, ContentBuilder, HttpMethod, ObjectBuilder, PathItem, Paths, Ref, RefOr,
        ResponseBuilder, Schema, Type,
        path::{OperationBuilder, ParameterBuilder, ParameterIn},
        request_body::RequestBodyBuilder,
        schema::{KnownFormat, SchemaFormat},
        security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme},
    },
};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{
    AppState, auto_bcc, contacts, dead_letters, error::ErrorBody, inspect, mailboxes, messages,
    oauth, skipped,
};
use crate::{
    event_data::{self, KINDS},
    model::MessageEventData,
};

/// Bytes as they are: a message's source, an attachment.
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct RawBytes(#[allow(dead_code)] Vec<u8>);

/// The name of the API key scheme in the document.
const API_KEY: &str = "api_key";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "mailbridge",
        description = "Two-way sync between users' own mailboxes (IMAP IDLE + SMTP) and a CRM's \
conversations. Every `/v1` route but the OAuth callback needs `Authorization: Bearer <api key>`. \
Every error is `{\"error\": {\"code\", \"message\"}}`; a 422's message names the field. \
Events reach the CRM as Standard Webhooks (see `webhooks`).",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    tags(
        (name = "contacts", description = "The CRM's directory, per location"),
        (name = "mailboxes", description = "Connecting a user's mailbox (an integration)"),
        (name = "messages", description = "Sending as the user, and what was synced"),
        (name = "oauth", description = "Sign in with Google or Microsoft"),
        (name = "auto-bcc", description = "Smart addresses and the catch-all mailbox (R15)"),
        (name = "inspect", description = "Why a message would or would not sync"),
        (name = "dead-letters", description = "Events the bridge gave up delivering"),
        (name = "operations", description = "Health, readiness and metrics"),
    ),
    components(schemas(
        ErrorBody,
        MessageEventData,
        event_data::MessageSent,
        event_data::MessageFailed,
        event_data::MessageChanged,
        event_data::MessageUnprocessable,
        event_data::MailboxLifecycle,
        event_data::ContactCreated,
        event_data::ThreadDetached,
    )),
)]
struct Base;

/// Every route, in the groups the router layers differently.
pub(super) struct Described {
    /// `/v1` routes behind the API key.
    pub keyed: OpenApiRouter<AppState>,
    /// `/v1` routes without it.
    pub open: OpenApiRouter<AppState>,
    /// `/metrics`: behind the key unless `[server] metrics_public`.
    pub metrics: OpenApiRouter<AppState>,
    /// `/healthz`, `/readyz`.
    pub health: OpenApiRouter<AppState>,
}

impl Described {
    pub fn new(metrics_public: bool) -> Self {
        use axum::extract::DefaultBodyLimit;
        use utoipa_axum::router::UtoipaMethodRouterExt as _;

        let mut keyed = OpenApiRouter::new()
            .routes(routes!(contacts::bulk).layer(DefaultBodyLimit::max(super::BULK_BODY_LIMIT)))
            .routes(routes!(contacts::put, contacts::get, contacts::delete))
            .routes(routes!(mailboxes::put, mailboxes::get, mailboxes::delete))
            .routes(routes!(messages::send))
            .routes(routes!(messages::history))
            .routes(routes!(messages::get, messages::patch, messages::delete))
            .routes(routes!(messages::raw))
            .routes(routes!(messages::attachment))
            .routes(routes!(oauth::start))
            .routes(routes!(auto_bcc::address, auto_bcc::put_senders))
            .routes(routes!(auto_bcc::put, auto_bcc::get, auto_bcc::delete))
            .routes(
                routes!(inspect::inspect).layer(DefaultBodyLimit::max(super::INSPECT_BODY_LIMIT)),
            )
            .routes(routes!(dead_letters::list))
            .routes(routes!(dead_letters::retry))
            .routes(routes!(dead_letters::delete))
            .routes(routes!(mailboxes::list))
            .routes(routes!(skipped::list));
        require_key(keyed.get_openapi_mut());
        // The provider sends the person's browser here: the signed state
        // authenticates it, not an API key.
        let open = OpenApiRouter::new().routes(routes!(oauth::callback));
        let mut metrics = OpenApiRouter::new().routes(routes!(super::metrics));
        if !metrics_public {
            require_key(metrics.get_openapi_mut());
        }
        let health = OpenApiRouter::new()
            .routes(routes!(super::healthz))
            .routes(routes!(super::readyz));
        Self {
            keyed,
            open,
            metrics,
            health,
        }
    }

    /// The routes put together, with the document's base.
    pub fn assemble(self) -> OpenApiRouter<AppState> {
        OpenApiRouter::with_openapi(Base::openapi())
            .merge(self.health)
            .merge(self.metrics)
            .nest("/v1", self.keyed.merge(self.open))
    }
}

/// The document as the daemon serves it, with `/metrics` public or not.
pub fn document_for(metrics_public: bool) -> openapi::OpenApi {
    complete(Described::new(metrics_public).assemble().into_openapi())
}

/// The document with `/metrics` public (the default).
pub fn document() -> openapi::OpenApi {
    document_for(true)
}

/// Adds what every operation shares (the error answers any request can
/// get) and the webhooks.
pub(super) fn complete(mut document: openapi::OpenApi) -> openapi::OpenApi {
    let scheme = SecurityScheme::Http(
        HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some("The API key, as `Authorization: Bearer <api key>`"))
            .build(),
    );
    document
        .components
        .get_or_insert_with(Default::default)
        .add_security_scheme(API_KEY, scheme);
    for (path, item) in document.paths.paths.iter_mut() {
        if !path.starts_with("/v1/") {
            continue;
        }
        for operation in operations_of(item) {
            let keyed = operation.security.is_some();
            let has_body = operation.request_body.is_some();
            let responses = &mut operation.responses.responses;
            let mut add = |status: &str, description: &str| {
                responses
                    .entry(status.to_string())
                    .or_insert_with(|| error_response(description));
            };
            add(
                "400",
                "Malformed: a path, query or JSON body that cannot be read (`malformed_path`, `malformed_query`, `malformed_json`, `content_type_not_json`)",
            );
            if keyed {
                add("401", "The API key is missing or not valid");
            }
            if has_body {
                add("413", "The body is larger than the route takes");
            }
            add(
                "422",
                "A field is invalid (`invalid_field`); the message names it",
            );
            add(
                "503",
                "The bridge cannot read or write its storage now; retry",
            );
        }
    }
    document.webhooks = Some(webhooks());
    document
}

fn require_key(document: &mut openapi::OpenApi) {
    for item in document.paths.paths.values_mut() {
        for operation in operations_of(item) {
            operation.security = Some(vec![SecurityRequirement::new::<_, _, &str>(API_KEY, [])]);
        }
    }
}

fn operations_of(item: &mut PathItem) -> impl Iterator<Item = &mut openapi::path::Operation> {
    [
        item.get.as_mut(),
        item.put.as_mut(),
        item.post.as_mut(),
        item.delete.as_mut(),
        item.patch.as_mut(),
    ]
    .into_iter()
    .flatten()
}

fn error_response(description: &str) -> RefOr<openapi::Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
        .into()
}

/// One webhook per kind of event: what the CRM's receiver gets.
fn webhooks() -> Paths {
    let mut paths = Paths::new();
    for (kind, data, when) in KINDS {
        let body: Schema = ObjectBuilder::new()
            .property(
                "type",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some([*kind])),
            )
            .required("type")
            .property(
                "timestamp",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime))),
            )
            .required("timestamp")
            .property("data", Ref::from_schema_name(*data))
            .required("data")
            .into();
        let header = |name: &str, description: &str| {
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Header)
                .required(openapi::Required::True)
                .description(Some(description))
                .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                .build()
        };
        let operation = OperationBuilder::new()
            .summary(Some(*when))
            .operation_id(Some(kind.replace('.', "_")))
            .parameter(header(
                "webhook-id",
                "The event's id, the same on every retry: drop repeats by it",
            ))
            .parameter(header(
                "webhook-timestamp",
                "Unix seconds when this attempt was signed",
            ))
            .parameter(header(
                "webhook-signature",
                "`v1,` + base64 HMAC-SHA256 of `id.timestamp.body` under the secret (Standard Webhooks)",
            ))
            .request_body(Some(
                RequestBodyBuilder::new()
                    .required(Some(openapi::Required::True))
                    .content(
                        "application/json",
                        ContentBuilder::new().schema(Some(body)).build(),
                    )
                    .build(),
            ))
            .response(
                "2XX",
                ResponseBuilder::new().description(
                    "Acknowledged. Anything else, or no answer in time, is retried with backoff for at least 24 hours, in order per thread",
                ),
            );
        paths
            .paths
            .insert(kind.to_string(), PathItem::new(HttpMethod::Post, operation));
    }
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json() -> serde_json::Value {
        serde_json::to_value(document()).unwrap_or_default()
    }

    #[test]
    fn the_document_is_openapi_3_1_and_every_v1_route_but_the_callback_needs_the_key() {
        let document = json();
        assert_eq!(document["openapi"], "3.1.0");
        let paths = document["paths"].as_object().cloned().unwrap_or_default();
        assert!(paths.len() >= 15, "only {} paths", paths.len());
        for (path, item) in &paths {
            for (method, operation) in item.as_object().cloned().unwrap_or_default() {
                let keyed = operation.get("security").is_some();
                let should = path.starts_with("/v1/") && !path.ends_with("/callback");
                assert_eq!(keyed, should, "{method} {path}");
            }
        }
    }

    #[test]
    fn every_error_answer_has_the_error_shape() {
        let document = json();
        for (path, item) in document["paths"].as_object().cloned().unwrap_or_default() {
            for (method, operation) in item.as_object().cloned().unwrap_or_default() {
                for (status, response) in operation["responses"]
                    .as_object()
                    .cloned()
                    .unwrap_or_default()
                {
                    if !status.starts_with('4') && !status.starts_with('5') {
                        continue;
                    }
                    let json = &response["content"]["application/json"]["schema"]["$ref"];
                    assert_eq!(
                        json, "#/components/schemas/ErrorBody",
                        "{method} {path} {status}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_event_kind_is_a_webhook() {
        let document = json();
        for (kind, data, _) in KINDS {
            let schema = &document["webhooks"][*kind]["post"]["requestBody"]["content"]["application/json"]
                ["schema"];
            assert_eq!(schema["properties"]["type"]["enum"][0], *kind);
            assert_eq!(
                schema["properties"]["data"]["$ref"],
                format!("#/components/schemas/{data}")
            );
        }
    }
}
