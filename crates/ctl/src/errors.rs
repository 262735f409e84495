//! How `emberctl` reports a failed command: the agent's own message first and
//! the gRPC code's name after it (`emberctl: volume ok is 1048576 bytes; …
//! (FAILED_PRECONDITION)`), or with `--json` one object
//! `{"code": "FAILED_PRECONDITION", "message": "…"}`. Both go to stderr, so
//! stdout only ever carries results. Nothing here decides exit codes.

use serde_json::json;
use tonic::Code;

/// The canonical gRPC name of `code` (as in grpc's `status.proto` and
/// every other gRPC tool), which is what operators search for.
pub(crate) fn code_name(code: Code) -> &'static str {
    // Exhaustive on purpose: a new code must get its name here.
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A failed command, reduced to what is shown: the message (our context,
/// then the agent's words) and, when the agent answered, its code.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Failure {
    /// `None` when the failure happened in emberctl itself (bad arguments,
    /// agent unreachable before any call).
    pub(crate) code: Option<&'static str>,
    /// Context first, then the cause, joined by `: `.
    pub(crate) message: String,
}

/// Walks the error chain: a [`tonic::Status`] contributes its message (not
/// tonic's debug rendering) and its code; everything else its `Display`.
/// A part already contained in the previous one is dropped, since transport
/// errors often repeat their source.
pub(crate) fn failure(e: &anyhow::Error) -> Failure {
    let mut code = None;
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = match cause.downcast_ref::<tonic::Status>() {
            Some(status) => {
                code.get_or_insert(code_name(status.code()));
                if status.message().is_empty() {
                    status.code().description().to_owned()
                } else {
                    status.message().to_owned()
                }
            }
            None => cause.to_string(),
        };
        if text.is_empty() || parts.last().is_some_and(|p| p.contains(&text)) {
            continue;
        }
        parts.push(text);
    }
    Failure {
        code,
        message: parts.join(": "),
    }
}

/// The text printed on stderr for `e` (without a trailing newline).
pub(crate) fn render(e: &anyhow::Error, json: bool) -> String {
    let f = failure(e);
    if json {
        return json!({ "code": f.code, "message": f.message }).to_string();
    }
    match f.code {
        Some(code) => format!("emberctl: {} ({code})", f.message),
        None => format!("emberctl: {}", f.message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_errors_print_the_message_then_the_code_name() {
        let shrink =
            "volume ok is 1048576 bytes; shrinking to 524288 would lose data and is not supported";
        let cases: Vec<(anyhow::Error, bool, String)> = vec![
            (
                tonic::Status::failed_precondition(shrink).into(),
                false,
                format!("emberctl: {shrink} (FAILED_PRECONDITION)"),
            ),
            (
                tonic::Status::not_found("volume nope not found").into(),
                false,
                "emberctl: volume nope not found (NOT_FOUND)".into(),
            ),
            // Our context comes first, the agent's reason after it.
            (
                anyhow::Error::from(tonic::Status::resource_exhausted("no space left"))
                    .context("snapshot big@s"),
                false,
                "emberctl: snapshot big@s: no space left (RESOURCE_EXHAUSTED)".into(),
            ),
            // An empty message falls back to the code's description.
            (
                tonic::Status::new(Code::Unavailable, "").into(),
                false,
                "emberctl: The service is currently unavailable (UNAVAILABLE)".into(),
            ),
            // Errors of emberctl itself have no code.
            (
                anyhow::anyhow!("--size is required for an empty volume"),
                false,
                "emberctl: --size is required for an empty volume".into(),
            ),
            (
                tonic::Status::invalid_argument("bad \"name\"").into(),
                true,
                r#"{"code":"INVALID_ARGUMENT","message":"bad \"name\""}"#.into(),
            ),
            (
                anyhow::anyhow!("cannot reach the agent"),
                true,
                r#"{"code":null,"message":"cannot reach the agent"}"#.into(),
            ),
        ];
        for (e, json, want) in cases {
            assert_eq!(render(&e, json), want);
        }
    }

    #[test]
    fn repeated_causes_are_printed_once() {
        let io = std::io::Error::other("connection refused");
        let e = anyhow::Error::from(io)
            .context("connection refused")
            .context("cannot reach the agent at unix:/x");
        assert_eq!(
            failure(&e),
            Failure {
                code: None,
                message: "cannot reach the agent at unix:/x: connection refused".into(),
            }
        );
    }

    #[test]
    fn every_code_has_its_grpc_name() {
        for (n, want) in [
            (0, "OK"),
            (3, "INVALID_ARGUMENT"),
            (5, "NOT_FOUND"),
            (6, "ALREADY_EXISTS"),
            (8, "RESOURCE_EXHAUSTED"),
            (9, "FAILED_PRECONDITION"),
            (10, "ABORTED"),
            (14, "UNAVAILABLE"),
            (16, "UNAUTHENTICATED"),
        ] {
            assert_eq!(code_name(Code::from_i32(n)), want);
        }
    }
}
