//! AWS clients (EC2 and the EBS direct APIs) and the call discipline every AWS request follows:
//! a request rate limit, a per-attempt timeout, and retries with exponential backoff and full
//! jitter on throttling, 5xx, timeouts and connection errors. The SDK's own retries are off so
//! every attempt is counted here and reported in summaries.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region};
use aws_sdk_ebs::error::{ProvideErrorMetadata, SdkError};

use crate::error::AgentError;

/// Where and how to reach AWS. Unset fields come from the standard chain (environment, profile,
/// SSO, IMDS on EC2, web identity).
#[derive(Debug, Clone)]
pub struct AwsConfig {
    pub region: Option<String>,
    /// An endpoint for every service (an emulator); `AWS_ENDPOINT_URL` works too.
    pub endpoint_url: Option<String>,
    pub attempt_timeout: Duration,
}

impl Default for AwsConfig {
    fn default() -> Self {
        AwsConfig {
            region: None,
            endpoint_url: None,
            attempt_timeout: Duration::from_secs(30),
        }
    }
}

/// Error codes AWS uses for "slow down" across EC2 and EBS.
const THROTTLE_CODES: &[&str] = &[
    "RequestThrottledException",
    "ThrottlingException",
    "Throttling",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "SlowDown",
];
const TRANSIENT_CODES: &[&str] = &[
    "InternalServerException",
    "InternalError",
    "ServiceUnavailable",
    "Unavailable",
];

/// What went wrong with one attempt, and whether another attempt may succeed.
#[derive(Debug, Clone)]
pub struct Failure {
    pub code: Option<String>,
    pub reason: String,
    pub retryable: bool,
    pub throttled: bool,
}

impl Failure {
    pub fn transient(reason: String) -> Failure {
        Failure {
            code: None,
            reason,
            retryable: true,
            throttled: false,
        }
    }
}

/// Classifies an SDK error of any EC2 or EBS operation.
pub fn classify<E>(err: SdkError<E>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        SdkError::ServiceError(se) => {
            let code = se.err().code().map(str::to_string);
            let status = se.raw().status().as_u16();
            let throttled =
                code.as_deref().is_some_and(|c| THROTTLE_CODES.contains(&c)) || status == 429;
            let transient = code
                .as_deref()
                .is_some_and(|c| TRANSIENT_CODES.contains(&c))
                || status >= 500;
            let msg = se.err().message().unwrap_or("no message");
            Failure {
                reason: format!(
                    "{} (HTTP {status}): {msg}",
                    code.as_deref().unwrap_or("error")
                ),
                code,
                retryable: throttled || transient,
                throttled,
            }
        }
        SdkError::TimeoutError(_) => Failure::transient("request timed out".into()),
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Failure::transient(format!("{}", aws_sdk_ebs::error::DisplayErrorContext(&err)))
        }
        _ => Failure {
            code: None,
            reason: format!("{}", aws_sdk_ebs::error::DisplayErrorContext(&err)),
            retryable: false,
            throttled: false,
        },
    }
}

/// Spaces requests at least `1 / rate` apart (no bursts above the rate).
pub struct RateLimiter {
    interval: Duration,
    next: Mutex<Instant>,
}

impl RateLimiter {
    pub fn new(per_second: f64) -> RateLimiter {
        RateLimiter {
            interval: Duration::from_secs_f64(1.0 / per_second.max(0.001)),
            next: Mutex::new(Instant::now()),
        }
    }

    pub async fn acquire(&self) {
        let at = {
            let mut next = self.next.lock().unwrap();
            let at = (*next).max(Instant::now());
            *next = at + self.interval;
            at
        };
        tokio::time::sleep_until(at.into()).await;
    }
}

/// Counters of one operation's AWS calls.
#[derive(Debug, Default)]
pub struct CallStats {
    pub calls: AtomicU64,
    pub retries: AtomicU64,
    pub throttled: AtomicU64,
}

impl CallStats {
    pub fn get(&self) -> (u64, u64, u64) {
        (
            self.calls.load(Ordering::Relaxed),
            self.retries.load(Ordering::Relaxed),
            self.throttled.load(Ordering::Relaxed),
        )
    }
}

/// Retries of one call: 10 attempts, backoff 100 ms doubling to 10 s, full jitter.
pub const ATTEMPTS: u32 = 10;
const BASE: Duration = Duration::from_millis(100);
const CAP: Duration = Duration::from_secs(10);

pub fn backoff(attempt: u32) -> Duration {
    let ceiling = BASE.saturating_mul(1 << attempt.min(16)).min(CAP);
    ceiling.mul_f64(rand::random::<f64>())
}

/// Runs `f` until it succeeds, fails for good or runs out of attempts; each attempt waits for
/// the rate limiter. `what` names the operation and object in the error.
pub async fn call<T, F, Fut>(
    stats: &CallStats,
    limiter: Option<&RateLimiter>,
    what: &(dyn Fn() -> String + Sync),
    mut f: F,
) -> Result<T, AgentError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    let mut attempt = 0;
    loop {
        if let Some(l) = limiter {
            l.acquire().await;
        }
        stats.calls.fetch_add(1, Ordering::Relaxed);
        match f().await {
            Ok(v) => return Ok(v),
            Err(fail) => {
                if fail.throttled {
                    stats.throttled.fetch_add(1, Ordering::Relaxed);
                }
                attempt += 1;
                if !fail.retryable || attempt >= ATTEMPTS {
                    return Err(AgentError::Aws {
                        what: what(),
                        code: fail.code,
                        reason: if fail.retryable {
                            format!("{} (gave up after {attempt} attempts)", fail.reason)
                        } else {
                            fail.reason
                        },
                    });
                }
                stats.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff(attempt)).await;
            }
        }
    }
}

/// EC2 and EBS clients with their own small runtime.
pub struct Aws {
    pub rt: tokio::runtime::Runtime,
    pub ec2: aws_sdk_ec2::Client,
    pub ebs: aws_sdk_ebs::Client,
    pub region: String,
}

impl Aws {
    pub fn connect(cfg: &AwsConfig) -> Result<Aws, AgentError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("elastio-aws")
            .enable_all()
            .build()
            .map_err(|e| AgentError::Engine(format!("cannot start the AWS runtime: {e}")))?;
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(r) = &cfg.region {
            loader = loader.region(Region::new(r.clone()));
        }
        if let Some(e) = cfg.endpoint_url.as_ref().filter(|e| !e.is_empty()) {
            loader = loader.endpoint_url(e);
        }
        let sdk = rt.block_on(loader.load());
        let region = sdk
            .region()
            .map(|r| r.to_string())
            .ok_or_else(|| AgentError::Aws {
                what: "AWS configuration".into(),
                code: None,
                reason: "no region: pass --region or set AWS_REGION".into(),
            })?;
        let timeouts = aws_sdk_ebs::config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .operation_attempt_timeout(cfg.attempt_timeout)
            .build();
        let ebs = aws_sdk_ebs::config::Builder::from(&sdk)
            .retry_config(aws_sdk_ebs::config::retry::RetryConfig::disabled())
            .timeout_config(timeouts.clone())
            .build();
        let ec2 = aws_sdk_ec2::config::Builder::from(&sdk)
            .retry_config(aws_sdk_ec2::config::retry::RetryConfig::disabled())
            .timeout_config(timeouts)
            .build();
        Ok(Aws {
            rt,
            ec2: aws_sdk_ec2::Client::from_conf(ec2),
            ebs: aws_sdk_ebs::Client::from_conf(ebs),
            region,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_under_its_cap() {
        for attempt in 0..40 {
            let d = backoff(attempt);
            assert!(d <= CAP, "attempt {attempt}: {d:?}");
            assert!(d <= BASE * (1 << attempt.min(16)));
        }
    }

    #[test]
    fn rate_limiter_spaces_requests() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let limiter = RateLimiter::new(200.0);
        let started = Instant::now();
        rt.block_on(async {
            for _ in 0..21 {
                limiter.acquire().await;
            }
        });
        // 21 requests at 200/s span at least 20 intervals of 5 ms.
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[test]
    fn call_retries_transient_failures_and_stops_on_permanent_ones() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let stats = CallStats::default();
        let mut n = 0;
        let got = rt.block_on(call(&stats, None, &|| "op".into(), || {
            n += 1;
            let fail = n < 3;
            async move {
                if fail {
                    Err(Failure {
                        code: Some("RequestThrottledException".into()),
                        reason: "slow down".into(),
                        retryable: true,
                        throttled: true,
                    })
                } else {
                    Ok(7)
                }
            }
        }));
        assert_eq!(got.unwrap(), 7);
        assert_eq!(stats.get(), (3, 2, 2));

        let stats = CallStats::default();
        let err = rt
            .block_on(call(
                &stats,
                None,
                &|| "GetSnapshotBlock of snap-1".into(),
                || async {
                    Err::<(), _>(Failure {
                        code: Some("ValidationException".into()),
                        reason: "bad token".into(),
                        retryable: false,
                        throttled: false,
                    })
                },
            ))
            .unwrap_err();
        assert_eq!(stats.get(), (1, 0, 0));
        assert!(err.to_string().contains("snap-1"), "{err}");
    }
}
