//! What each exportable resource is: its list call, its filters, its CSV
//! columns and its SQLite table.

use crate::api::Op;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Resource {
    Testers,
    Rewards,
    Suppressions,
    Points,
    Betas,
}

impl Resource {
    /// What one record is, for progress lines.
    pub fn unit(self) -> &'static str {
        match self {
            Resource::Testers => "users",
            Resource::Rewards => "rewards",
            Resource::Suppressions => "suppressions",
            Resource::Points => "points",
            Resource::Betas => "projects",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Resource::Testers => "testers",
            Resource::Rewards => "rewards",
            Resource::Suppressions => "suppressions",
            Resource::Points => "points",
            Resource::Betas => "betas",
        }
    }

    pub fn op(self) -> Op {
        match self {
            Resource::Testers => Op::TestersList,
            Resource::Rewards => Op::RewardsList,
            Resource::Suppressions => Op::SuppressionsList,
            Resource::Points => Op::PointsList,
            Resource::Betas => Op::BetasList,
        }
    }

    pub fn path(self, beta: &str) -> String {
        match self {
            Resource::Betas => "betas.json".into(),
            r => format!("betas/{beta}/{}.json", r.name()),
        }
    }

    /// The documented fields, in the order CSV columns take. Fields not
    /// listed follow (profile keys as `profile.<key>`, sorted), then any
    /// other field in the order first seen.
    pub fn columns(self) -> &'static [&'static str] {
        match self {
            Resource::Testers => &[
                "id",
                "email",
                "status",
                "invitation_code",
                "imported_at",
                "applied_at",
                "invited_at",
                "joined_at",
                "unsubscribed_at",
                "share_clicks_count",
                "share_signups_count",
                "friend_invitations_allowed",
                "friend_invitations_count",
                "friend_invitations_remaining",
                "referral_code",
                "share_link",
                "share_status_link",
                "waitlist_position",
                "waitlist_ahead",
                "waitlist_behind",
                "waitlist_length",
                "referred_by",
                "groups",
                "created_at",
                "updated_at",
                "ip_address",
            ],
            Resource::Rewards => &[
                "id",
                "descriptor",
                "name",
                "type",
                "user_role",
                "user_id",
                "status",
                "earned_at",
                "delivered_at",
                "revoked_at",
            ],
            Resource::Suppressions => &["id", "email", "user_id", "reason", "suppressed_at"],
            Resource::Points => &[
                "id",
                "quantity",
                "activity",
                "reason",
                "user_id",
                "created_at",
            ],
            Resource::Betas => &[
                "id",
                "name",
                "homepage_url",
                "testers_count",
                "impressions_count",
                "share_clicks_count",
                "share_signups_count",
                "imported_testers_count",
                "applied_testers_count",
                "invited_testers_count",
                "active_testers_count",
                "rejected_testers_count",
                "created_at",
                "updated_at",
            ],
        }
    }

    /// The typed columns of its SQLite table (beyond the keys and the
    /// whole record as JSON), with their SQL types.
    pub fn sql_columns(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Resource::Testers => &[
                ("email", "TEXT"),
                ("status", "TEXT"),
                ("referral_code", "TEXT"),
                ("created_at", "TEXT"),
                ("updated_at", "TEXT"),
            ],
            Resource::Rewards => &[
                ("user_id", "INTEGER"),
                ("descriptor", "TEXT"),
                ("status", "TEXT"),
                ("earned_at", "TEXT"),
            ],
            Resource::Suppressions => &[
                ("email", "TEXT"),
                ("user_id", "INTEGER"),
                ("reason", "TEXT"),
            ],
            Resource::Points => &[
                ("user_id", "INTEGER"),
                ("quantity", "INTEGER"),
                ("activity", "TEXT"),
                ("created_at", "TEXT"),
            ],
            Resource::Betas => &[("name", "TEXT"), ("testers_count", "INTEGER")],
        }
    }

    /// The column given an index: email where there is one, else user_id.
    pub fn indexed(self) -> Option<&'static str> {
        match self {
            Resource::Testers | Resource::Suppressions => Some("email"),
            Resource::Rewards | Resource::Points => Some("user_id"),
            Resource::Betas => None,
        }
    }
}
