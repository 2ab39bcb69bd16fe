//! The API's one error type: every failure is a JSON body
//! `{"error": {"code", "message", ...}}` with the status its code implies
//! (I11). Server-side failures are logged once here and answered opaquely.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use baton_core::{PermissionStatus, TurnId};
use baton_store::StoreError;
use serde::Serialize;
use utoipa::ToSchema;

/// An API error.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub turn_id: Option<TurnId>,
    /// With `permission_closed`: the request's state.
    pub permission: Option<Box<PermissionStatus>>,
}

/// The error body.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// `invalid_request`, `unauthorized`, `not_found`, `method_not_allowed`,
    /// `request_timeout`, `session_busy`, `idempotency_conflict`,
    /// `permission_closed`, `payload_too_large`, `header_too_large`,
    /// `uri_too_long`, `too_many_connections`, `queue_full`, `unavailable` or
    /// `internal`.
    pub code: &'static str,
    pub message: String,
    /// With `session_busy`: the running turn.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub turn_id: Option<TurnId>,
    /// With `permission_closed`: the request's state and the decision that
    /// holds (which option, who decided, its entry's seq).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub permission: Option<Box<PermissionStatus>>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            turn_id: None,
            permission: None,
        }
    }

    /// `400 invalid_request`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// `401 unauthorized`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// `404 not_found`: the same for a missing session and another owner's.
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such session")
    }

    /// `408 request_timeout`: the body did not arrive in time.
    pub fn body_timeout(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within {} ms",
                limit.as_millis()
            ),
        )
    }

    /// `503 unavailable`: the server is shutting down.
    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the server is shutting down; retry on another node or later",
        )
    }

    /// `413 payload_too_large`.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body exceeds {limit} bytes"),
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => Self::not_found(),
            StoreError::SessionBusy { turn_id } => Self {
                turn_id: Some(turn_id),
                ..Self::new(
                    StatusCode::CONFLICT,
                    "session_busy",
                    format!("turn {turn_id} is running and the policy is reject"),
                )
            },
            StoreError::IdempotencyConflict => Self::new(
                StatusCode::CONFLICT,
                "idempotency_conflict",
                "this Idempotency-Key was already used with a different request",
            ),
            StoreError::QueueFull { capacity } => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "queue_full",
                format!(
                    "the session already has {capacity} {} waiting",
                    if capacity == 1 { "message" } else { "messages" }
                ),
            ),
            StoreError::Unavailable(why) => {
                tracing::warn!(error = %why, "store unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the store is unavailable; retry later",
                )
            }
            StoreError::PermissionNotFound { request_id } => Self::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no permission request {request_id:?} in this session"),
            ),
            StoreError::UnknownOption {
                request_id,
                option_id,
            } => Self::invalid(format!(
                "permission request {request_id:?} offers no option {option_id:?}"
            )),
            StoreError::PermissionClosed(status) => {
                let message = match (&status.option_id, &status.decided_by) {
                    (Some(option), Some(by)) => format!(
                        "permission request {:?} was already answered: {option:?} by {by}",
                        status.request_id
                    ),
                    (None, Some(by)) => format!(
                        "permission request {:?} was already closed as cancelled by {by}",
                        status.request_id
                    ),
                    _ => format!(
                        "permission request {:?} can no longer be answered",
                        status.request_id
                    ),
                };
                Self {
                    permission: Some(status),
                    ..Self::new(StatusCode::CONFLICT, "permission_closed", message)
                }
            }
            e @ (StoreError::StaleEpoch { .. }
            | StoreError::TurnNotActive { .. }
            | StoreError::InvariantBreach { .. }
            | StoreError::Internal(_)) => {
                tracing::error!(error = %e, "internal error");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
                turn_id: self.turn_id,
                permission: self.permission,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// A handler result.
pub type ApiResult<T> = Result<T, ApiError>;
