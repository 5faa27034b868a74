//! Least-privilege S3 policies for a vault's bucket and prefix (`vault iam-policy`).
//!
//! What each role's commands send (see FORMAT.md "On S3" and "Locked vaults"):
//! * every role opens the vault: `GetObject`, `ListBucket` under the prefix, and reads the
//!   bucket's Object Lock configuration (`vault lock status`);
//! * backup adds `PutObject` (new objects only, by convention: create-only puts), and
//!   `PutObjectRetention`, which AWS requires for a put that carries a lock. It deletes only its
//!   own scratch objects, `leases/` and `locks/`: never data.
//! * prune adds deleting (on a locked vault that only hides a key), listing versions, reading
//!   and extending locks, and destroying versions (which S3 refuses while they are locked);
//! * admin may do anything to the bucket (create it with Object Lock, policies).
//!
//! No role gets `s3:BypassGovernanceRetention`: with it, governance-mode locks could be lifted.

use serde_json::{json, Value};

/// The roles `vault iam-policy` prints policies for.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// restore, mount, browse, check, list: read only
    Restore,
    /// backups: write new objects, delete only leases/ and locks/
    Backup,
    /// prune and rp delete: everything backup does, plus deleting and lock upkeep
    Prune,
    /// vault init and bucket administration
    Admin,
}

/// One statement of a policy.
fn statement(
    effect: &str,
    sid: &str,
    actions: &[&str],
    resources: Vec<String>,
    cond: Option<Value>,
    principal: Option<&str>,
) -> Value {
    let mut s = json!({
        "Sid": sid,
        "Effect": effect,
        "Action": actions,
        "Resource": resources,
    });
    if let Some(c) = cond {
        s["Condition"] = c;
    }
    if let Some(p) = principal {
        s["Principal"] = json!({ "AWS": [p] });
    }
    s
}

/// The policy of `role` on `bucket`/`prefix`: an IAM identity policy, or with `principal` a
/// bucket policy granting it to that principal. `lock`: the vault's Object Lock, which bounds
/// the locks a backup may set (its mode, and no longer than its retention and a day).
pub fn policy(
    role: Role,
    bucket: &str,
    prefix: &str,
    principal: Option<&str>,
    lock: Option<scalez::vault::ObjectLock>,
) -> Value {
    let bucket_arn = format!("arn:aws:s3:::{bucket}");
    let objects = |sub: &str| match prefix {
        "" => format!("{bucket_arn}/{sub}"),
        p => format!("{bucket_arn}/{p}/{sub}"),
    };
    // IfExists: a HEAD of a missing object needs ListBucket too (for a 404, not a 403), and it
    // carries no prefix. (So key names elsewhere in the bucket can be listed; not their bytes.)
    let list_condition = match prefix {
        "" => None,
        p => Some(json!({ "StringLikeIfExists": { "s3:prefix": [format!("{p}/*"), p] } })),
    };
    let mut out = Vec::new();
    let mut allow = |sid: &str, actions: &[&str], resources: Vec<String>, cond: Option<Value>| {
        out.push(statement("Allow", sid, actions, resources, cond, principal));
    };
    if role == Role::Admin {
        allow(
            "ElastioAdmin",
            &["s3:*"],
            vec![bucket_arn.clone(), objects("*")],
            None,
        );
    } else {
        allow(
            "ElastioList",
            &["s3:ListBucket", "s3:ListBucketVersions"],
            vec![bucket_arn.clone()],
            list_condition,
        );
        allow(
            "ElastioLockConfig",
            &["s3:GetBucketObjectLockConfiguration"],
            vec![bucket_arn.clone()],
            None,
        );
        // Versions and locks: --point-in-time and `vault lock status`.
        allow(
            "ElastioRead",
            &[
                "s3:GetObject",
                "s3:GetObjectVersion",
                "s3:GetObjectRetention",
            ],
            vec![objects("*")],
            None,
        );
    }
    if matches!(role, Role::Backup | Role::Prune) {
        allow(
            "ElastioWrite",
            &["s3:PutObject", "s3:AbortMultipartUpload"],
            vec![objects("*")],
            None,
        );
        // AWS asks for it on every put that carries a lock; the conditions keep a stolen
        // backup host from setting other locks (compliance, or decades long).
        let cond = lock.map(|l| {
            json!({
                "StringEqualsIfExists": { "s3:object-lock-mode": l.mode.as_str().to_uppercase() },
                "NumericLessThanEqualsIfExists": {
                    "s3:object-lock-remaining-retention-days": l.retention_secs.div_ceil(86400) + 1
                }
            })
        });
        allow(
            "ElastioLock",
            &["s3:PutObjectRetention"],
            vec![objects("*")],
            cond,
        );
        allow(
            "ElastioScratch",
            &["s3:DeleteObject"],
            vec![objects("leases/*"), objects("locks/*")],
            None,
        );
    }
    if role == Role::Prune {
        allow(
            "ElastioPrune",
            &["s3:DeleteObject", "s3:DeleteObjectVersion"],
            vec![objects("*")],
            None,
        );
    }
    // Governance locks could be lifted with it: no role has it, not even admin.
    out.push(statement(
        "Deny",
        "ElastioNoBypass",
        &["s3:BypassGovernanceRetention"],
        vec![objects("*")],
        None,
        principal,
    ));
    json!({ "Version": "2012-10-17", "Statement": out })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actions(p: &Value) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for s in p["Statement"].as_array().unwrap() {
            for a in s["Action"].as_array().unwrap() {
                for r in s["Resource"].as_array().unwrap() {
                    out.push((a.as_str().unwrap().into(), r.as_str().unwrap().into()));
                }
            }
        }
        out
    }

    /// Allowed (action, resource) pairs.
    fn allowed(p: &Value) -> Vec<(String, String)> {
        let only = json!({ "Statement": p["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["Effect"] == "Allow")
            .collect::<Vec<_>>() });
        actions(&only)
    }

    #[test]
    fn backup_deletes_only_scratch_and_nobody_bypasses_governance() {
        let b = allowed(&policy(Role::Backup, "bk", "prod", None, None));
        let deletes: Vec<_> = b.iter().filter(|(a, _)| a.contains("Delete")).collect();
        assert_eq!(deletes.len(), 2);
        assert!(deletes
            .iter()
            .all(|(_, r)| r.ends_with("prod/leases/*") || r.ends_with("prod/locks/*")));
        for role in [Role::Restore, Role::Backup, Role::Prune, Role::Admin] {
            let p = policy(role, "bk", "", Some("arn:aws:iam:::user/x"), None);
            let statements = p["Statement"].as_array().unwrap();
            // The explicit deny beats any allow, admin's s3:* included.
            assert!(
                statements
                    .iter()
                    .any(|s| s["Effect"] == "Deny"
                        && s["Action"][0] == "s3:BypassGovernanceRetention"),
                "{role:?}"
            );
            assert!(
                !allowed(&p).iter().any(|(a, _)| a.contains("Bypass")),
                "{role:?}"
            );
            assert!(
                statements
                    .iter()
                    .all(|s| s["Principal"]["AWS"][0] == "arn:aws:iam:::user/x"),
                "{role:?}"
            );
        }
        let r = allowed(&policy(Role::Restore, "bk", "prod", None, None));
        assert!(r
            .iter()
            .all(|(a, _)| a.starts_with("s3:Get") || a.starts_with("s3:ListBucket")));
        let p = allowed(&policy(Role::Prune, "bk", "prod", None, None));
        assert!(p.contains(&(
            "s3:DeleteObjectVersion".into(),
            "arn:aws:s3:::bk/prod/*".into()
        )));
        // A known lock bounds the locks a backup may set.
        let lock = scalez::vault::ObjectLock {
            mode: scalez::store::lock::LockMode::Governance,
            retention_secs: 30 * 86400,
        };
        let p = policy(Role::Backup, "bk", "prod", None, Some(lock));
        let s = p["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["Sid"] == "ElastioLock")
            .unwrap();
        assert_eq!(
            s["Condition"]["StringEqualsIfExists"]["s3:object-lock-mode"],
            "GOVERNANCE"
        );
        assert_eq!(
            s["Condition"]["NumericLessThanEqualsIfExists"]
                ["s3:object-lock-remaining-retention-days"],
            31
        );
    }
}
