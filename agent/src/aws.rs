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
use scalez::store::retry::RetryPolicy;

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

/// What went wrong with one attempt, and whether another may succeed: the classification
/// shared with the S3 store ([`scalez::aws_error`]).
pub use scalez::aws_error::AwsFailure as Failure;

/// Classifies an SDK error of any EC2 or EBS operation.
pub fn classify<E>(err: SdkError<E>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    scalez::aws_error::classify(&err, &[])
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
pub const RETRY: RetryPolicy = RetryPolicy {
    max_attempts: 10,
    base: Duration::from_millis(100),
    cap: Duration::from_secs(10),
};

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
                if !fail.retryable || attempt >= RETRY.max_attempts {
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
                tokio::time::sleep(RETRY.delay(attempt)).await;
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
                        throttled: true,
                        ..Failure::transient("slow down".into())
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
                        ..Failure::fatal("bad token".into())
                    })
                },
            ))
            .unwrap_err();
        assert_eq!(stats.get(), (1, 0, 0));
        assert!(err.to_string().contains("snap-1"), "{err}");
    }
}

/// This instance's id and region, from the instance metadata service (IMDSv2, token first; the
/// endpoint from `AWS_EC2_METADATA_SERVICE_ENDPOINT` when set): `ec2 backup --self`.
pub fn imds_identity() -> Result<(String, String), AgentError> {
    let err = |what: &str, e: &dyn std::fmt::Display| AgentError::Aws {
        what: format!("instance metadata {what}"),
        code: None,
        reason: format!("{e} (is this an EC2 instance with IMDS enabled?)"),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| err("runtime", &e))?;
    rt.block_on(async {
        let c = aws_config::imds::Client::builder()
            .max_attempts(2)
            .connect_timeout(std::time::Duration::from_secs(2))
            .build();
        let get = |path: &'static str| {
            let c = c.clone();
            async move {
                c.get(path)
                    .await
                    .map(|v| v.as_ref().trim().to_string())
                    .map_err(|e| err(path, &e))
            }
        };
        let id = get("/latest/meta-data/instance-id").await?;
        let region = get("/latest/meta-data/placement/region").await?;
        if !id.starts_with("i-") || region.is_empty() {
            return Err(err(
                "",
                &format!("unexpected instance id {id:?} or region {region:?}"),
            ));
        }
        Ok((id, region))
    })
}

/// Where sysfs is: `/sys`, or `$ELASTIO_SYSFS` (tests give a tree of their own) when that
/// is a directory owned by root and writable by root only: a forged tree could move a
/// partition's offset and so lay free space over data.
pub fn sys_root() -> std::path::PathBuf {
    use std::os::unix::fs::MetadataExt;
    let Some(p) = std::env::var_os("ELASTIO_SYSFS").map(std::path::PathBuf::from) else {
        return "/sys".into();
    };
    match std::fs::symlink_metadata(&p) {
        Ok(md) if md.is_dir() && md.uid() == 0 && md.mode() & 0o022 == 0 => p,
        _ => {
            let e = format!(
                "ELASTIO_SYSFS={} ignored: not a directory owned by root and writable by root \
                 only",
                p.display()
            );
            tracing::warn!("{e}");
            eprintln!("warning: {e}");
            "/sys".into()
        }
    }
}

/// The EBS volume id of an NVMe block device (or one of its partitions) on a Nitro instance,
/// from the serial number the device reports (`vol0123…` → `vol-0123…`), read under `sys`
/// (normally `/sys`).
pub fn volume_of_device(
    device: &std::path::Path,
    sys: &std::path::Path,
) -> Result<String, AgentError> {
    let fail = |why: String| AgentError::Ebs(format!("{}: {why}", device.display()));
    let real = std::fs::canonicalize(device).map_err(|e| fail(e.to_string()))?;
    let name = real
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| fail("not a device path".into()))?;
    let class = sys.join("class/block").join(name);
    // A partition's own directory has no device/; its disk's has.
    let serial = std::fs::read_to_string(class.join("device/serial"))
        .or_else(|_| std::fs::read_to_string(class.join("../device/serial")))
        .map_err(|_| fail("no NVMe serial number: not an EBS volume of a Nitro instance".into()))?;
    volume_of_serial(&serial).map_err(fail)
}

fn volume_of_serial(serial: &str) -> Result<String, String> {
    let serial = serial.trim();
    let hex = serial
        .strip_prefix("vol")
        .map(|h| h.strip_prefix('-').unwrap_or(h));
    match hex {
        Some(hex) if !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit()) => {
            Ok(format!("vol-{hex}"))
        }
        _ => Err(format!("serial {serial:?} is not an EBS volume id")),
    }
}

/// Where a block device lies on an EBS volume of this instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeExtent {
    pub volume_id: String,
    /// The device's name (`nvme1n1p2`).
    pub name: String,
    /// Its first byte on the volume (a partition's start; 0 for the whole disk).
    pub start: u64,
    pub len: u64,
}

/// The EBS volume and byte range of block device `dev` (a `st_dev`, as a mounted file system
/// reports it), from sysfs under `sys`: a whole NVMe disk, or a partition of one.
pub fn volume_extent(dev: u64, sys: &std::path::Path) -> Result<VolumeExtent, AgentError> {
    let (major, minor) = crate::fsmap::major_minor(dev);
    let fail = |why: String| AgentError::Ebs(format!("device {major}:{minor}: {why}"));
    let link = sys.join(format!("dev/block/{major}:{minor}"));
    let dir = std::fs::canonicalize(&link)
        .map_err(|e| fail(format!("not a block device in {}: {e}", sys.display())))?;
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let number = |file: &std::path::Path| -> Result<u64, AgentError> {
        let text =
            std::fs::read_to_string(file).map_err(|e| fail(format!("{}: {e}", file.display())))?;
        text.trim()
            .parse::<u64>()
            .ok()
            .and_then(|sectors| sectors.checked_mul(512))
            .ok_or_else(|| {
                fail(format!(
                    "{}: {:?} is not a sector count",
                    file.display(),
                    text
                ))
            })
    };
    let len = number(&dir.join("size"))?;
    let (disk, start) = if dir.join("partition").exists() {
        let disk = dir
            .parent()
            .ok_or_else(|| fail("a partition without a disk".into()))?;
        (disk.to_path_buf(), number(&dir.join("start"))?)
    } else {
        (dir.clone(), 0)
    };
    let serial = std::fs::read_to_string(disk.join("device/serial")).map_err(|_| {
        fail(format!(
            "{name}: no NVMe serial number: not an EBS volume of a Nitro instance"
        ))
    })?;
    let volume_id = volume_of_serial(&serial).map_err(|e| fail(format!("{name}: {e}")))?;
    start
        .checked_add(len)
        .ok_or_else(|| fail("its extent overflows".into()))?;
    Ok(VolumeExtent {
        volume_id,
        name,
        start,
        len,
    })
}

#[cfg(test)]
mod device_tests {
    use super::*;

    #[test]
    fn nvme_serials_name_volumes() {
        let sys = tempfile::tempdir().unwrap();
        let dev = tempfile::tempdir().unwrap();
        let disk = sys.path().join("class/block/nvme1n1");
        std::fs::create_dir_all(disk.join("device")).unwrap();
        std::fs::write(disk.join("device/serial"), "vol0123456789abcdef0 \n").unwrap();
        std::fs::create_dir_all(disk.join("nvme1n1p1")).unwrap();
        std::os::unix::fs::symlink(
            disk.join("nvme1n1p1"),
            sys.path().join("class/block/nvme1n1p1"),
        )
        .unwrap();
        let other = sys.path().join("class/block/nvme0n1/device");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("serial"), "AWS1234\n").unwrap();
        for n in ["nvme1n1", "nvme1n1p1", "nvme0n1", "loop0"] {
            std::fs::write(dev.path().join(n), "").unwrap();
        }
        let of = |n: &str| volume_of_device(&dev.path().join(n), sys.path());
        assert_eq!(of("nvme1n1").unwrap(), "vol-0123456789abcdef0");
        assert_eq!(of("nvme1n1p1").unwrap(), "vol-0123456789abcdef0");
        assert!(of("nvme0n1")
            .unwrap_err()
            .to_string()
            .contains("not an EBS volume id"));
        assert!(of("loop0")
            .unwrap_err()
            .to_string()
            .contains("no NVMe serial"));
    }

    #[test]
    fn device_numbers_lead_to_volumes_and_partition_offsets() {
        let sys = tempfile::tempdir().unwrap();
        let disk = sys.path().join("devices/pci0000:00/nvme/nvme1/nvme1n1");
        std::fs::create_dir_all(disk.join("device")).unwrap();
        std::fs::write(disk.join("device/serial"), "vol0abc\n").unwrap();
        std::fs::write(disk.join("size"), "16777216\n").unwrap();
        let part = disk.join("nvme1n1p2");
        std::fs::create_dir_all(&part).unwrap();
        std::fs::write(part.join("partition"), "2\n").unwrap();
        std::fs::write(part.join("start"), "2048\n").unwrap();
        std::fs::write(part.join("size"), "4096\n").unwrap();
        let loop0 = sys.path().join("devices/virtual/block/loop0");
        std::fs::create_dir_all(&loop0).unwrap();
        std::fs::write(loop0.join("size"), "8\n").unwrap();
        let links = sys.path().join("dev/block");
        std::fs::create_dir_all(&links).unwrap();
        std::os::unix::fs::symlink(&disk, links.join("259:0")).unwrap();
        std::os::unix::fs::symlink(&part, links.join("259:2")).unwrap();
        std::os::unix::fs::symlink(&loop0, links.join("7:0")).unwrap();
        let of = |maj: u64, min: u64| volume_extent((maj << 8) | min, sys.path());
        let whole = of(259, 0).unwrap();
        assert_eq!(
            (whole.volume_id.as_str(), whole.start, whole.len),
            ("vol-0abc", 0, 16777216 * 512)
        );
        let p = of(259, 2).unwrap();
        assert_eq!(
            (p.volume_id.as_str(), p.name.as_str(), p.start, p.len),
            ("vol-0abc", "nvme1n1p2", 2048 * 512, 4096 * 512)
        );
        assert!(of(7, 0).unwrap_err().to_string().contains("no NVMe serial"));
        assert!(of(8, 1)
            .unwrap_err()
            .to_string()
            .contains("not a block device"));
    }
}
