//! S3 backend: any S3-compatible service (AWS, Ceph RGW, moto, ...) through `aws-sdk-s3`.
//!
//! A vault lives under `s3://bucket/prefix`. Region, credentials and endpoint come from the
//! standard AWS chain (environment, profile, SSO, web identity, IMDS on EC2); an explicit
//! endpoint (`--endpoint-url`, `AWS_ENDPOINT_URL`) switches to path-style addressing, which
//! S3-compatible stores expect.
//!
//! * Create-only puts use `If-None-Match: *` (HTTP 412 = someone else's object). Whether the
//!   server honours it is probed once per process with a scratch object under `locks/`; where it
//!   does not, a HEAD before the PUT stands in (safe for elastio's unique keys, but two writers
//!   racing for one key could both "win" there: the message at open says so).
//! * Objects above [`MULTIPART_THRESHOLD`] go up in parallel parts; smaller ones (every pack, at
//!   16 MiB) in one PUT, so a backup costs about one request per pack.
//! * Checksums are computed only where S3 requires them (`WhenRequired`): Ceph RGW rejects the
//!   SDK's default streaming-trailer uploads. Integrity comes from the vault's AEAD anyway.
//! * Uploads are not payload-signed (`x-amz-content-sha256: UNSIGNED-PAYLOAD`, as S3 clients do
//!   over HTTPS): the signature still covers the headers, and every byte of every object is
//!   sealed with AES-256-GCM, so an altered body fails authentication when read. Signing would
//!   hash each pack twice with SHA-256, here and on the server (RGW spent ~40 % of its CPU on
//!   it during a backup).
//! * The SDK's own retries are off: [`super::retry::RetryStore`] retries every backend the same
//!   way and counts it. Every attempt has a timeout, so a dead endpoint is a retryable error, not
//!   a hang.
//!
//! The trait is synchronous; this store owns a small tokio runtime and blocks on it. Called from
//! inside another runtime, it runs the request on a scoped helper thread instead.

use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use aws_sdk_s3::config::{
    BehaviorVersion, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, ServerSideEncryption};
use aws_sdk_s3::Client;
use bytes::Bytes;

use crate::aws_error::{self, AwsFailure};

use super::lock::{
    is_locked_key, BucketLock, LockMode, LockPolicy, ObjectLockStore, ObjectVersion,
};
use super::{validate_key, ObjectMeta, ObjectStore, PutMode, StoreError, StoreStats};
use aws_sdk_s3::types::ObjectLockMode;
use std::time::SystemTime;

/// Objects larger than this are uploaded in parts.
pub const MULTIPART_THRESHOLD: usize = 64 << 20;
const PART_SIZE: usize = 16 << 20;
/// Packs kept in flight by a backup.
const PUT_PARALLELISM: usize = 4;
/// Reads kept in flight by a restore or a read-ahead.
const READ_PARALLELISM: usize = 8;

/// Where and how to reach the bucket.
#[derive(Debug, Clone, Default)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix inside the bucket (no leading or trailing `/`; may be empty).
    pub prefix: String,
    /// An S3-compatible endpoint (`http://127.0.0.1:7480`); `None` uses AWS's.
    pub endpoint_url: Option<String>,
    /// Overrides the region from the AWS chain (which defaults to `us-east-1` here).
    pub region: Option<String>,
    /// Server-side encryption with this KMS key for every object written.
    pub kms_key_id: Option<String>,
    /// Timeout of one attempt of one request.
    pub attempt_timeout: Option<Duration>,
}

impl S3Config {
    /// Parses `s3://bucket[/prefix]`.
    pub fn from_url(url: &str) -> Result<S3Config, String> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| format!("{url:?} is not an s3:// URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid_bucket {
            return Err(format!(
                "{url:?}: {bucket:?} is not a valid bucket name (3-63 lowercase letters, digits, '-', '.')"
            ));
        }
        let prefix = prefix.trim_matches('/').to_string();
        if !prefix.is_empty() {
            validate_key(&prefix).map_err(|e| format!("{url:?}: prefix: {e}"))?;
        }
        Ok(S3Config {
            bucket: bucket.to_string(),
            prefix,
            ..S3Config::default()
        })
    }

    pub fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

const COND_UNKNOWN: u8 = 0;
const COND_YES: u8 = 1;
const COND_NO: u8 = 2;

#[derive(Debug)]
pub struct S3Store {
    rt: tokio::runtime::Runtime,
    client: Client,
    config: S3Config,
    conditional: AtomicU8,
    requests: AtomicU64,
    /// Object Lock of a locked vault: every locked key is written with it.
    lock: std::sync::RwLock<Option<LockPolicy>>,
}

/// The lock headers of one put: mode and retain-until date.
type LockHeaders = Option<(ObjectLockMode, aws_sdk_s3::primitives::DateTime)>;

/// How a failed request is reported.
type Failure = AwsFailure;

type Response = aws_sdk_s3::config::http::HttpResponse;

/// S3 codes worth another attempt beyond the common ones.
const S3_RETRY_CODES: &[&str] = &["RequestTimeTooSkewed", "ConditionalRequestConflict"];

fn classify<E: ProvideErrorMetadata + std::error::Error + 'static>(
    err: &SdkError<E, Response>,
) -> Failure {
    let mut f = aws_error::classify(err, S3_RETRY_CODES);
    // 409: a conflicting operation on the same object was in progress (conditional writes).
    if f.status == Some(409) {
        f.retryable = true;
    }
    f
}

impl S3Store {
    /// Connects (no request is sent until the first operation).
    pub fn connect(config: S3Config) -> Result<S3Store, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("elastio-s3")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Io {
                store: config.url(),
                key: String::new(),
                source: e,
            })?;
        let endpoint = config
            .endpoint_url
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL_S3").ok())
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
            .filter(|e| !e.is_empty());
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(r) = &config.region {
            loader = loader.region(Region::new(r.clone()));
        }
        if let Some(e) = &endpoint {
            loader = loader.endpoint_url(e);
        }
        let sdk = rt.block_on(loader.load());
        let timeouts = aws_sdk_s3::config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .operation_attempt_timeout(config.attempt_timeout.unwrap_or(Duration::from_secs(60)))
            .build();
        let mut b = aws_sdk_s3::config::Builder::from(&sdk)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
            .timeout_config(timeouts)
            .force_path_style(endpoint.is_some());
        if sdk.region().is_none() {
            b = b.region(Region::new("us-east-1"));
        }
        Ok(S3Store {
            client: Client::from_conf(b.build()),
            rt,
            config: S3Config {
                endpoint_url: endpoint,
                ..config
            },
            conditional: AtomicU8::new(COND_UNKNOWN),
            requests: AtomicU64::new(0),
            lock: std::sync::RwLock::new(None),
        })
    }

    pub fn config(&self) -> &S3Config {
        &self.config
    }

    fn full_key(&self, key: &str) -> String {
        if self.config.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.config.prefix)
        }
    }

    /// Runs a future to completion from synchronous code, also when called inside a runtime.
    fn block<F: Future + Send>(&self, f: F) -> F::Output
    where
        F::Output: Send,
    {
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| s.spawn(|| self.rt.block_on(f)).join().unwrap())
        } else {
            self.rt.block_on(f)
        }
    }

    fn count(&self, n: u64) {
        self.requests.fetch_add(n, Ordering::Relaxed);
    }

    fn fail(&self, op: &'static str, key: &str, f: Failure) -> StoreError {
        let store = self.location();
        let key = key.to_string();
        match (f.status, f.code.as_deref()) {
            (_, Some("NoSuchBucket")) => StoreError::Remote {
                store,
                key,
                op,
                reason: format!("bucket {} does not exist", self.config.bucket),
                retryable: false,
            },
            (Some(404), _) | (_, Some("NoSuchKey" | "NotFound")) => {
                StoreError::NotFound { store, key }
            }
            (Some(403), _) => StoreError::Remote {
                store,
                key,
                op,
                reason: format!(
                    "{}: access denied (check the AWS credentials, the region and the bucket policy)",
                    f.reason
                ),
                retryable: false,
            },
            (Some(301), _) => StoreError::Remote {
                store,
                key,
                op,
                reason: format!(
                    "{}: the bucket is in another region (set --region or AWS_REGION)",
                    f.reason
                ),
                retryable: false,
            },
            (Some(412), _) | (_, Some("PreconditionFailed")) if op == "put" => {
                StoreError::AlreadyExists { store, key }
            }
            _ => StoreError::Remote {
                store,
                key,
                op,
                reason: f.reason,
                retryable: f.retryable,
            },
        }
    }

    /// Creates the bucket if it does not exist (for `vault init`).
    pub fn ensure_bucket(&self) -> Result<(), StoreError> {
        let bucket = self.config.bucket.clone();
        self.count(1);
        let head = self.block(self.client.head_bucket().bucket(&bucket).send());
        match head {
            Ok(_) => return Ok(()),
            Err(e) => {
                let f = classify(&e);
                if f.status != Some(404) && f.code.as_deref() != Some("NoSuchBucket") {
                    return Err(self.fail("check", "(bucket)", f));
                }
            }
        }
        let region = self.client.config().region().map(|r| r.to_string());
        let mut req = self.client.create_bucket().bucket(&bucket);
        if let Some(r) = region.filter(|r| r != "us-east-1" && self.config.endpoint_url.is_none()) {
            req = req.create_bucket_configuration(
                aws_sdk_s3::types::CreateBucketConfiguration::builder()
                    .location_constraint(aws_sdk_s3::types::BucketLocationConstraint::from(
                        r.as_str(),
                    ))
                    .build(),
            );
        }
        self.count(1);
        match self.block(req.send()) {
            Ok(_) => Ok(()),
            Err(e) => {
                let f = classify(&e);
                if matches!(f.code.as_deref(), Some("BucketAlreadyOwnedByYou")) {
                    return Ok(());
                }
                Err(self.fail("creation", "(bucket)", f))
            }
        }
    }

    /// The lock a put of `key` carries now (None: unlocked vault or a scratch key).
    fn lock_headers(&self, key: &str) -> LockHeaders {
        let policy = (*self.lock.read().expect("lock policy"))?;
        if !is_locked_key(key) {
            return None;
        }
        let until = SystemTime::now() + policy.retention;
        Some((
            s3_mode(policy.mode),
            aws_sdk_s3::primitives::DateTime::from(until),
        ))
    }

    async fn put_once(
        &self,
        full: &str,
        data: &Bytes,
        if_none_match: bool,
        lock: LockHeaders,
    ) -> Result<(), Failure> {
        self.count(1);
        let mut req = self
            .client
            .put_object()
            .bucket(&self.config.bucket)
            .key(full)
            .body(ByteStream::from(data.clone()));
        if if_none_match {
            req = req.if_none_match("*");
        }
        if let Some((mode, until)) = lock {
            // S3 requires a body digest on puts with a retention.
            req = req
                .object_lock_mode(mode)
                .object_lock_retain_until_date(until)
                .content_md5(md5_base64(data));
        }
        if let Some(k) = &self.config.kms_key_id {
            req = req
                .server_side_encryption(ServerSideEncryption::AwsKms)
                .ssekms_key_id(k);
        }
        req.customize()
            .disable_payload_signing()
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify(&e))
    }

    async fn put_multipart(
        &self,
        full: &str,
        data: &Bytes,
        if_none_match: bool,
        lock: LockHeaders,
    ) -> Result<(), Failure> {
        let bucket = &self.config.bucket;
        self.count(1);
        let mut create = self
            .client
            .create_multipart_upload()
            .bucket(bucket)
            .key(full);
        let locked = lock.is_some();
        if let Some((mode, until)) = lock {
            create = create
                .object_lock_mode(mode)
                .object_lock_retain_until_date(until);
        }
        if let Some(k) = &self.config.kms_key_id {
            create = create
                .server_side_encryption(ServerSideEncryption::AwsKms)
                .ssekms_key_id(k);
        }
        let upload = create.send().await.map_err(|e| classify(&e))?;
        let id = upload.upload_id().unwrap_or_default().to_string();
        let parts = (0..data.len().div_ceil(PART_SIZE)).map(|i| {
            let part = data.slice(i * PART_SIZE..data.len().min((i + 1) * PART_SIZE));
            let id = id.clone();
            async move {
                self.count(1);
                let n = i as i32 + 1;
                let md5 = locked.then(|| md5_base64(&part));
                let out = self
                    .client
                    .upload_part()
                    .bucket(bucket)
                    .key(full)
                    .upload_id(id)
                    .part_number(n)
                    .set_content_md5(md5)
                    .body(ByteStream::from(part))
                    .customize()
                    .disable_payload_signing()
                    .send()
                    .await
                    .map_err(|e| classify(&e))?;
                Ok::<_, Failure>(
                    CompletedPart::builder()
                        .part_number(n)
                        .set_e_tag(out.e_tag().map(str::to_string))
                        .build(),
                )
            }
        });
        let mut done = Vec::new();
        let mut result = Ok(());
        // Bounded parallelism: PUT_PARALLELISM parts at a time.
        let parts: Vec<_> = parts.collect();
        let mut it = parts.into_iter();
        loop {
            let batch: Vec<_> = it.by_ref().take(PUT_PARALLELISM).collect();
            if batch.is_empty() {
                break;
            }
            let mut set = Vec::new();
            for f in batch {
                set.push(f);
            }
            for r in join_all(set).await {
                match r {
                    Ok(p) => done.push(p),
                    Err(f) => result = Err(f),
                }
            }
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() {
            self.count(1);
            let mut complete = self
                .client
                .complete_multipart_upload()
                .bucket(bucket)
                .key(full)
                .upload_id(&id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(done))
                        .build(),
                );
            if if_none_match {
                complete = complete.if_none_match("*");
            }
            result = complete.send().await.map(|_| ()).map_err(|e| classify(&e));
        }
        if result.is_err() {
            self.count(1);
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(bucket)
                .key(full)
                .upload_id(&id)
                .send()
                .await;
        }
        result
    }

    async fn head(&self, full: &str) -> Result<Option<u64>, Failure> {
        self.count(1);
        match self
            .client
            .head_object()
            .bucket(&self.config.bucket)
            .key(full)
            .send()
            .await
        {
            Ok(h) => Ok(Some(h.content_length().unwrap_or(0).max(0) as u64)),
            Err(e) => {
                let f = classify(&e);
                if f.status == Some(404) {
                    Ok(None)
                } else {
                    Err(f)
                }
            }
        }
    }

    /// Whether the server refuses a second `If-None-Match: *` put of one key (probed once).
    fn conditional_puts(&self) -> Result<bool, StoreError> {
        match self.conditional.load(Ordering::Relaxed) {
            COND_YES => return Ok(true),
            COND_NO => return Ok(false),
            _ => {}
        }
        let key = format!("locks/probe-{}", hex::encode(rand::random::<[u8; 8]>()));
        let full = self.full_key(&key);
        let first = self.block(self.put_once(&full, &Bytes::from_static(b"probe"), true, None));
        first.map_err(|f| self.fail("put", &key, f))?;
        let second = self.block(self.put_once(&full, &Bytes::from_static(b"probe"), true, None));
        let supported = match second {
            Ok(()) => false,
            Err(f) if f.status == Some(412) || f.code.as_deref() == Some("PreconditionFailed") => {
                true
            }
            Err(f) => return Err(self.fail("put", &key, f)),
        };
        self.count(1);
        let _ = self.block(
            self.client
                .delete_object()
                .bucket(&self.config.bucket)
                .key(&full)
                .send(),
        );
        if !supported {
            tracing::warn!(
                "{} ignores If-None-Match on PUT: create-only writes fall back to HEAD + PUT",
                self.location()
            );
        }
        self.conditional.store(
            if supported { COND_YES } else { COND_NO },
            Ordering::Relaxed,
        );
        Ok(supported)
    }
}

/// Reads a whole response body into one buffer as it arrives (`ByteStream::collect` would gather
/// the pieces, then copy them twice more into a `Vec`); `len` is the expected size, when known.
/// A connection dropped half-way is worth retrying.
async fn read_body(mut body: ByteStream, len: Option<u64>) -> Result<Vec<u8>, Failure> {
    let failed = |e: &dyn std::fmt::Display| Failure::transient(format!("reading the body: {e}"));
    let mut out = Vec::with_capacity(len.unwrap_or(0).min(MULTIPART_THRESHOLD as u64) as usize);
    while let Some(piece) = body.try_next().await.map_err(|e| failed(&e))? {
        out.extend_from_slice(&piece);
    }
    Ok(out)
}

/// Awaits all futures (they run concurrently on this task).
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..pinned.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.unwrap()).collect()
}

impl ObjectStore for S3Store {
    fn location(&self) -> String {
        self.config.url()
    }

    fn put(&self, key: &str, data: &[u8], mode: PutMode) -> Result<(), StoreError> {
        self.put_bytes(key, &Bytes::copy_from_slice(data), mode)
    }

    /// Sends `data` as it is: the request body shares it (no copy of a 16 MiB pack).
    fn put_bytes(&self, key: &str, data: &Bytes, mode: PutMode) -> Result<(), StoreError> {
        validate_key(key)?;
        let full = self.full_key(key);
        let conditional = mode == PutMode::Create && self.conditional_puts()?;
        // Some servers (Ceph RGW 16) honour If-None-Match on PUT but not on the completion of
        // a multipart upload: large create-only objects are checked with a HEAD first too.
        let multipart = data.len() > MULTIPART_THRESHOLD;
        if mode == PutMode::Create
            && (!conditional || multipart)
            && self
                .block(self.head(&full))
                .map_err(|f| self.fail("head", key, f))?
                .is_some()
        {
            return Err(StoreError::AlreadyExists {
                store: self.location(),
                key: key.to_string(),
            });
        }
        let lock = self.lock_headers(key);
        let result = if multipart {
            self.block(self.put_multipart(&full, data, conditional, lock))
        } else {
            self.block(self.put_once(&full, data, conditional, lock))
        };
        result.map_err(|f| self.fail("put", key, f))
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        validate_key(key)?;
        let full = self.full_key(key);
        self.count(1);
        self.block(async {
            let out = self
                .client
                .get_object()
                .bucket(&self.config.bucket)
                .key(&full)
                .send()
                .await
                .map_err(|e| classify(&e))?;
            let len = out.content_length().and_then(|n| u64::try_from(n).ok());
            read_body(out.body, len).await
        })
        .map_err(|f| self.fail("get", key, f))
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>, StoreError> {
        validate_key(key)?;
        let full = self.full_key(key);
        let bad_range = |size| StoreError::BadRange {
            store: self.location(),
            key: key.to_string(),
            start: range.start,
            end: range.end,
            size,
        };
        if range.start >= range.end {
            // No bytes to fetch: only existence and bounds to check.
            let size = self
                .block(self.head(&full))
                .map_err(|f| self.fail("head", key, f))?
                .ok_or_else(|| StoreError::NotFound {
                    store: self.location(),
                    key: key.to_string(),
                })?;
            return if range.start <= size && range.start == range.end {
                Ok(Vec::new())
            } else {
                Err(bad_range(size))
            };
        }
        self.count(1);
        let got: Result<(Vec<u8>, Option<u64>), Failure> = self.block(async {
            let out = self
                .client
                .get_object()
                .bucket(&self.config.bucket)
                .key(&full)
                .range(format!("bytes={}-{}", range.start, range.end - 1))
                .send()
                .await
                .map_err(|e| classify(&e))?;
            let total = out
                .content_range()
                .and_then(|r| r.rsplit('/').next())
                .and_then(|t| t.parse::<u64>().ok());
            Ok((
                read_body(out.body, Some(range.end - range.start)).await?,
                total,
            ))
        });
        match got {
            Ok((bytes, total)) => {
                if bytes.len() as u64 != range.end - range.start {
                    return Err(bad_range(total.unwrap_or(range.start + bytes.len() as u64)));
                }
                Ok(bytes)
            }
            Err(f) if f.status == Some(416) || f.code.as_deref() == Some("InvalidRange") => {
                let size = self.block(self.head(&full)).ok().flatten().unwrap_or(0);
                Err(bad_range(size))
            }
            Err(f) => Err(self.fail("get", key, f)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let full = self.full_key(prefix);
        let strip = if self.config.prefix.is_empty() {
            0
        } else {
            self.config.prefix.len() + 1
        };
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            self.count(1);
            let page = self
                .block(
                    self.client
                        .list_objects_v2()
                        .bucket(&self.config.bucket)
                        .prefix(&full)
                        .set_continuation_token(token.clone())
                        .send(),
                )
                .map_err(|e| self.fail("list", prefix, classify(&e)))?;
            for o in page.contents() {
                let Some(k) = o.key() else { continue };
                if k.len() < strip {
                    continue;
                }
                out.push(ObjectMeta {
                    key: k[strip..].to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                });
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        validate_key(key)?;
        let full = self.full_key(key);
        self.count(1);
        match self.block(
            self.client
                .delete_object()
                .bucket(&self.config.bucket)
                .key(&full)
                .send(),
        ) {
            Ok(_) => Ok(()),
            Err(e) => {
                let f = classify(&e);
                if f.status == Some(404) {
                    return Ok(());
                }
                Err(self.fail("delete", key, f))
            }
        }
    }

    fn put_parallelism(&self) -> usize {
        PUT_PARALLELISM
    }

    fn read_parallelism(&self) -> usize {
        READ_PARALLELISM
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            requests: self.requests.load(Ordering::Relaxed),
            retries: 0,
        }
    }

    fn object_lock(&self) -> Option<&dyn ObjectLockStore> {
        Some(self)
    }
}

fn s3_mode(mode: LockMode) -> ObjectLockMode {
    match mode {
        LockMode::Governance => ObjectLockMode::Governance,
        LockMode::Compliance => ObjectLockMode::Compliance,
    }
}

fn md5_base64(data: &[u8]) -> String {
    use md5::Digest;
    aws_smithy_types::base64::encode(md5::Md5::digest(data))
}

fn system_time(t: &aws_sdk_s3::primitives::DateTime) -> Option<SystemTime> {
    SystemTime::try_from(*t).ok()
}

/// Attempts of one Object Lock request (these calls bypass [`super::retry::RetryStore`]).
const LOCK_ATTEMPTS: u32 = 4;

impl S3Store {
    /// Runs `op` until it succeeds, fails for good, or [`LOCK_ATTEMPTS`] have failed.
    fn with_retries<T, F, Fut>(&self, what: &'static str, key: &str, op: F) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, Failure>> + Send,
        T: Send,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.count(1);
            match self.block(op()) {
                Ok(v) => return Ok(v),
                Err(f) if f.retryable && attempt < LOCK_ATTEMPTS => {
                    std::thread::sleep(Duration::from_millis(100 << attempt));
                }
                Err(f) => return Err(self.fail(what, key, f)),
            }
        }
    }

    fn vault_key<'a>(&self, full: &'a str) -> Option<&'a str> {
        if self.config.prefix.is_empty() {
            Some(full)
        } else {
            full.strip_prefix(&self.config.prefix)?.strip_prefix('/')
        }
    }
}

impl ObjectLockStore for S3Store {
    fn set_policy(&self, policy: LockPolicy) {
        *self.lock.write().expect("lock policy") = Some(policy);
    }

    fn policy(&self) -> Option<LockPolicy> {
        *self.lock.read().expect("lock policy")
    }

    fn bucket_lock(&self) -> Result<BucketLock, StoreError> {
        let bucket = self.config.bucket.clone();
        let out = self.with_retries("lock configuration", "(bucket)", || async {
            match self
                .client
                .get_object_lock_configuration()
                .bucket(&bucket)
                .send()
                .await
            {
                Ok(o) => Ok(Some(o)),
                Err(e) => {
                    let f = classify(&e);
                    // No configuration at all: not a lock bucket.
                    if f.status == Some(404)
                        || f.code.as_deref() == Some("ObjectLockConfigurationNotFoundError")
                    {
                        Ok(None)
                    } else {
                        Err(f)
                    }
                }
            }
        })?;
        let Some(conf) = out.and_then(|o| o.object_lock_configuration) else {
            return Ok(BucketLock {
                enabled: false,
                default: None,
            });
        };
        let enabled = conf.object_lock_enabled().map(|e| e.as_str()) == Some("Enabled");
        let default = conf
            .rule()
            .and_then(|r| r.default_retention())
            .and_then(|d| {
                let mode = match d.mode()? {
                    aws_sdk_s3::types::ObjectLockRetentionMode::Governance => LockMode::Governance,
                    aws_sdk_s3::types::ObjectLockRetentionMode::Compliance => LockMode::Compliance,
                    _ => return None,
                };
                let days = d.days().map(|d| d.max(0) as u64 * 86400);
                let years = d.years().map(|y| y.max(0) as u64 * 365 * 86400);
                Some((mode, Duration::from_secs(days.or(years)?)))
            });
        Ok(BucketLock { enabled, default })
    }

    fn ensure_lock_bucket(&self) -> Result<(), StoreError> {
        let bucket = self.config.bucket.clone();
        self.count(1);
        let exists = match self.block(self.client.head_bucket().bucket(&bucket).send()) {
            Ok(_) => true,
            Err(e) => {
                let f = classify(&e);
                if f.status != Some(404) && f.code.as_deref() != Some("NoSuchBucket") {
                    return Err(self.fail("check", "(bucket)", f));
                }
                false
            }
        };
        if !exists {
            let region = self.client.config().region().map(|r| r.to_string());
            let mut req = self
                .client
                .create_bucket()
                .bucket(&bucket)
                .object_lock_enabled_for_bucket(true);
            if let Some(r) =
                region.filter(|r| r != "us-east-1" && self.config.endpoint_url.is_none())
            {
                req = req.create_bucket_configuration(
                    aws_sdk_s3::types::CreateBucketConfiguration::builder()
                        .location_constraint(aws_sdk_s3::types::BucketLocationConstraint::from(
                            r.as_str(),
                        ))
                        .build(),
                );
            }
            self.count(1);
            if let Err(e) = self.block(req.send()) {
                let f = classify(&e);
                if !matches!(f.code.as_deref(), Some("BucketAlreadyOwnedByYou")) {
                    return Err(self.fail("creation", "(bucket)", f));
                }
            }
        }
        if !self.bucket_lock()?.enabled {
            return Err(StoreError::Remote {
                store: self.location(),
                key: "(bucket)".into(),
                op: "Object Lock check",
                reason: format!(
                    "bucket {bucket} exists without Object Lock (it can only be enabled on a \
                     versioned bucket: `aws s3api put-bucket-versioning` then \
                     `put-object-lock-configuration`), or use a new bucket"
                ),
                retryable: false,
            });
        }
        Ok(())
    }

    fn versions(&self, prefix: &str) -> Result<Vec<ObjectVersion>, StoreError> {
        let full = self.full_key(prefix);
        let mut out = Vec::new();
        let (mut key_marker, mut version_marker): (Option<String>, Option<String>) = (None, None);
        loop {
            let (km, vm) = (key_marker.clone(), version_marker.clone());
            let page = self.with_retries("version listing", prefix, || async {
                self.client
                    .list_object_versions()
                    .bucket(&self.config.bucket)
                    .prefix(&full)
                    .set_key_marker(km.clone())
                    .set_version_id_marker(vm.clone())
                    .send()
                    .await
                    .map_err(|e| classify(&e))
            })?;
            for v in page.versions() {
                let (Some(k), Some(id)) = (v.key(), v.version_id()) else {
                    continue;
                };
                let Some(key) = self.vault_key(k) else {
                    continue;
                };
                out.push(ObjectVersion {
                    key: key.to_string(),
                    version_id: id.to_string(),
                    is_latest: v.is_latest() == Some(true),
                    is_delete_marker: false,
                    size: v.size().unwrap_or(0).max(0) as u64,
                    modified: v.last_modified().and_then(system_time),
                    etag: v.e_tag().map(str::to_string),
                });
            }
            for m in page.delete_markers() {
                let (Some(k), Some(id)) = (m.key(), m.version_id()) else {
                    continue;
                };
                let Some(key) = self.vault_key(k) else {
                    continue;
                };
                out.push(ObjectVersion {
                    key: key.to_string(),
                    version_id: id.to_string(),
                    is_latest: m.is_latest() == Some(true),
                    is_delete_marker: true,
                    size: 0,
                    modified: m.last_modified().and_then(system_time),
                    etag: None,
                });
            }
            if page.is_truncated() != Some(true) {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_string);
            version_marker = page.next_version_id_marker().map(str::to_string);
            if key_marker.is_none() {
                break;
            }
        }
        // Per key: newest first (the latest, then by time).
        out.sort_by(|a, b| {
            a.key
                .cmp(&b.key)
                .then(b.is_latest.cmp(&a.is_latest))
                .then(b.modified.cmp(&a.modified))
        });
        Ok(out)
    }

    fn retention(
        &self,
        key: &str,
        version_id: &str,
    ) -> Result<Option<(LockMode, SystemTime)>, StoreError> {
        validate_key(key)?;
        let full = self.full_key(key);
        // HEAD answers everywhere (Ceph RGW 16 sends GetObjectRetention answers the SDK cannot
        // read); an object HEAD cannot read (SSE-C: 400) is asked with GetObjectRetention.
        let head = self.with_retries("lock read", key, || async {
            match self
                .client
                .head_object()
                .bucket(&self.config.bucket)
                .key(&full)
                .version_id(version_id)
                .send()
                .await
            {
                Ok(h) => Ok(Some(h)),
                Err(e) => {
                    let f = classify(&e);
                    if f.status == Some(400) {
                        Ok(None)
                    } else {
                        Err(f)
                    }
                }
            }
        })?;
        if let Some(h) = head {
            let mode = h.object_lock_mode().and_then(|m| match m {
                ObjectLockMode::Governance => Some(LockMode::Governance),
                ObjectLockMode::Compliance => Some(LockMode::Compliance),
                _ => None,
            });
            let until = h.object_lock_retain_until_date().and_then(system_time);
            return Ok(mode.zip(until));
        }
        let out = self.with_retries("lock read", key, || async {
            match self
                .client
                .get_object_retention()
                .bucket(&self.config.bucket)
                .key(&full)
                .version_id(version_id)
                .send()
                .await
            {
                Ok(o) => Ok(Some(o)),
                Err(e) => {
                    let f = classify(&e);
                    if f.code.as_deref() == Some("NoSuchObjectLockConfiguration") {
                        Ok(None)
                    } else {
                        Err(f)
                    }
                }
            }
        })?;
        let Some(r) = out.and_then(|o| o.retention) else {
            return Ok(None);
        };
        let mode = match r.mode() {
            Some(aws_sdk_s3::types::ObjectLockRetentionMode::Governance) => LockMode::Governance,
            Some(aws_sdk_s3::types::ObjectLockRetentionMode::Compliance) => LockMode::Compliance,
            _ => return Ok(None),
        };
        Ok(r.retain_until_date()
            .and_then(system_time)
            .map(|u| (mode, u)))
    }

    fn extend(&self, key: &str, version_id: &str, until: SystemTime) -> Result<(), StoreError> {
        validate_key(key)?;
        let Some(policy) = self.policy() else {
            return Ok(());
        };
        let full = self.full_key(key);
        let retention = aws_sdk_s3::types::ObjectLockRetention::builder()
            .mode(match policy.mode {
                LockMode::Governance => aws_sdk_s3::types::ObjectLockRetentionMode::Governance,
                LockMode::Compliance => aws_sdk_s3::types::ObjectLockRetentionMode::Compliance,
            })
            .retain_until_date(aws_sdk_s3::primitives::DateTime::from(until))
            .build();
        self.with_retries("retention extension", key, || async {
            self.client
                .put_object_retention()
                .bucket(&self.config.bucket)
                .key(&full)
                .version_id(version_id)
                .retention(retention.clone())
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify(&e))
        })
    }

    fn delete_version(&self, key: &str, version_id: &str) -> Result<(), StoreError> {
        validate_key(key)?;
        let full = self.full_key(key);
        self.with_retries("version delete", key, || async {
            self.client
                .delete_object()
                .bucket(&self.config.bucket)
                .key(&full)
                .version_id(version_id)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify(&e))
        })
    }

    fn get_version_range(
        &self,
        key: &str,
        version_id: &str,
        range: Range<u64>,
    ) -> Result<Vec<u8>, StoreError> {
        validate_key(key)?;
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let full = self.full_key(key);
        let header = format!("bytes={}-{}", range.start, range.end - 1);
        let data = self.with_retries("get", key, || async {
            let out = self
                .client
                .get_object()
                .bucket(&self.config.bucket)
                .key(&full)
                .version_id(version_id)
                .range(&header)
                .send()
                .await
                .map_err(|e| classify(&e))?;
            read_body(out.body, Some(range.end - range.start)).await
        })?;
        if data.len() as u64 != range.end - range.start {
            return Err(StoreError::Remote {
                store: self.location(),
                key: key.to_string(),
                op: "get",
                reason: format!(
                    "asked for bytes {}..{} of version {version_id}, got {}",
                    range.start,
                    range.end,
                    data.len()
                ),
                retryable: false,
            });
        }
        Ok(data)
    }

    fn restore_version(&self, key: &str, version_id: &str) -> Result<(), StoreError> {
        // Through this client, not CopyObject: a put carries the lock and its Content-MD5 the
        // same way everywhere (moto refuses a locked CopyObject without a digest).
        let data = self.get_version(key, version_id)?;
        self.put_bytes(key, &Bytes::from(data), PutMode::Overwrite)
    }

    fn get_version(&self, key: &str, version_id: &str) -> Result<Vec<u8>, StoreError> {
        validate_key(key)?;
        let full = self.full_key(key);
        self.with_retries("get", key, || async {
            let out = self
                .client
                .get_object()
                .bucket(&self.config.bucket)
                .key(&full)
                .version_id(version_id)
                .send()
                .await
                .map_err(|e| classify(&e))?;
            let len = out.content_length().map(|l| l.max(0) as u64);
            read_body(out.body, len).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let c = S3Config::from_url("s3://my-bucket/some/prefix/").unwrap();
        assert_eq!(
            (c.bucket.as_str(), c.prefix.as_str()),
            ("my-bucket", "some/prefix")
        );
        assert_eq!(c.url(), "s3://my-bucket/some/prefix");
        let c = S3Config::from_url("s3://bkt").unwrap();
        assert_eq!(c.prefix, "");
        assert!(S3Config::from_url("s3://UPPER").is_err());
        assert!(S3Config::from_url("s3://ok-bucket/../x").is_err());
        assert!(S3Config::from_url("/local/path").is_err());
    }
}
