//! The CRM's directory: contacts per location, one at a time or in bulk.

use axum::{Json, extract::State, http::StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{
    AppState,
    error::ErrorBody,
    error::{ApiError, ApiJson, ApiPath, check_email, check_id},
};
use crate::{model::Contact, store::ContactUpsert};

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContactBody {
    /// Required in a bulk upload; in a PUT, the path's id (if given, equal to it).
    #[serde(default)]
    id: Option<String>,
    /// The first is the contact's main address.
    #[schema(min_items = 1, example = json!(["ann@example.com"]))]
    emails: Vec<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    assigned_user_ids: Vec<String>,
    /// Defaults to now; decides R10.
    #[serde(default)]
    created_at: Option<DateTime<Utc>>,
}

/// How many contacts a bulk upload stored.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Upserted {
    upserted: usize,
}

fn contact_from(
    location_id: &str,
    id: String,
    body: ContactBody,
    field: &str,
) -> Result<ContactUpsert, ApiError> {
    check_id(&format!("{field}id"), &id)?;
    if body.emails.is_empty() {
        return Err(ApiError::invalid(format!(
            "{field}emails must hold at least one address"
        )));
    }
    let mut emails = Vec::with_capacity(body.emails.len());
    for (i, email) in body.emails.iter().enumerate() {
        let email = check_email(&format!("{field}emails[{i}]"), email)?;
        if !emails.contains(&email) {
            emails.push(email);
        }
    }
    for (i, user) in body.assigned_user_ids.iter().enumerate() {
        check_id(&format!("{field}assigned_user_ids[{i}]"), user)?;
    }
    Ok(ContactUpsert {
        created_at_given: body.created_at.is_some(),
        contact: Contact {
            location_id: location_id.to_string(),
            id,
            emails,
            name: body.name.filter(|n| !n.trim().is_empty()),
            assigned_user_ids: body.assigned_user_ids,
            created_at: body.created_at.unwrap_or_else(Utc::now),
        },
    })
}

#[utoipa::path(
    put,
    path = "/locations/{location_id}/contacts/{contact_id}",
    tag = "contacts",
    params(("location_id" = String, Path), ("contact_id" = String, Path)),
    request_body = ContactBody,
    responses((status = 200, description = "The stored contact", body = Contact)),
)]
pub async fn put(
    State(state): State<AppState>,
    ApiPath((location_id, contact_id)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<ContactBody>,
) -> Result<Json<Contact>, ApiError> {
    check_id("location_id", &location_id)?;
    if body.id.as_ref().is_some_and(|id| id != &contact_id) {
        return Err(ApiError::invalid(
            "id in the body differs from the contact id in the path",
        ));
    }
    let upsert = contact_from(&location_id, contact_id, body, "")?;
    let stored = state
        .store
        .put_contacts(std::slice::from_ref(&upsert))?
        .pop()
        .unwrap_or(upsert.contact);
    Ok(Json(stored))
}

#[utoipa::path(
    get,
    path = "/locations/{location_id}/contacts/{contact_id}",
    tag = "contacts",
    params(("location_id" = String, Path), ("contact_id" = String, Path)),
    responses(
        (status = 200, description = "The contact", body = Contact),
        (status = 404, description = "No such contact", body = ErrorBody),
    ),
)]
pub async fn get(
    State(state): State<AppState>,
    ApiPath((location_id, contact_id)): ApiPath<(String, String)>,
) -> Result<Json<Contact>, ApiError> {
    check_id("location_id", &location_id)?;
    check_id("contact_id", &contact_id)?;
    state
        .store
        .contact(&location_id, &contact_id)?
        .map(Json)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no contact {contact_id:?} in location {location_id:?}"
            ))
        })
}

#[utoipa::path(
    delete,
    path = "/locations/{location_id}/contacts/{contact_id}",
    tag = "contacts",
    params(("location_id" = String, Path), ("contact_id" = String, Path)),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such contact", body = ErrorBody),
    ),
)]
pub async fn delete(
    State(state): State<AppState>,
    ApiPath((location_id, contact_id)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    check_id("location_id", &location_id)?;
    check_id("contact_id", &contact_id)?;
    if state.store.delete_contact(&location_id, &contact_id)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!(
            "no contact {contact_id:?} in location {location_id:?}"
        )))
    }
}

#[utoipa::path(
    post,
    path = "/locations/{location_id}/contacts/bulk",
    tag = "contacts",
    params(("location_id" = String, Path)),
    request_body = Vec<ContactBody>,
    responses((status = 200, description = "All were stored", body = Upserted)),
)]
/// Upserts many contacts; all are checked before any is stored.
pub async fn bulk(
    State(state): State<AppState>,
    ApiPath(location_id): ApiPath<String>,
    ApiJson(bodies): ApiJson<Vec<ContactBody>>,
) -> Result<Json<Upserted>, ApiError> {
    check_id("location_id", &location_id)?;
    let mut contacts = Vec::with_capacity(bodies.len());
    for (i, mut body) in bodies.into_iter().enumerate() {
        let Some(id) = body.id.take() else {
            return Err(ApiError::invalid(format!("[{i}].id is missing")));
        };
        contacts.push(contact_from(&location_id, id, body, &format!("[{i}]."))?);
    }
    let count = contacts.len();
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || {
        for chunk in contacts.chunks(5_000) {
            store.put_contacts(chunk)?;
        }
        Ok::<_, crate::store::StoreError>(())
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_unavailable",
            e.to_string(),
        )
    })??;
    Ok(Json(Upserted { upserted: count }))
}
