//! The four SSO-OIDC operations: `RegisterClient`, `StartDeviceAuthorization`,
//! `CreateToken` and `CreateTokenWithIAM` (behind a SigV4 check), with fault
//! injection in front of them.

use std::time::{Instant, SystemTime};

use axum::{body::Body, response::Response};
use http::{StatusCode, request::Parts};
use serde::de::DeserializeOwned;

use crate::oidc::{
    CreateTokenRequest, CreateTokenWithIamRequest, Operation, RegisterClientRequest,
    ServiceErrorKind, StartDeviceAuthorizationRequest,
};

use super::{
    Shared,
    fault::Fault,
    iam, sigv4,
    state::ApiError,
    wire::{self, BodyError},
};

/// Largest operation request body accepted.
const OPERATION_BODY_LIMIT: usize = 1024 * 1024;

/// Handles one call of `op`: reads the body, checks the SigV4 signature of a
/// signed operation, plays a scripted fault if there is one, else answers as
/// the service would.
pub(crate) async fn handle(shared: &Shared, op: Operation, parts: &Parts, body: Body) -> Response {
    let body = wire::read_body(body, OPERATION_BODY_LIMIT).await;

    let fault = {
        let mut state = shared.lock();
        state.counters.count_operation(op);
        if op == Operation::CreateTokenWithIam {
            // Authentication comes first: an unsigned or badly signed call
            // never reaches the operation (nor its faults).
            let bytes = body.as_deref().unwrap_or_default();
            if let Err(rejection) =
                sigv4::verify(parts, bytes, &state.iam.credentials, SystemTime::now())
            {
                state.counters.count_error(rejection.label());
                drop(state);
                tracing::debug!(
                    operation = op.as_str(),
                    error_type = rejection.error_type,
                    "emulator: SigV4 check failed"
                );
                return wire::signature_error(&rejection);
            }
        }
        let fault = state.take_fault(op);
        if let Some(label) = fault.and_then(Fault::error_label) {
            state.counters.count_error(label);
        }
        fault
    };
    match fault {
        Some(Fault::Delay(d)) => {
            tracing::debug!(
                operation = op.as_str(),
                delay_ms = d.as_millis(),
                "emulator: injected delay"
            );
            tokio::time::sleep(d).await;
        }
        Some(fault) => {
            tracing::debug!(operation = op.as_str(), %fault, "emulator: injected fault");
            return wire::fault_response(fault);
        }
        None => {}
    }

    let outcome = match body {
        Ok(bytes) => answer(shared, op, &bytes),
        Err(BodyError::TooLarge) => Err(ApiError::new(
            ServiceErrorKind::InvalidRequest,
            "Request body is too large",
        )),
        Err(BodyError::Broken) => Err(ApiError::new(
            ServiceErrorKind::InvalidRequest,
            "Request body could not be read",
        )),
    };
    match outcome {
        Ok(resp) => {
            tracing::debug!(operation = op.as_str(), "emulator: success");
            resp
        }
        Err(e) => {
            tracing::debug!(
                operation = op.as_str(),
                kind = e.kind.name(),
                "emulator: error answer"
            );
            shared.lock().counters.count_error(e.kind.name());
            wire::service_error(&e)
        }
    }
}

fn answer(shared: &Shared, op: Operation, body: &[u8]) -> Result<Response, ApiError> {
    let now = Instant::now();
    match op {
        Operation::CreateToken => {
            let req: CreateTokenRequest = parse(body)?;
            tracing::debug!(operation = op.as_str(), grant_type = %req.grant_type, "emulator: CreateToken");
            let resp = shared.lock().create_token(req, now, &shared.base_url)?;
            Ok(wire::json(StatusCode::OK, &resp))
        }
        Operation::CreateTokenWithIam => {
            let req: CreateTokenWithIamRequest = parse(body)?;
            tracing::debug!(operation = op.as_str(), grant_type = %req.grant_type, "emulator: CreateTokenWithIAM");
            let resp = iam::create_token_with_iam(&mut shared.lock(), req, now, &shared.base_url)?;
            Ok(wire::json(StatusCode::OK, &resp))
        }
        Operation::RegisterClient => {
            let req: RegisterClientRequest = parse(body)?;
            let resp = shared.lock().register_client(req)?;
            Ok(wire::json(StatusCode::OK, &resp))
        }
        Operation::StartDeviceAuthorization => {
            let req: StartDeviceAuthorizationRequest = parse(body)?;
            let resp = shared
                .lock()
                .start_device_authorization(req, now, &shared.base_url)?;
            Ok(wire::json(StatusCode::OK, &resp))
        }
    }
}

/// Decodes a request body; anything wrong with it is `InvalidRequest`. The
/// description names a missing member but never echoes a value.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let message = e.to_string();
        let description = if e.is_data() && message.starts_with("missing field") {
            let member = message.split('`').nth(1).unwrap_or("?");
            format!("Missing required member: {member}")
        } else if e.is_data() {
            "A request member has an invalid type or value".to_owned()
        } else {
            "Request body is not a valid JSON document".to_owned()
        };
        ApiError::new(ServiceErrorKind::InvalidRequest, description)
    })
}
