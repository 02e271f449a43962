//! Command-line flags. clap types live here only; `config` turns them into
//! plain settings that the core takes.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use std::time::Duration;

use crate::api::{Quota, RateOverride};
use crate::export::sink::Format;
use crate::import::input::Encoding;
use crate::import::mapping::EmptyCells;
use crate::import::presets::MailchimpList;
use crate::import::{Mode, Resolve};

/// `--mode` of the import (the core's [`Mode`] knows nothing of clap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Create users that are new, update those that exist.
    Upsert,
    /// Only create; a user that exists is rejected.
    Create,
    /// Only update; a user that does not exist is rejected.
    Update,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Upsert => Mode::Upsert,
            ModeArg::Create => Mode::Create,
            ModeArg::Update => Mode::Update,
        }
    }
}

/// `--resolve` of the import.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ResolveArg {
    /// List the whole project once into the checkpoint.
    List,
    /// Look each email up (`email_is`).
    Lookup,
}

impl From<ResolveArg> for Resolve {
    fn from(r: ResolveArg) -> Resolve {
        match r {
            ResolveArg::List => Resolve::List,
            ResolveArg::Lookup => Resolve::Lookup,
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "prefsync",
    version,
    about = "Bulk import, export and sync for Prefinery waitlists",
    long_about = "Bulk import, export and sync for Prefinery waitlists, through the REST API v2.\n\n\
The API key comes from PREFINERY_API_KEY or --api-key-file; it is never taken as a flag \
(it would show in `ps`), never put in a URL, and never printed."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Read the API key from the first line of this file (instead of PREFINERY_API_KEY).
    #[arg(long, global = true, value_name = "PATH")]
    pub api_key_file: Option<PathBuf>,

    /// The API's base URL. Plain http:// is accepted only for loopback hosts (the sandbox).
    #[arg(
        long,
        global = true,
        env = "PREFINERY_BASE_URL",
        value_name = "URL",
        default_value = "https://api.prefinery.com/api/v2"
    )]
    pub base_url: String,

    /// The project: its numeric API Beta ID or its project UID (Settings > General). Repeatable for export.
    #[arg(
        long = "beta",
        global = true,
        env = "PREFINERY_BETA",
        value_name = "ID"
    )]
    pub betas: Vec<String>,

    /// Override a rate quota, e.g. testers-list=60/1m, betas=90/15m, writes=20/1s. Repeatable.
    #[arg(long = "rate", global = true, value_name = "CLASS=N/PERIOD")]
    pub rates: Vec<RateOverride>,

    /// More logging (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Only errors; no progress.
    #[arg(short, long, global = true)]
    pub quiet: bool,

    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Verify the key and the project, and list which permissions the key has.
    Check,
    /// List the company's projects.
    Betas,
    /// Run a Prefinery-compatible sandbox server for rehearsals and tests.
    Sandbox(SandboxArgs),
    /// Run the whole job on an embedded sandbox: no key, no network needed.
    Demo(DemoArgs),
    /// Import users from a CSV file (create and update, resumable).
    Import(ImportCmd),
    /// List the runs a checkpoint holds and their state.
    Runs(RunsArgs),
    /// Export users, rewards, suppressions, points or projects (resumable).
    Export(ExportArgs),
    /// The compiled-in mappings for other tools' exports (--preset).
    Preset(PresetCmd),
    /// Send only what changed: compare a file with the local mirror (refreshed when stale).
    Sync(SyncCmd),
    /// Write what a sync would do, one line per field change, for review; sends nothing.
    Plan(PlanCmd),
    /// Do exactly a plan written by `plan`: each update or delete checked for drift first.
    #[command(after_help = APPLY_HELP)]
    Apply(ApplyArgs),
    /// Bulk: add points to users from a CSV (email, quantity, reason). Exactly once, resumable.
    Points(PointsCmd),
    /// Bulk: issue, deliver or revoke rewards from a CSV. Exactly once, resumable.
    Rewards(RewardsCmd),
    /// Bulk: add or remove email suppressions from a CSV (resumable).
    Suppressions(SuppressionsCmd),
    /// Bulk: delete or check in users from a CSV (resumable).
    Testers(TestersCmd),
    /// Keep a mirror current from Prefinery's webhooks (an HTTP server).
    Listen(ListenArgs),
}

#[derive(Debug, Args)]
pub struct ListenArgs {
    /// The mirror (SQLite export file) to keep current; created if absent.
    #[arg(long, value_name = "FILE")]
    pub mirror: PathBuf,
    /// The project's webhook signing secret(s), one a line (several during a rotation).
    #[arg(long, value_name = "PATH")]
    pub secret_file: PathBuf,
    /// Address to listen on (put a TLS-terminating proxy in front: Prefinery requires HTTPS).
    #[arg(long, default_value = "127.0.0.1:8788", value_name = "ADDR:PORT")]
    pub bind: String,
    /// The path Prefinery posts to.
    #[arg(long, default_value = "/prefinery", value_name = "PATH")]
    pub path: String,
    /// How far a signature's time may be from now, e.g. 5m.
    #[arg(long, default_value = "5m", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub tolerance: Duration,
    /// Events journalled and not yet applied past which deliveries are answered 429.
    #[arg(long, default_value_t = 100_000, value_name = "N")]
    pub max_pending: u64,
    /// After Ctrl-C or SIGTERM, how long to go on applying what is journalled.
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub drain: Duration,
    /// Write the bound port here once listening (with --bind ADDR:0).
    #[arg(long, value_name = "PATH")]
    pub port_file: Option<PathBuf>,
}

/// The flags every bulk operation takes (points, rewards, suppressions,
/// deletes, check-ins): its input, its checkpoint and reports, and how it
/// runs.
#[derive(Debug, Clone, Args)]
pub struct BulkArgs {
    /// The CSV file (a header row is required); - reads standard input (no resume then).
    #[arg(long, value_name = "PATH")]
    pub file: String,
    /// Column renames (TOML, `[columns] "Header in the file" = "email"`).
    #[arg(long, value_name = "FILE")]
    pub map: Option<PathBuf>,
    /// Read what is needed, write nothing; print the counts and write the plan with --results.
    #[arg(long)]
    pub dry_run: bool,
    /// Concurrent workers.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// The checkpoint database (one file holds many runs).
    #[arg(
        long,
        default_value = "prefsync-checkpoint.sqlite",
        value_name = "PATH"
    )]
    pub checkpoint: PathBuf,
    /// The rejected-rows report (default: beside the checkpoint).
    #[arg(long, value_name = "PATH")]
    pub errors: Option<PathBuf>,
    /// One line per input line: line, key, action, Prefinery id.
    #[arg(long, value_name = "PATH")]
    pub results: Option<PathBuf>,
    /// Write the final summary as JSON here.
    #[arg(long, value_name = "PATH")]
    pub summary_json: Option<PathBuf>,
    /// Start over instead of resuming; after a finished run, send the file again.
    #[arg(long)]
    pub fresh: bool,
    /// Stop cleanly (resumable, exit 5) after this long, e.g. 30m, 2h.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub max_duration: Option<Duration>,
    /// Input encoding (detected by default): utf-8 or windows-1252 (latin-1).
    #[arg(long)]
    pub encoding: Option<Encoding>,
    /// Field delimiter (detected by default): , ; or tab (\t).
    #[arg(long, value_parser = parse_delimiter)]
    pub delimiter: Option<char>,
    /// In the rejected-rows report, put a ' before cells that Excel would run as formulas.
    #[arg(long)]
    pub excel_safe: bool,
}

#[derive(Debug, Args)]
pub struct PointsCmd {
    #[command(subcommand)]
    pub what: PointsWhat,
}

#[derive(Debug, Subcommand)]
pub enum PointsWhat {
    /// Give each row's user its points: columns email, quantity (a non-zero whole number), reason (optional).
    #[command(after_help = POINTS_ADD_HELP)]
    Add(PointsAddArgs),
}

const POINTS_ADD_HELP: &str = "\
Exactly once: each point's reason ends with a marker, [ps:RUN:LINE] (this run's token and the \
row's line), shown on the user's profile. When an answer is lost or the run is killed with calls \
in flight, the user's points are listed (points-list quota, 60 a minute) and the marker tells \
whether the point was given. With --no-marker the reason is sent as it is and such a row is sent \
again: at least once, a point may be given twice. A file already done is not sent again unless \
--fresh.

Example:
  printf 'email,quantity,reason\\nada@example.com,10,Conference\\n' > points.csv
  prefsync points add --beta 1 --file points.csv --dry-run
  prefsync points add --beta 1 --file points.csv";

#[derive(Debug, Args)]
pub struct PointsAddArgs {
    #[command(flatten)]
    pub bulk: BulkArgs,
    /// Send each reason as it is, without the marker: a point whose answer is lost is sent again
    /// (at least once, not exactly once).
    #[arg(long)]
    pub no_marker: bool,
}

#[derive(Debug, Args)]
pub struct RewardsCmd {
    #[command(subcommand)]
    pub what: RewardsWhat,
}

#[derive(Debug, Subcommand)]
pub enum RewardsWhat {
    /// Issue each row's user a reward by its descriptor: columns email, descriptor.
    #[command(after_help = REWARDS_ISSUE_HELP)]
    Issue(RewardsIssueArgs),
    /// Mark rewards delivered: column reward_id, or email and descriptor.
    #[command(after_help = REWARDS_DELIVER_HELP)]
    Deliver(RewardsChangeArgs),
    /// Revoke rewards: column reward_id, or email and descriptor.
    #[command(after_help = REWARDS_REVOKE_HELP)]
    Revoke(RewardsChangeArgs),
}

const REWARDS_ISSUE_HELP: &str = "\
A user who already holds the reward (earned or delivered) is left unchanged, unless --again. \
Exactly once: before each create the user's rewards with that descriptor are listed and their \
ids kept in the checkpoint; when an answer is lost or the run is killed with calls in flight, \
they are listed again and a new one is this row's. Costs a rewards-list call a row (60 a minute).

Example:
  printf 'email,descriptor\\nada@example.com,early-access\\n' > issue.csv
  prefsync rewards issue --beta 1 --file issue.csv";

const REWARDS_DELIVER_HELP: &str = "\
A reward already delivered is left unchanged; a revoked one is rejected. A row names the reward by \
reward_id, or by email and descriptor (the user's one reward with that descriptor; several are \
rejected, naming their ids).

Example:
  printf 'reward_id\\n1234\\n' > deliver.csv
  prefsync rewards deliver --beta 1 --file deliver.csv";

const REWARDS_REVOKE_HELP: &str = "\
A reward already revoked is left unchanged. A row names the reward by reward_id, or by email and \
descriptor (the user's one reward with that descriptor; several are rejected, naming their ids).

Example:
  printf 'email,descriptor\\nada@example.com,early-access\\n' > revoke.csv
  prefsync rewards revoke --beta 1 --file revoke.csv";

#[derive(Debug, Args)]
pub struct RewardsIssueArgs {
    #[command(flatten)]
    pub bulk: BulkArgs,
    /// Issue the reward even to a user who already holds it.
    #[arg(long)]
    pub again: bool,
}

#[derive(Debug, Args)]
pub struct RewardsChangeArgs {
    #[command(flatten)]
    pub bulk: BulkArgs,
}

#[derive(Debug, Args)]
pub struct SuppressionsCmd {
    #[command(subcommand)]
    pub what: SuppressionsWhat,
}

#[derive(Debug, Subcommand)]
pub enum SuppressionsWhat {
    /// Suppress emails: columns email, reason (Manual, the default, or Unsubscribe).
    #[command(after_help = "\
Unsubscribe also unsubscribes the user with that email: --dry-run counts those users first.
An email suppressed already (error 2702) is `unchanged`, never rejected.

Example:
  printf 'email,reason\\nann@example.com,Manual\\nbob@example.com,Unsubscribe\\n' > supp.csv
  prefsync suppressions add --beta 12345 --file supp.csv --dry-run
  prefsync suppressions add --beta 12345 --file supp.csv --results supp.results.csv")]
    Add(BulkArgs),
    /// Remove suppressions: columns suppression_id, or email.
    #[command(after_help = "\
A suppression that is not there (removed already) is `unchanged`.

Example:
  prefsync suppressions remove --beta 12345 --file unsuppress.csv --results unsuppress.results.csv")]
    Remove(BulkArgs),
}

#[derive(Debug, Args)]
pub struct TestersCmd {
    #[command(subcommand)]
    pub what: TestersWhat,
}

#[derive(Debug, Subcommand)]
pub enum TestersWhat {
    /// Delete users: columns id, or email. Refuses without --yes or --max-delete.
    #[command(after_help = "\
Before the first delete the users are counted (the run refuses without --yes, or past
--max-delete) and their records written to a backup CSV that `prefsync import testers` takes.
A user who is not there (deleted already) is `unchanged`.

Example:
  prefsync testers delete --beta 12345 --file leavers.csv --dry-run
  prefsync testers delete --beta 12345 --file leavers.csv --max-delete 500 --backup leavers.backup.csv")]
    Delete(DeleteArgs),
    /// Check users in (each check-in is a visit): columns id, or email.
    #[command(after_help = "\
Not idempotent: a check-in sent twice counts two visits. Each user is read before the
check-in; after an unknown outcome or a kill, it is read again and the check-in is sent
again only if the user shows no new check-in. A finished file is not sent again (--fresh).

Example:
  prefsync testers checkin --beta 12345 --file logins.csv --results logins.results.csv")]
    Checkin(BulkArgs),
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub bulk: BulkArgs,
    /// Delete however many users the file names (without it, or --max-delete, the run refuses).
    #[arg(long)]
    pub yes: bool,
    /// Delete only if at most N users would be deleted; refuse otherwise.
    #[arg(long, value_name = "N")]
    pub max_delete: Option<u64>,
    /// The backup of the deleted users' records (default: beside the checkpoint, named after the run).
    #[arg(long, value_name = "PATH")]
    pub backup: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PlanCmd {
    #[command(subcommand)]
    pub what: PlanWhat,
}

#[derive(Debug, Subcommand)]
pub enum PlanWhat {
    /// Users: the plan of `sync testers` with the same flags.
    #[command(after_help = "Example:
  prefsync plan testers --beta 1 --file waitlist.csv --mirror project.sqlite --out plan.csv
  (review plan.csv in a spreadsheet; do not save it back: apply refuses an edited plan)
  prefsync apply plan.csv")]
    Testers(PlanArgs),
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub sync: SyncArgs,
    /// Where the plan goes (its identity goes beside it, PATH.json).
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
}

const APPLY_HELP: &str = "\
Before each update or delete the user is read (a show call, not the 60-a-minute list): a user \
changed since the plan is not touched and is reported as drift, with what changed. --on-drift skip \
(the default) goes on with the rest; stop stops there (resumable). A run with any drift exits 4 \
(or 5 when stopped), never 0.

Example:
  prefsync apply plan.csv --results applied.csv";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnDrift {
    /// Leave the drifted user, do the rest of the plan.
    Skip,
    /// Stop at the first drift (resumable).
    Stop,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The plan written by `prefsync plan`.
    pub plan: PathBuf,
    /// The mirror to keep current (default: the one the plan was made from).
    #[arg(long, value_name = "FILE")]
    pub mirror: Option<PathBuf>,
    /// What a drift does to the rest of the plan.
    #[arg(long, value_enum, default_value_t = OnDrift::Skip)]
    pub on_drift: OnDrift,
    /// Concurrent workers.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Read what is needed, write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// The checkpoint database (one file holds many runs).
    #[arg(
        long,
        default_value = "prefsync-checkpoint.sqlite",
        value_name = "PATH"
    )]
    pub checkpoint: PathBuf,
    /// The rejected-rows report (drift included).
    #[arg(long, value_name = "PATH")]
    pub errors: Option<PathBuf>,
    /// One line per plan action: line, email, action, Prefinery id.
    #[arg(long, value_name = "PATH")]
    pub results: Option<PathBuf>,
    /// Write the final summary as JSON here.
    #[arg(long, value_name = "PATH")]
    pub summary_json: Option<PathBuf>,
    /// Stop cleanly (resumable, exit 5) after this long.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub max_duration: Option<Duration>,
    /// Start over instead of resuming.
    #[arg(long)]
    pub fresh: bool,
}

#[derive(Debug, Args)]
pub struct SyncCmd {
    #[command(subcommand)]
    pub what: SyncWhat,
}

#[derive(Debug, Subcommand)]
pub enum SyncWhat {
    /// Users: create the new, update the fields that differ, leave the rest (no call for them).
    #[command(after_help = SYNC_HELP)]
    Testers(SyncArgs),
}

const SYNC_HELP: &str = "\
The mirror is the SQLite file `prefsync export testers --format sqlite` writes. When its latest \
listing of the project is older than --max-age, incomplete or filtered, the project is listed into \
it first (resumable). Then each row is compared with the mirror: calls are made only for rows that \
changed, and what the API returns is written back. A suppressed email is never created again; an \
unsubscribed user's status is never sent.

Example:
  prefsync sync testers --beta 1 --file waitlist.csv --mirror project.sqlite --max-age 12h
  prefsync sync testers --beta 1 --file waitlist.csv --mirror project.sqlite \\
    --delete-missing --max-delete 2% --backup removed.csv";

#[derive(Debug, Args)]
pub struct SyncArgs {
    #[command(flatten)]
    pub import: ImportArgs,
    /// The local mirror (a SQLite export file; created if missing).
    #[arg(long, value_name = "FILE")]
    pub mirror: PathBuf,
    /// Refresh the mirror first when its latest listing is older than this.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub max_age: Duration,
    /// Refresh the mirror first whatever its age.
    #[arg(long)]
    pub refresh: bool,
    /// Delete users of the project that are in no row of the file (needs --max-delete).
    #[arg(long)]
    pub delete_missing: bool,
    /// The most users --delete-missing may delete: a count (500) or a share of the project (2%).
    #[arg(long, value_name = "N|N%")]
    pub max_delete: Option<crate::sync::DeleteBound>,
    /// Where the users --delete-missing deletes are written first (default beside the mirror).
    #[arg(long, value_name = "PATH")]
    pub backup: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PresetCmd {
    #[command(subcommand)]
    pub what: PresetWhat,
}

#[derive(Debug, Subcommand)]
pub enum PresetWhat {
    /// The presets, one a line.
    List,
    /// Print a preset's mapping file (copy it, change it, pass it with --map).
    Show {
        /// The preset's name (see `prefsync preset list`).
        name: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportWhat {
    Testers,
    Rewards,
    Suppressions,
    Points,
    Betas,
    /// Users, rewards, suppressions and points of each project, into one SQLite file.
    All,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// What to export.
    #[arg(value_enum)]
    pub what: ExportWhat,
    /// csv, jsonl or sqlite.
    #[arg(long, value_name = "csv|jsonl|sqlite")]
    pub format: Option<Format>,
    /// The output file (written beside, then renamed into place; SQLite is updated in place).
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// Every project of the company (SQLite output).
    #[arg(long)]
    pub all_betas: bool,
    /// Users whose email contains this (testers).
    #[arg(long)]
    pub email_contains: Option<String>,
    /// Users whose first or last name matches (testers).
    #[arg(long)]
    pub name: Option<String>,
    /// Users with this referral code (testers).
    #[arg(long)]
    pub referral_code: Option<String>,
    /// Users with this value in custom_var1..3 (testers).
    #[arg(long)]
    pub custom_vars: Option<String>,
    /// Rewards with this status: earned, delivered or revoked (rewards).
    #[arg(long)]
    pub status: Option<String>,
    /// Records of the user with this email (rewards, suppressions, points).
    #[arg(long)]
    pub email: Option<String>,
    /// The checkpoint for CSV and JSONL (default: beside the output). SQLite output holds its own.
    #[arg(long, value_name = "PATH")]
    pub checkpoint: Option<PathBuf>,
    /// Write the final summary as JSON here.
    #[arg(long, value_name = "PATH")]
    pub summary_json: Option<PathBuf>,
    /// Stop cleanly (resumable, exit 5) after this long, e.g. 30m.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub max_duration: Option<Duration>,
    /// Neutralise cells a spreadsheet would run as formulas (leading = + - @ tab CR) with a leading '.
    #[arg(long)]
    pub excel_safe: bool,
    /// Start the CSV with a UTF-8 byte order mark (for Excel).
    #[arg(long)]
    pub bom: bool,
    /// Start over instead of resuming an unfinished export to the same output.
    #[arg(long)]
    pub fresh: bool,
}

#[derive(Debug, Args)]
pub struct ImportCmd {
    #[command(subcommand)]
    pub what: ImportWhat,
}

#[derive(Debug, Subcommand)]
pub enum ImportWhat {
    /// Users ("testers" in the API).
    Testers(ImportTestersArgs),
}

#[derive(Debug, Args)]
pub struct ImportTestersArgs {
    #[command(flatten)]
    pub import: ImportArgs,
    /// A local mirror (SQLite export file) to keep current: each created or updated user, as
    /// the API returned it, is written to it.
    #[arg(long, value_name = "FILE")]
    pub mirror: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The CSV file (a header row is required); - reads standard input (no resume then).
    #[arg(long, value_name = "PATH")]
    pub file: String,
    /// upsert: create new users, update existing ones; create or update restrict it.
    #[arg(long, value_enum, default_value_t = ModeArg::Upsert)]
    pub mode: ModeArg,
    /// Column mapping (TOML): rename, ignore, constants, values, dates, lists, rules. See samples/map.toml.
    #[arg(long, value_name = "FILE")]
    pub map: Option<PathBuf>,
    /// The mapping for another tool's export: mailchimp, getwaitlist, viral-loops, kickofflabs,
    /// referralhero, launchlist, or auto (recognised from the header row). --map overrides its entries.
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
    /// Which Mailchimp file this is (default: told from Mailchimp's file name; never guessed).
    #[arg(long, value_name = "subscribed|unsubscribed|cleaned")]
    pub mailchimp_list: Option<MailchimpList>,
    /// Import rows that skip_if rules (spam, fraud flags) would skip. Opted-out people stay out.
    #[arg(long)]
    pub include_flagged: bool,
    /// Status for new users [default: imported, or the preset's: applied]. invited, rejected and
    /// unconfirmed email people: they need --allow-emails.
    #[arg(long)]
    pub status: Option<String>,
    /// Allow statuses that make Prefinery email people (invited, rejected, unconfirmed).
    #[arg(long)]
    pub allow_emails: bool,
    /// Concurrent workers.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Read what is needed, write nothing; print the counts and write the plan with --results.
    #[arg(long)]
    pub dry_run: bool,
    /// The checkpoint database (one file holds many runs).
    #[arg(
        long,
        default_value = "prefsync-checkpoint.sqlite",
        value_name = "PATH"
    )]
    pub checkpoint: PathBuf,
    /// The rejected-rows report (default: beside the checkpoint).
    #[arg(long, value_name = "PATH")]
    pub errors: Option<PathBuf>,
    /// One line per input line: line, email, action, Prefinery id.
    #[arg(long, value_name = "PATH")]
    pub results: Option<PathBuf>,
    /// Write the final summary as JSON here.
    #[arg(long, value_name = "PATH")]
    pub summary_json: Option<PathBuf>,
    /// Start over instead of resuming the unfinished run for this file and project.
    #[arg(long)]
    pub fresh: bool,
    /// Stop cleanly (resumable, exit 5) after this long, e.g. 30m, 2h.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub max_duration: Option<Duration>,
    /// Input encoding (detected by default): utf-8 or windows-1252 (latin-1).
    #[arg(long)]
    pub encoding: Option<Encoding>,
    /// Field delimiter (detected by default): , ; or tab (\t).
    #[arg(long, value_parser = parse_delimiter)]
    pub delimiter: Option<char>,
    /// Refuse columns that map to nothing (by default they are listed and ignored).
    #[arg(long)]
    pub strict: bool,
    /// What an empty cell does on update: keep the field, or clear it.
    #[arg(long, value_name = "keep|clear", default_value = "keep")]
    pub empty: EmptyCells,
    /// How to tell existing users from new ones (default: the cheaper in API calls).
    #[arg(long, value_enum)]
    pub resolve: Option<ResolveArg>,
    /// In the rejected-rows report, put a ' before cells that start with =, +, -, @, tab or CR
    /// (Excel would run them as formulas). Off by default: the report is fed back in as it is.
    #[arg(long)]
    pub excel_safe: bool,
}

fn parse_delimiter(s: &str) -> Result<char, String> {
    match s {
        "," => Ok(','),
        ";" => Ok(';'),
        "\\t" | "\t" | "tab" => Ok('\t'),
        _ => Err("expected , ; or tab".into()),
    }
}

#[derive(Debug, Args)]
pub struct RunsArgs {
    /// The checkpoint database.
    #[arg(
        long,
        default_value = "prefsync-checkpoint.sqlite",
        value_name = "PATH"
    )]
    pub checkpoint: PathBuf,
}

#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// Port to listen on (0 = any free port).
    #[arg(long, default_value_t = 8787)]
    pub port: u16,
    /// Write the port here once listening.
    #[arg(long, value_name = "PATH")]
    pub port_file: Option<PathBuf>,
    /// Keys and their permissions (TOML or JSON); default: `sandbox-key` with every permission.
    #[arg(long, value_name = "FILE")]
    pub keys: Option<PathBuf>,
    /// Multiply the documented rate limits (60 turns 60/min into 60/s); 0 turns them off.
    #[arg(long, default_value_t = 1.0)]
    pub rate_scale: f64,
    /// The status a throttled request gets.
    #[arg(long, default_value_t = 503, value_parser = parse_throttle_status)]
    pub throttle_status: u16,
    /// Throttle writes past this many per period, for all projects together
    /// (not a documented limit; off by default), e.g. 100/1s.
    #[arg(long, value_name = "N/PERIOD")]
    pub write_limit: Option<Quota>,
    /// Send Retry-After with this many seconds on throttled answers.
    #[arg(long, value_name = "SECONDS")]
    pub retry_after: Option<u64>,
    /// Seed for fault injection.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Probability of a 5xx before the request is applied.
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Probability that a write is applied and then answered by a 5xx or a dropped connection.
    #[arg(long, default_value_t = 0.0)]
    pub fail_after_write_rate: f64,
    /// Probability that the connection drops before the request is applied.
    #[arg(long, default_value_t = 0.0)]
    pub drop_rate: f64,
    /// Added latency per request, MIN:MAX in milliseconds.
    #[arg(long, value_name = "MIN:MAX")]
    pub latency_ms: Option<String>,
    /// Seed project 1 with users user{i}@example.com (plus rewards, points, suppressions).
    #[arg(long, default_value_t = 0)]
    pub seed_testers: usize,
    /// Persist the state to this SQLite file (in memory by default).
    #[arg(long, value_name = "PATH")]
    pub state: Option<PathBuf>,
    /// Add a total_count key to X-Pagination (the real key's name is unknown).
    #[arg(long)]
    pub total_key: bool,
    /// Send a signed webhook to this URL for every state change (as Prefinery does).
    #[arg(long, value_name = "URL")]
    pub webhook_url: Option<String>,
    /// The webhooks' signing secret (a rehearsal's, not a real project's).
    #[arg(long, value_name = "SECRET", requires = "webhook_url")]
    pub webhook_secret: Option<String>,
    /// Probability that a webhook is delivered twice.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub webhook_duplicate_rate: f64,
    /// Deliver waiting webhooks in shuffled order.
    #[arg(long)]
    pub webhook_reorder: bool,
    /// A random delay before each delivery, MIN:MAX in milliseconds.
    #[arg(long, value_name = "MIN:MAX")]
    pub webhook_delay: Option<String>,
    /// Divide Prefinery's webhook retry schedule (5 s + N^4 s) by this (default: --rate-scale, or 1 when it is 0).
    #[arg(long, value_name = "F")]
    pub webhook_retry_scale: Option<f64>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where the demo writes its reports and exports.
    #[arg(long, default_value = "prefsync-demo")]
    pub dir: PathBuf,
}

fn parse_throttle_status(s: &str) -> Result<u16, String> {
    match s {
        "503" => Ok(503),
        "429" => Ok(429),
        _ => Err("expected 503 or 429".into()),
    }
}
