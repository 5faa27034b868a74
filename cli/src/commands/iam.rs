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

/// The policy of `role` on `bucket`/`prefix`: an IAM identity policy, or with `principal` a
/// bucket policy granting it to that principal.
pub fn policy(role: Role, bucket: &str, prefix: &str, principal: Option<&str>) -> Value {
    let bucket_arn = format!("arn:aws:s3:::{bucket}");
    let objects = |sub: &str| match prefix {
        "" => format!("{bucket_arn}/{sub}"),
        p => format!("{bucket_arn}/{p}/{sub}"),
    };
    let list_condition = match prefix {
        "" => None,
        // IfExists: a HEAD of a missing object needs ListBucket too (for a 404, not a 403),
        // and it carries no prefix.
        p => Some(json!({ "StringLikeIfExists": { "s3:prefix": [format!("{p}/*"), p] } })),
    };
    let mut statements = Vec::new();
    let mut add = |sid: &str, actions: &[&str], resources: Vec<String>, cond: Option<Value>| {
        let mut s = json!({
            "Sid": sid,
            "Effect": "Allow",
            "Action": actions,
            "Resource": resources,
        });
        if let Some(c) = cond {
            s["Condition"] = c;
        }
        if let Some(p) = principal {
            s["Principal"] = json!({ "AWS": [p] });
        }
        statements.push(s);
    };
    if role == Role::Admin {
        add(
            "ElastioAdmin",
            &["s3:*"],
            vec![bucket_arn.clone(), objects("*")],
            None,
        );
    } else {
        add(
            "ElastioList",
            &["s3:ListBucket"],
            vec![bucket_arn.clone()],
            list_condition.clone(),
        );
        add(
            "ElastioLockConfig",
            &["s3:GetBucketObjectLockConfiguration"],
            vec![bucket_arn.clone()],
            None,
        );
        add("ElastioRead", &["s3:GetObject"], vec![objects("*")], None);
    }
    if matches!(role, Role::Backup | Role::Prune) {
        add(
            "ElastioWrite",
            &["s3:PutObject", "s3:PutObjectRetention"],
            vec![objects("*")],
            None,
        );
        add(
            "ElastioScratch",
            &["s3:DeleteObject"],
            vec![objects("leases/*"), objects("locks/*")],
            None,
        );
    }
    if role == Role::Prune {
        add(
            "ElastioListVersions",
            &["s3:ListBucketVersions"],
            vec![bucket_arn.clone()],
            list_condition,
        );
        add(
            "ElastioPrune",
            &[
                "s3:DeleteObject",
                "s3:DeleteObjectVersion",
                "s3:GetObjectVersion",
                "s3:GetObjectRetention",
            ],
            vec![objects("*")],
            None,
        );
    }
    json!({ "Version": "2012-10-17", "Statement": statements })
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

    #[test]
    fn backup_deletes_only_scratch_and_nobody_bypasses_governance() {
        let b = actions(&policy(Role::Backup, "bk", "prod", None));
        let deletes: Vec<_> = b.iter().filter(|(a, _)| a.contains("Delete")).collect();
        assert_eq!(deletes.len(), 2);
        assert!(deletes
            .iter()
            .all(|(_, r)| r.ends_with("prod/leases/*") || r.ends_with("prod/locks/*")));
        for role in [Role::Restore, Role::Backup, Role::Prune, Role::Admin] {
            let p = policy(role, "bk", "", Some("arn:aws:iam:::user/x"));
            let text = p.to_string();
            assert!(!text.contains("Bypass"), "{role:?}");
            assert!(
                p["Statement"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|s| s["Principal"]["AWS"][0] == "arn:aws:iam:::user/x"),
                "{role:?}"
            );
        }
        let r = actions(&policy(Role::Restore, "bk", "prod", None));
        assert!(r
            .iter()
            .all(|(a, _)| a.starts_with("s3:Get") || a == "s3:ListBucket"));
        let p = actions(&policy(Role::Prune, "bk", "prod", None));
        assert!(p.contains(&(
            "s3:DeleteObjectVersion".into(),
            "arn:aws:s3:::bk/prod/*".into()
        )));
    }
}
