//! One classification of AWS SDK errors for every service elastio calls (S3 here; EBS and EC2 in
//! the agent): what failed, and whether another attempt may succeed. Retrying itself (backoff
//! with full jitter) is [`crate::store::retry::RetryPolicy`], also shared.
//!
//! Retryable: throttling (HTTP 429 or a throttling code), server errors (HTTP 5xx but 501, or a
//! transient code), timeouts, connection failures and unparseable responses. Everything else (access
//! denied, not found, validation) is final: retrying cannot fix it and would only delay the error.

use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

/// Error codes that mean "slow down".
const THROTTLE_CODES: &[&str] = &[
    "RequestThrottledException",
    "ThrottlingException",
    "Throttling",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "SlowDown",
];

/// Error codes of failures a later attempt may not meet.
const TRANSIENT_CODES: &[&str] = &[
    "InternalServerException",
    "InternalError",
    "ServiceUnavailable",
    "Unavailable",
    "RequestTimeout",
];

/// What went wrong with one attempt.
#[derive(Debug, Clone)]
pub struct AwsFailure {
    /// The HTTP status, when a response came back.
    pub status: Option<u16>,
    /// The service's error code (`NoSuchKey`, `ValidationException`, ...).
    pub code: Option<String>,
    /// A one-line description: code, status and the service's message, or the transport error.
    pub reason: String,
    pub retryable: bool,
    pub throttled: bool,
}

impl AwsFailure {
    /// A failure no other attempt can fix.
    pub fn fatal(reason: String) -> AwsFailure {
        AwsFailure {
            retryable: false,
            ..AwsFailure::transient(reason)
        }
    }

    /// A failure another attempt may not meet (a timeout, a dropped connection).
    pub fn transient(reason: String) -> AwsFailure {
        AwsFailure {
            status: None,
            code: None,
            reason,
            retryable: true,
            throttled: false,
        }
    }
}

/// Classifies `err`; `also_retry`: error codes this service documents as transient on top of
/// the common ones (S3's `ConditionalRequestConflict`, say).
pub fn classify<E>(err: &SdkError<E, HttpResponse>, also_retry: &[&str]) -> AwsFailure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match err {
        SdkError::ServiceError(se) => {
            let code = se.err().code().map(str::to_string);
            let status = se.raw().status().as_u16();
            let is = |codes: &[&str]| code.as_deref().is_some_and(|c| codes.contains(&c));
            let throttled = is(THROTTLE_CODES) || status == 429;
            // 501: the service does not implement the request at all; asking again cannot help.
            let transient =
                is(TRANSIENT_CODES) || is(also_retry) || (status >= 500 && status != 501);
            let msg = se.err().message().unwrap_or("no message");
            AwsFailure {
                reason: format!(
                    "{} (HTTP {status}): {msg}",
                    code.as_deref().unwrap_or("error")
                ),
                status: Some(status),
                code,
                retryable: throttled || transient,
                throttled,
            }
        }
        SdkError::TimeoutError(_) => AwsFailure::transient("request timed out".into()),
        SdkError::DispatchFailure(d) => AwsFailure {
            retryable: d.is_io() || d.is_timeout() || !d.is_user(),
            ..AwsFailure::transient(format!("cannot reach the endpoint: {}", source_chain(err)))
        },
        SdkError::ResponseError(re) => AwsFailure {
            status: Some(re.raw().status().as_u16()),
            ..AwsFailure::transient(format!("bad response: {}", source_chain(err)))
        },
        _ => AwsFailure::fatal(source_chain(err)),
    }
}

/// An error and its causes on one line.
pub fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
