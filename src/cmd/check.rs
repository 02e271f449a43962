//! `prefsync check`: verifies the key and the project and lists, for every
//! permission prefsync uses, whether the key has it. Changes nothing: writes
//! are probed with bodies that fail validation (403 means missing, a
//! validation or not-found answer means granted).

use std::fmt;

use serde_json::json;

use crate::api::{ApiError, Beta, Client, Op};
use crate::cli::Job;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    Granted,
    Missing,
    Unknown(String),
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Grant::Granted => f.write_str("granted"),
            Grant::Missing => f.write_str("missing"),
            Grant::Unknown(why) => write!(f, "unknown ({why})"),
        }
    }
}

#[derive(Debug)]
pub struct CheckReport {
    pub beta: String,
    pub project: Option<Beta>,
    pub permissions: Vec<(&'static str, Grant)>,
    /// Why the key does not work for the project, if it does not.
    pub failure: Option<ApiError>,
}

impl CheckReport {
    pub fn works(&self) -> bool {
        self.failure.is_none()
    }

    pub fn grant(&self, permission: &str) -> Option<&Grant> {
        self.permissions
            .iter()
            .find(|(p, _)| *p == permission)
            .map(|(_, g)| g)
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.project {
            Some(p) => {
                writeln!(
                    f,
                    "project: {} (id {}, --beta {})",
                    p.name.as_deref().unwrap_or("(no name)"),
                    p.id,
                    self.beta
                )?;
                let n = |k: &str| p.extra.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
                writeln!(
                    f,
                    "users: {} (imported {}, applied {}, invited {}, active {}, rejected {})",
                    p.testers_count.unwrap_or(0),
                    n("imported_testers_count"),
                    n("applied_testers_count"),
                    n("invited_testers_count"),
                    n("active_testers_count"),
                    n("rejected_testers_count"),
                )?;
            }
            // Unread because nothing answered: the key is not to blame.
            None if matches!(self.failure, Some(ApiError::Unreachable { .. })) => writeln!(
                f,
                "project: --beta {} (not read: the API could not be reached)",
                self.beta
            )?,
            None => writeln!(
                f,
                "project: --beta {} (details not readable with this key)",
                self.beta
            )?,
        }
        writeln!(f, "permissions:")?;
        for (name, g) in &self.permissions {
            writeln!(f, "  {name:<30} {g}")?;
        }
        // The failure itself is the command's error, printed once, on
        // stderr, by the caller.
        Ok(())
    }
}

/// What one probe's answer says of the permission.
fn grant_of(result: Result<(), ApiError>) -> Grant {
    match result {
        Ok(()) => Grant::Granted,
        Err(ApiError::Forbidden { .. }) => Grant::Missing,
        // The call passed the permission check and failed on its content.
        Err(ApiError::Rejected {
            status: 400 | 422, ..
        })
        | Err(ApiError::NotFound { .. }) => Grant::Granted,
        Err(e) => Grant::Unknown(e.to_string()),
    }
}

/// One permission probe: its name, the call, and what to send.
struct Probe(
    &'static str,
    Op,
    String,
    Vec<(String, String)>,
    Option<serde_json::Value>,
);

pub async fn check(client: &Client, beta: &str) -> CheckReport {
    let mut report = CheckReport {
        beta: beta.to_string(),
        project: None,
        permissions: Vec::new(),
        failure: None,
    };
    let base = format!("betas/{beta}");
    let probe_email = vec![(
        "email".to_string(),
        "prefsync-check@invalid.example".to_string(),
    )];
    let empty = json!({});

    let show = client.beta(beta).await;
    let (projects_read, mut fatal) = match show {
        Ok(b) => {
            report.project = Some(b);
            (Grant::Granted, None)
        }
        Err(e @ ApiError::Forbidden { .. }) => (grant_of(Err(e)), None),
        Err(e) => (
            Grant::Unknown("the project could not be read".into()),
            Some(e),
        ),
    };
    report.permissions.push(("Projects > Read", projects_read));

    if fatal.is_none() {
        let q = vec![(
            "email_is".to_string(),
            "prefsync-check@invalid.example".to_string(),
        )];
        let r = client
            .call(
                Op::TestersList,
                Some(beta),
                &format!("{base}/testers.json"),
                &q,
                None,
            )
            .await;
        match r {
            Err(
                e @ (ApiError::Unauthorized { .. }
                | ApiError::PaymentRequired { .. }
                | ApiError::ProjectNotFound { .. }),
            ) => fatal = Some(e),
            r => report
                .permissions
                .push(("Users > Read", grant_of(r.map(|_| ())))),
        }
    }
    if let Some(e) = fatal {
        report.failure = Some(e);
        return report;
    }

    let probes: Vec<Probe> = vec![
        Probe(
            "Users > Create",
            Op::TesterCreate,
            format!("{base}/testers.json"),
            vec![],
            Some(json!({"tester": {"email": ""}})),
        ),
        Probe(
            "Users > Update",
            Op::TesterUpdate,
            format!("{base}/testers/0.json"),
            vec![],
            Some(json!({"tester": {}})),
        ),
        Probe(
            "Users > Delete",
            Op::TesterDelete,
            format!("{base}/testers/0.json"),
            vec![],
            None,
        ),
        Probe(
            "Points > Create",
            Op::PointCreate,
            format!("{base}/points.json"),
            vec![],
            Some(empty.clone()),
        ),
        Probe(
            "Points (list)",
            Op::PointsList,
            format!("{base}/points.json"),
            probe_email.clone(),
            None,
        ),
        Probe(
            "Rewards > Read",
            Op::RewardsList,
            format!("{base}/rewards.json"),
            probe_email.clone(),
            None,
        ),
        Probe(
            "Rewards > Create",
            Op::RewardCreate,
            format!("{base}/rewards.json"),
            vec![],
            Some(empty.clone()),
        ),
        Probe(
            "Rewards > Update",
            Op::RewardUpdate,
            format!("{base}/rewards/0.json"),
            vec![],
            Some(empty.clone()),
        ),
        Probe(
            "Email Suppressions > Read",
            Op::SuppressionsList,
            format!("{base}/suppressions.json"),
            probe_email.clone(),
            None,
        ),
        Probe(
            "Email Suppressions > Create",
            Op::SuppressionCreate,
            format!("{base}/suppressions.json"),
            vec![],
            Some(empty.clone()),
        ),
        Probe(
            "Email Suppressions > Delete",
            Op::SuppressionDelete,
            format!("{base}/suppressions/0.json"),
            vec![],
            None,
        ),
    ];
    for Probe(name, op, path, query, body) in probes {
        let r = client
            .call(op, Some(beta), &path, &query, body.as_ref())
            .await;
        report.permissions.push((name, grant_of(r.map(|_| ()))));
    }
    report.permissions.push((
        "Projects > Delete",
        Grant::Unknown("not probed: prefsync never deletes projects".into()),
    ));
    report
}

/// The permissions each job needs, in the words of the report (and of
/// Prefinery's API Keys page). Only what every run of the job calls: a
/// sync with --delete-missing needs Users > Delete too (see [`job_notes`]).
pub fn needs(job: Job) -> &'static [&'static str] {
    match job {
        // The project's size picks how to resolve emails; then lookups or
        // the listing, creates and updates.
        Job::Import => &[
            "Projects > Read",
            "Users > Read",
            "Users > Create",
            "Users > Update",
        ],
        Job::Export => &["Projects > Read", "Users > Read"],
        // The mirror's refresh lists users and suppressions.
        Job::Sync => &[
            "Projects > Read",
            "Users > Read",
            "Users > Create",
            "Users > Update",
            "Email Suppressions > Read",
        ],
        Job::Points => &["Points (list)", "Points > Create"],
        Job::Rewards => &["Rewards > Read", "Rewards > Create", "Rewards > Update"],
        // Unsubscribe looks the user up.
        Job::Suppressions => &[
            "Users > Read",
            "Email Suppressions > Read",
            "Email Suppressions > Create",
            "Email Suppressions > Delete",
        ],
        Job::Delete => &["Users > Read", "Users > Delete"],
        Job::Checkin => &["Users > Read", "Users > Update"],
        // Each webhook event re-reads the user, or that user's rewards
        // and points.
        Job::Listen => &["Users > Read", "Rewards > Read", "Points (list)"],
    }
}

/// What a job may need beyond [`needs`], depending on its flags.
pub fn job_notes(job: Job) -> Option<&'static str> {
    match job {
        Job::Sync => Some("sync --delete-missing also needs Users > Delete"),
        Job::Export => Some(
            "export rewards, suppressions or points needs Rewards > Read, Email Suppressions > Read or Points (list)",
        ),
        _ => None,
    }
}

/// The job's name as the user typed it.
pub fn job_name(job: Job) -> &'static str {
    match job {
        Job::Import => "import",
        Job::Export => "export",
        Job::Sync => "sync",
        Job::Points => "points",
        Job::Rewards => "rewards",
        Job::Suppressions => "suppressions",
        Job::Delete => "delete",
        Job::Checkin => "checkin",
        Job::Listen => "listen",
    }
}

/// What `--for JOB` found: the permissions it needs that are missing, and
/// those the probes could not tell.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct JobVerdict {
    pub missing: Vec<&'static str>,
    pub unknown: Vec<&'static str>,
}

impl CheckReport {
    pub fn verdict(&self, job: Job) -> JobVerdict {
        let mut v = JobVerdict::default();
        for p in needs(job) {
            match self.grant(p) {
                Some(Grant::Granted) => {}
                Some(Grant::Missing) => v.missing.push(p),
                // Not probed (the check stopped early) or not told.
                Some(Grant::Unknown(_)) | None => v.unknown.push(p),
            }
        }
        v
    }

    /// The report as one JSON document (`check --output json`). The keys
    /// are documented in the README and kept stable.
    pub fn to_json(&self, job: Option<Job>) -> serde_json::Value {
        let project = self.project.as_ref().map(|p| {
            json!({
                "id": p.id,
                "uid": p.extra.get("uid").cloned().unwrap_or(serde_json::Value::Null),
                "name": p.name,
                "users": p.testers_count,
            })
        });
        let permissions: Vec<serde_json::Value> = self
            .permissions
            .iter()
            .map(|(name, g)| {
                let (grant, detail) = match g {
                    Grant::Granted => ("granted", None),
                    Grant::Missing => ("missing", None),
                    Grant::Unknown(why) => ("unknown", Some(why.as_str())),
                };
                json!({"name": name, "grant": grant, "detail": detail})
            })
            .collect();
        let job_json = job.map(|j| {
            let v = self.verdict(j);
            json!({
                "job": job_name(j),
                "needs": needs(j),
                "missing": v.missing,
                "unknown": v.unknown,
                "ok": self.works() && v.missing.is_empty(),
                "note": job_notes(j),
            })
        });
        json!({
            "beta": self.beta,
            "works": self.works(),
            "project": project,
            "permissions": permissions,
            "for": job_json,
            "error": self.failure.as_ref().map(ToString::to_string),
        })
    }
}
