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

/// `--order` of the import.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OrderArg {
    /// As the file has them.
    File,
    /// By the map's order_by date, oldest first; concurrent.
    Sorted,
    /// Sorted; each create waits for the one before it.
    Strict,
}

impl From<OrderArg> for crate::engine::Order {
    fn from(o: OrderArg) -> crate::engine::Order {
        match o {
            OrderArg::File => crate::engine::Order::File,
            OrderArg::Sorted => crate::engine::Order::Sorted,
            OrderArg::Strict => crate::engine::Order::Strict,
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

/// The exit codes a subcommand's help ends with, by the kind of
/// subcommand. A macro so that `concat!` takes them into each
/// `after_help` at compile time; the numbers are [`crate::exit::Exit`]'s.
macro_rules! exit_codes {
    (run) => {
        "\n\nExit codes:
  0  done
  1  internal error
  2  usage or configuration error: a bad flag or file, no key, an unknown project
  3  the key was refused, or it lacks a permission the job needs
  4  finished, but some rows were rejected (see the errors report)
  5  stopped before the end (--max-duration, Ctrl-C, API unavailable): run it again to resume
  6  another run holds the lock
  7  the API could not be reached"
    };
    (export) => {
        "\n\nExit codes:
  0  done
  1  internal error
  2  usage or configuration error: a bad flag, no key, an unknown project
  3  the key was refused, or it lacks a permission the export needs
  5  stopped before the end (--max-duration, Ctrl-C, API unavailable): run it again to resume
  6  another run holds the lock
  7  the API could not be reached"
    };
    (check) => {
        "\n\nExit codes:
  0  the key works for the project (and has every permission --for names)
  1  internal error
  2  usage or configuration error: a bad flag, no key, an unknown project
  3  the key was refused, or it lacks a permission --for needs
  7  the API could not be reached"
    };
    (read) => {
        "\n\nExit codes:
  0  done
  1  internal error
  2  usage or configuration error: a bad flag, no key
  3  the key was refused, or it lacks Projects > Read
  7  the API could not be reached"
    };
    (listen) => {
        "\n\nExit codes:
  0  stopped cleanly (Ctrl-C or SIGTERM): what was journalled is applied or kept for the next start
  1  internal error
  2  usage or configuration error: a bad flag, no key, an unreadable secret file, an address in use
  3  the key was refused
  5  stopped at once by a second Ctrl-C or SIGTERM: the rest is applied at the next start"
    };
    (local) => {
        "\n\nExit codes:
  0  done
  1  internal error
  2  usage error: a bad flag or file"
    };
}

#[derive(Debug, Parser)]
#[command(
    name = "prefsync",
    version,
    about = "Bulk import, export and sync for Prefinery waitlists",
    long_about = "Bulk import, export and sync for Prefinery waitlists, through the REST API v2.\n\n\
The API key comes from PREFINERY_API_KEY, --api-key-file or PREFINERY_API_KEY_FILE (the first of \
these that is set wins, in this order: --api-key-file, PREFINERY_API_KEY_FILE, PREFINERY_API_KEY). \
It is never taken as a flag (it would show in `ps`), never put in a URL, and never printed.",
    after_help = concat!(
        "Examples:
  prefsync demo
  prefsync check --beta 12345 --for import
  prefsync import testers --beta 12345 --file waitlist.csv",
        exit_codes!(run)
    )
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(flatten)]
    pub leading: LeadingApiArgs,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// How to reach the API, for the subcommands that call it: the flags
    /// after the subcommand's name, with those given before it.
    pub fn api(&self) -> Option<ApiArgs> {
        let mut api = self.command.api()?.clone();
        let l = &self.leading;
        if l.api_key_file.is_some() && api.api_key_file.is_none() {
            api.api_key_file = l.api_key_file.clone();
        }
        if let Some(url) = &l.base_url {
            api.base_url = url.clone();
        }
        if !l.betas.is_empty() {
            // The subcommand's own holds PREFINERY_BETA when none was
            // given after it: a flag given before it wins over that.
            let from_env = std::env::var("PREFINERY_BETA").ok();
            let after: Vec<String> =
                if api.betas.len() == 1 && api.betas.first() == from_env.as_ref() {
                    vec![]
                } else {
                    std::mem::take(&mut api.betas)
                };
            api.betas = l.betas.iter().cloned().chain(after).collect();
        }
        api.rates = l.rates.iter().cloned().chain(api.rates).collect();
        Some(api)
    }
}

/// The API flags given before the subcommand (`prefsync --beta 1 import
/// testers ...`), as scripts written for earlier versions give them. Not
/// shown in any help: each subcommand that calls the API lists them as its
/// own (see [`ApiArgs`]); `Cli::api` merges the two.
#[derive(Debug, Clone, Default, Args)]
pub struct LeadingApiArgs {
    #[arg(id = "leading_api_key_file", long = "api-key-file", hide = true)]
    pub api_key_file: Option<PathBuf>,
    #[arg(id = "leading_base_url", long = "base-url", hide = true)]
    pub base_url: Option<String>,
    #[arg(id = "leading_beta", long = "beta", hide = true)]
    pub betas: Vec<String>,
    #[arg(id = "leading_rate", long = "rate", hide = true)]
    pub rates: Vec<RateOverride>,
}

/// What every subcommand takes: how much it logs, and how.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// More logging (-v debug, -vv trace) [default: info].
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Only errors; no progress.
    #[arg(short, long, global = true)]
    pub quiet: bool,

    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How to reach the API and which project: only the subcommands that call
/// the API take these (flattened into each; `global` so that a group's
/// subcommands, `import testers`, take them after their own name).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Connection")]
pub struct ApiArgs {
    /// Read the API key from the first line of this file [default: $PREFINERY_API_KEY_FILE, else
    /// the key in $PREFINERY_API_KEY].
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

    /// The project: its numeric API Beta ID or its project UID (Settings > General). Repeatable
    /// for export [default: $PREFINERY_BETA].
    #[arg(
        long = "beta",
        global = true,
        env = "PREFINERY_BETA",
        value_name = "ID"
    )]
    pub betas: Vec<String>,

    /// Override a rate quota, e.g. testers-list=60/1m, betas=90/15m, writes=20/1s. Repeatable
    /// [default: the documented quotas].
    #[arg(long = "rate", global = true, value_name = "CLASS=N/PERIOD")]
    pub rates: Vec<RateOverride>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `--output` of the commands that print a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// A table for people.
    Text,
    /// One JSON document on stdout, for scripts (keys in the README).
    Json,
}

/// A job `check --for` knows the permissions of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Job {
    /// import testers.
    Import,
    /// export testers.
    Export,
    /// sync testers (plan and apply too).
    Sync,
    /// points add.
    Points,
    /// rewards issue, deliver and revoke.
    Rewards,
    /// suppressions add and remove.
    Suppressions,
    /// testers delete.
    Delete,
    /// testers checkin.
    Checkin,
    /// listen (the webhook listener re-reads users, rewards and points).
    Listen,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Verify the key and the project, and list which permissions the key has.
    Check(CheckArgs),
    /// List the company's projects.
    Betas(BetasArgs),
    /// Run a Prefinery-compatible sandbox server for rehearsals and tests.
    #[command(after_help = concat!(
        "Examples:
  prefsync sandbox --port 8787 --seed-testers 100
  prefsync sandbox --port 0 --port-file port --rate-scale 0",
        exit_codes!(local)
    ))]
    Sandbox(SandboxArgs),
    /// Run the whole job on an embedded sandbox: no key, no network needed.
    #[command(after_help = concat!(
        "Examples:
  prefsync demo
  prefsync demo --dir /tmp/prefsync-demo",
        exit_codes!(local)
    ))]
    Demo(DemoArgs),
    /// Import users from a CSV file (create and update, resumable).
    Import(ImportCmd),
    /// List the runs a checkpoint holds and their state (opens the file read-only).
    #[command(after_help = concat!(
        "The file is opened read-only and never changed. A file that is not a checkpoint is named \
for what it is: an export or mirror (its export runs are listed), an export's checkpoint, \
another SQLite database, or not SQLite at all (exit 2). A run stopped before its input was read \
to the end shows its rows as N+ (more may follow).

Examples:
  prefsync runs
  prefsync runs --checkpoint nightly.sqlite --output json
  prefsync runs --checkpoint project.sqlite",
        exit_codes!(local)
    ))]
    Runs(RunsArgs),
    /// Export users, rewards, suppressions, points or projects (resumable).
    #[command(after_help = concat!(
        "The format is guessed from the --out extension; an explicit --format that contradicts a \
known extension (--format jsonl --out users.csv) is refused.

Examples:
  prefsync export testers --beta 12345 --out users.csv
  prefsync export testers --beta 12345 --out project.sqlite --max-duration 50m
  prefsync export all --all-betas --out company.sqlite",
        exit_codes!(export)
    ))]
    Export(ExportArgs),
    /// The compiled-in mappings for other tools' exports (--preset).
    Preset(PresetCmd),
    /// Send only what changed: compare a file with the local mirror (refreshed when stale).
    Sync(SyncCmd),
    /// Write what a sync would do, one line per field change, for review; sends nothing.
    Plan(PlanCmd),
    /// Do exactly a plan written by `plan`: each update or delete checked for drift first.
    #[command(after_help = concat!(
        "Before each update or delete the user is read (a show call, not the 60-a-minute list): a \
user changed since the plan is not touched and is reported as drift, with what changed. \
--on-drift skip (the default) goes on with the rest; stop stops there (resumable). A run with \
any drift exits 4 (or 5 when stopped), never 0.

Examples:
  prefsync apply plan.csv --results applied.csv
  prefsync apply plan.csv --on-drift stop --max-duration 1h",
        exit_codes!(run)
    ))]
    Apply(ApplyArgs),
    /// Bulk: add points to users from a CSV (email, quantity, reason). Exactly once, resumable.
    Points(PointsCmd),
    /// Bulk: issue, deliver or revoke rewards from a CSV. Exactly once, resumable.
    Rewards(RewardsCmd),
    /// Bulk: add or remove email suppressions from a CSV (resumable).
    Suppressions(SuppressionsCmd),
    /// Bulk: delete or check in users from a CSV (resumable).
    Testers(TestersCmd),
    /// Print a shell completion script (from the same definitions as the flags).
    #[command(after_help = concat!(
        "Examples:
  prefsync completions bash > /etc/bash_completion.d/prefsync
  prefsync completions zsh > ~/.zfunc/_prefsync
  prefsync completions fish > ~/.config/fish/completions/prefsync.fish",
        exit_codes!(local)
    ))]
    Completions(CompletionsArgs),
    /// Print the man page (roff), or write one page per subcommand with --out.
    #[command(after_help = concat!(
        "Examples:
  prefsync man | man -l -
  prefsync man --out /usr/local/share/man/man1",
        exit_codes!(local)
    ))]
    Man(ManArgs),
    /// Keep a mirror current from Prefinery's webhooks (an HTTP server).
    #[command(after_help = concat!(
        "Put a TLS-terminating proxy in front (Prefinery requires HTTPS); see the README, \
\"Keeping a mirror current\".

Examples:
  prefsync listen --beta 12345 --mirror mirror.sqlite --secret-file secret.txt
  prefsync listen --beta 1 --mirror m.sqlite --secret-file s --bind 0.0.0.0:80",
        exit_codes!(listen)
    ))]
    Listen(ListenArgs),
}

impl Command {
    /// How to reach the API, for the subcommands that call it.
    pub fn api(&self) -> Option<&ApiArgs> {
        match self {
            Command::Check(a) => Some(&a.api),
            Command::Betas(a) => Some(&a.api),
            Command::Import(a) => Some(&a.api),
            Command::Export(a) => Some(&a.api),
            Command::Sync(a) => Some(&a.api),
            Command::Plan(a) => Some(&a.api),
            Command::Apply(a) => Some(&a.api),
            Command::Points(a) => Some(&a.api),
            Command::Rewards(a) => Some(&a.api),
            Command::Suppressions(a) => Some(&a.api),
            Command::Testers(a) => Some(&a.api),
            Command::Listen(a) => Some(&a.api),
            Command::Sandbox(_)
            | Command::Demo(_)
            | Command::Runs(_)
            | Command::Preset(_)
            | Command::Completions(_)
            | Command::Man(_) => None,
        }
    }
}

#[derive(Debug, Args)]
#[command(after_help = concat!(
    "Changes nothing: write permissions are probed with bodies the API refuses as invalid (403 \
means missing, a validation answer means granted). With --for JOB only what that job needs \
counts: a permission it needs that is missing exits 3, naming it, so a cron job can check first.

Examples:
  prefsync check --beta 12345
  prefsync check --beta 12345 --for import
  prefsync check --beta 12345 --for export --output json",
    exit_codes!(check)
))]
pub struct CheckArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// Say whether the key has every permission this job needs; exit 3 when not [default: every
    /// permission is listed, none is required].
    #[arg(long = "for", value_enum, value_name = "JOB")]
    pub for_job: Option<Job>,
    /// text for people, json for scripts.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Debug, Args)]
#[command(after_help = concat!(
    "Examples:
  prefsync betas
  prefsync betas --output json",
    exit_codes!(read)
))]
pub struct BetasArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// text for people, json for scripts.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write prefsync.1 and one page per subcommand (prefsync-import-testers.1, ...) into this
    /// folder [default: print prefsync.1 on stdout].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ListenArgs {
    #[command(flatten)]
    pub api: ApiArgs,
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
    /// Write the bound port here once listening (with --bind ADDR:0) [default: not written].
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
    /// Column renames (TOML, `[columns] "Header in the file" = "email"`) [default: the file's
    /// headers as they are].
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
    /// The rejected-rows report [default: beside the checkpoint, named after the run].
    #[arg(long, value_name = "PATH")]
    pub errors: Option<PathBuf>,
    /// One line per input line: line, key, action, Prefinery id [default: off].
    #[arg(long, value_name = "PATH")]
    pub results: Option<PathBuf>,
    /// Write the final summary as JSON here [default: off].
    #[arg(long, value_name = "PATH")]
    pub summary_json: Option<PathBuf>,
    /// Start over instead of resuming; after a finished run, send the file again.
    #[arg(long)]
    pub fresh: bool,
    /// Stop cleanly (resumable, exit 5) after this long, e.g. 30m, 2h [default: no limit].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub max_duration: Option<Duration>,
    /// Input encoding: utf-8 or windows-1252 (latin-1) [default: detected].
    #[arg(long)]
    pub encoding: Option<Encoding>,
    /// Field delimiter: , ; or tab (\t) [default: detected].
    #[arg(long, value_parser = parse_delimiter)]
    pub delimiter: Option<char>,
    /// In the rejected-rows report, put a ' before cells that Excel would run as formulas.
    #[arg(long)]
    pub excel_safe: bool,
}

#[derive(Debug, Args)]
pub struct PointsCmd {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub what: PointsWhat,
}

#[derive(Debug, Subcommand)]
pub enum PointsWhat {
    /// Give each row's user its points: columns email, quantity (a non-zero whole number), reason (optional).
    #[command(after_help = POINTS_ADD_HELP)]
    Add(PointsAddArgs),
}

const POINTS_ADD_HELP: &str = concat!(
    "Exactly once: each point's reason ends with a marker, [ps:RUN:LINE] (this run's token and the \
row's line), shown on the user's profile. When an answer is lost or the run is killed with calls \
in flight, the user's points are listed (points-list quota, 60 a minute) and the marker tells \
whether the point was given. With --no-marker the reason is sent as it is and such a row is sent \
again: at least once, a point may be given twice. A file already done is not sent again unless \
--fresh.

Examples:
  printf 'email,quantity,reason\\nada@example.com,10,Talk\\n' > points.csv
  prefsync points add --beta 1 --file points.csv --dry-run
  prefsync points add --beta 1 --file points.csv",
    exit_codes!(run)
);

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
    #[command(flatten)]
    pub api: ApiArgs,
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

const REWARDS_ISSUE_HELP: &str = concat!(
    "A user who already holds the reward (earned or delivered) is left unchanged, unless --again. \
Exactly once: before each create the user's rewards with that descriptor are listed and their \
ids kept in the checkpoint; when an answer is lost or the run is killed with calls in flight, \
they are listed again and a new one is this row's. Costs a rewards-list call a row (60 a minute).

Examples:
  printf 'email,descriptor\\nada@example.com,early-access\\n' > issue.csv
  prefsync rewards issue --beta 1 --file issue.csv --dry-run
  prefsync rewards issue --beta 1 --file issue.csv",
    exit_codes!(run)
);

const REWARDS_DELIVER_HELP: &str = concat!(
    "A reward already delivered is left unchanged; a revoked one is rejected. A row names the reward by \
reward_id, or by email and descriptor (the user's one reward with that descriptor; several are \
rejected, naming their ids).

Examples:
  printf 'reward_id\\n1234\\n' > deliver.csv
  prefsync rewards deliver --beta 1 --file deliver.csv --dry-run
  prefsync rewards deliver --beta 1 --file deliver.csv",
    exit_codes!(run)
);

const REWARDS_REVOKE_HELP: &str = concat!(
    "A reward already revoked is left unchanged. A row names the reward by reward_id, or by email and \
descriptor (the user's one reward with that descriptor; several are rejected, naming their ids).

Examples:
  printf 'email,descriptor\\nada@example.com,early-access\\n' > revoke.csv
  prefsync rewards revoke --beta 1 --file revoke.csv --dry-run
  prefsync rewards revoke --beta 1 --file revoke.csv",
    exit_codes!(run)
);

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
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub what: SuppressionsWhat,
}

#[derive(Debug, Subcommand)]
pub enum SuppressionsWhat {
    /// Suppress emails: columns email, reason (Manual, the default, or Unsubscribe).
    #[command(after_help = concat!("\
Unsubscribe also unsubscribes the user with that email: --dry-run counts those users first.
An email suppressed already (error 2702) is `unchanged`, never rejected.

Examples:
  printf 'email,reason\\nann@example.com,Manual\\n' > supp.csv
  prefsync suppressions add --beta 12345 --file supp.csv --dry-run
  prefsync suppressions add --beta 12345 --file supp.csv --results out.csv",
        exit_codes!(run)
    ))]
    Add(BulkArgs),
    /// Remove suppressions: columns suppression_id, or email.
    #[command(after_help = concat!("\
A suppression that is not there (removed already) is `unchanged`.

Examples:
  prefsync suppressions remove --beta 12345 --file unsup.csv --dry-run
  prefsync suppressions remove --beta 12345 --file unsup.csv --results out.csv",
        exit_codes!(run)
    ))]
    Remove(BulkArgs),
}

#[derive(Debug, Args)]
pub struct TestersCmd {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub what: TestersWhat,
}

#[derive(Debug, Subcommand)]
pub enum TestersWhat {
    /// Delete users: columns id, or email. Refuses without --yes or --max-delete.
    #[command(after_help = concat!("\
Before the first delete the users are counted (the run refuses without --yes, or past
--max-delete) and their records written to a backup CSV that `prefsync import testers` takes.
A user who is not there (deleted already) is `unchanged`.

Examples:
  prefsync testers delete --beta 12345 --file leavers.csv --dry-run
  prefsync testers delete --beta 12345 --file leavers.csv --max-delete 500 \\
    --backup leavers.backup.csv",
        exit_codes!(run)
    ))]
    Delete(DeleteArgs),
    /// Check users in (each check-in is a visit): columns id, or email.
    #[command(after_help = concat!("\
Not idempotent: a check-in sent twice counts two visits. Each user is read before the
check-in; after an unknown outcome or a kill, it is read again and the check-in is sent
again only if the user shows no new check-in. A finished file is not sent again (--fresh).

Examples:
  prefsync testers checkin --beta 12345 --file logins.csv --dry-run
  prefsync testers checkin --beta 12345 --file logins.csv --results out.csv",
        exit_codes!(run)
    ))]
    Checkin(BulkArgs),
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub bulk: BulkArgs,
    /// Delete however many users the file names (without it, or --max-delete, the run refuses).
    #[arg(long)]
    pub yes: bool,
    /// Delete only if at most N users would be deleted; refuse otherwise [default: no bound: the
    /// run refuses without --yes].
    #[arg(long, value_name = "N")]
    pub max_delete: Option<u64>,
    /// The backup of the deleted users' records [default: beside the checkpoint, named after the
    /// run].
    #[arg(long, value_name = "PATH")]
    pub backup: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PlanCmd {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub what: PlanWhat,
}

#[derive(Debug, Subcommand)]
pub enum PlanWhat {
    /// Users: the plan of `sync testers` with the same flags.
    #[command(after_help = concat!("\
Review the plan in a spreadsheet; do not save it back: apply refuses an edited plan.

Examples:
  prefsync plan testers --beta 1 --file waitlist.csv --mirror project.sqlite \\
    --out plan.csv
  prefsync apply plan.csv",
        exit_codes!(run)
    ))]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnDrift {
    /// Leave the drifted user, do the rest of the plan.
    Skip,
    /// Stop at the first drift (resumable).
    Stop,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// The plan written by `prefsync plan`.
    pub plan: PathBuf,
    /// The mirror to keep current [default: the one the plan was made from].
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
    /// The rejected-rows report (drift included) [default: beside the checkpoint].
    #[arg(long, value_name = "PATH")]
    pub errors: Option<PathBuf>,
    /// One line per plan action: line, email, action, Prefinery id [default: off].
    #[arg(long, value_name = "PATH")]
    pub results: Option<PathBuf>,
    /// Write the final summary as JSON here [default: off].
    #[arg(long, value_name = "PATH")]
    pub summary_json: Option<PathBuf>,
    /// Stop cleanly (resumable, exit 5) after this long [default: no limit].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub max_duration: Option<Duration>,
    /// Start over instead of resuming.
    #[arg(long)]
    pub fresh: bool,
}

#[derive(Debug, Args)]
pub struct SyncCmd {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub what: SyncWhat,
}

#[derive(Debug, Subcommand)]
pub enum SyncWhat {
    /// Users: create the new, update the fields that differ, leave the rest (no call for them).
    #[command(after_help = SYNC_HELP)]
    Testers(SyncArgs),
}

const SYNC_HELP: &str = concat!(
    "The mirror is the SQLite file `prefsync export testers --format sqlite` writes. When its latest \
listing of the project is older than --max-age, incomplete or filtered, the project is listed into \
it first (resumable). Then each row is compared with the mirror: calls are made only for rows that \
changed, and what the API returns is written back. A suppressed email is never created again; an \
unsubscribed user's status is never sent.

Examples:
  prefsync sync testers --beta 1 --file waitlist.csv --mirror project.sqlite \\
    --max-age 12h
  prefsync sync testers --beta 1 --file waitlist.csv --mirror project.sqlite \\
    --delete-missing --max-delete 2% --backup removed.csv",
    exit_codes!(run)
);

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
    /// The most users --delete-missing may delete: a count (500) or a share of the project (2%)
    /// [default: none: --delete-missing refuses without it].
    #[arg(long, value_name = "N|N%")]
    pub max_delete: Option<crate::sync::DeleteBound>,
    /// Where the users --delete-missing deletes are written first [default: beside the mirror].
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
    #[command(after_help = concat!(
        "Examples:
  prefsync preset list
  prefsync preset show mailchimp",
        exit_codes!(local)
    ))]
    List,
    /// Print a preset's mapping file (copy it, change it, pass it with --map).
    #[command(after_help = concat!(
        "Examples:
  prefsync preset show mailchimp > map.toml
  prefsync import testers --beta 1 --file members.csv --preset mailchimp \\
    --map map.toml",
        exit_codes!(local)
    ))]
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
    #[command(flatten)]
    pub api: ApiArgs,
    /// What to export.
    #[arg(value_enum)]
    pub what: ExportWhat,
    /// csv, jsonl or sqlite [default: guessed from the --out extension: .csv, .jsonl or .ndjson,
    /// .sqlite, .sqlite3 or .db]. A format that contradicts a known extension is refused.
    #[arg(long, value_name = "csv|jsonl|sqlite")]
    pub format: Option<Format>,
    /// The output file (written beside, then renamed into place; SQLite is updated in place).
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// Every project of the company (SQLite output).
    #[arg(long)]
    pub all_betas: bool,
    /// Users whose email contains this (testers) [default: every user].
    #[arg(long)]
    pub email_contains: Option<String>,
    /// Users whose first or last name matches (testers) [default: every user].
    #[arg(long)]
    pub name: Option<String>,
    /// Users with this referral code (testers) [default: every user].
    #[arg(long)]
    pub referral_code: Option<String>,
    /// Users with this value in custom_var1..3 (testers) [default: every user].
    #[arg(long)]
    pub custom_vars: Option<String>,
    /// Rewards with this status: earned, delivered or revoked (rewards) [default: every status].
    #[arg(long)]
    pub status: Option<String>,
    /// Records of the user with this email (rewards, suppressions, points) [default: every
    /// user's].
    #[arg(long)]
    pub email: Option<String>,
    /// The checkpoint for CSV and JSONL [default: beside the output]. SQLite output holds its own.
    #[arg(long, value_name = "PATH")]
    pub checkpoint: Option<PathBuf>,
    /// Write the final summary as JSON here [default: off].
    #[arg(long, value_name = "PATH")]
    pub summary_json: Option<PathBuf>,
    /// Stop cleanly (resumable, exit 5) after this long, e.g. 30m [default: no limit].
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
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub what: ImportWhat,
}

#[derive(Debug, Subcommand)]
pub enum ImportWhat {
    /// Users ("testers" in the API).
    #[command(after_help = concat!(
        "Each row's outcome is kept in the checkpoint: a run stopped or killed resumes where it \
stopped when the same command is run again, and a file already done is not sent again.

Examples:
  prefsync import testers --beta 1 --file waitlist.csv --dry-run
  prefsync import testers --beta 1 --file waitlist.csv --map samples/map.toml
  prefsync import testers --beta 1 --file members.csv --preset mailchimp \\
    --max-duration 2h",
        exit_codes!(run)
    ))]
    Testers(ImportTestersArgs),
}

#[derive(Debug, Args)]
pub struct ImportTestersArgs {
    #[command(flatten)]
    pub import: ImportArgs,
    /// A local mirror (SQLite export file) to keep current: each created or updated user, as
    /// the API returned it, is written to it [default: off].
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
    /// Column mapping (TOML): rename, ignore, constants, values, dates, lists, rules. See
    /// samples/map.toml [default: the file's headers are the API's field names].
    #[arg(long, value_name = "FILE")]
    pub map: Option<PathBuf>,
    /// The mapping for another tool's export: mailchimp, getwaitlist, viral-loops, kickofflabs,
    /// referralhero, launchlist, or auto (recognised from the header row). --map overrides its
    /// entries [default: off].
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
    /// Which Mailchimp file this is [default: told from Mailchimp's file name; never guessed].
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
    /// The order creates are sent in: file (as read); sorted (by the map's order_by date,
    /// oldest first, concurrent: calls start in that order, neighbours within about
    /// --concurrency rows may land swapped); strict (sorted, and each create waits for the one
    /// before it: Prefinery receives them in exactly that order; updates stay concurrent)
    /// [default: the map's: strict for the presets, else file].
    #[arg(long, value_enum, value_name = "file|sorted|strict")]
    pub order: Option<OrderArg>,
    /// Send each new user's referrer as referrer_id on its create: the referrer the source
    /// names (the map's [referrals]: a referral code, a source id or an email) is found among
    /// this run's rows and its Prefinery id is sent. The API reference marks what Prefinery
    /// does with referrer_id as unconfirmed [U]: try it on a test project first. Links made
    /// and not made are counted in the summary and noted per row in --results.
    #[arg(long)]
    pub link_referrers: bool,
    /// Send the rows of people who left as suppressions instead of skipping them: Mailchimp's
    /// unsubscribed file (Unsubscribe) and cleaned file (Manual), and rows a suppress_if rule
    /// matches (opted out: Unsubscribe). Unsubscribe also unsubscribes a user of the project
    /// with that email. Needs the key's Email Suppressions permission. Nobody who left is ever
    /// imported as a user, with or without it.
    #[arg(long)]
    pub suppress: bool,
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
    /// The rejected-rows report [default: beside the checkpoint, named after the run].
    #[arg(long, value_name = "PATH")]
    pub errors: Option<PathBuf>,
    /// One line per input line: line, email, action, Prefinery id [default: off].
    #[arg(long, value_name = "PATH")]
    pub results: Option<PathBuf>,
    /// Write the final summary as JSON here [default: off].
    #[arg(long, value_name = "PATH")]
    pub summary_json: Option<PathBuf>,
    /// Start over instead of resuming the unfinished run for this file and project.
    #[arg(long)]
    pub fresh: bool,
    /// Stop cleanly (resumable, exit 5) after this long, e.g. 30m, 2h [default: no limit].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub max_duration: Option<Duration>,
    /// Input encoding: utf-8 or windows-1252 (latin-1) [default: detected].
    #[arg(long)]
    pub encoding: Option<Encoding>,
    /// Field delimiter: , ; or tab (\t) [default: detected].
    #[arg(long, value_parser = parse_delimiter)]
    pub delimiter: Option<char>,
    /// Refuse columns that map to nothing (by default they are listed and ignored).
    #[arg(long)]
    pub strict: bool,
    /// What an empty cell does on update: keep the field, or clear it.
    #[arg(long, value_name = "keep|clear", default_value = "keep")]
    pub empty: EmptyCells,
    /// How to tell existing users from new ones [default: the cheaper in API calls].
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
    /// The checkpoint database (opened read-only).
    #[arg(
        long,
        default_value = "prefsync-checkpoint.sqlite",
        value_name = "PATH"
    )]
    pub checkpoint: PathBuf,
    /// text for people, json for scripts.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// Port to listen on (0 = any free port).
    #[arg(long, default_value_t = 8787)]
    pub port: u16,
    /// Write the port here once listening [default: off].
    #[arg(long, value_name = "PATH")]
    pub port_file: Option<PathBuf>,
    /// Keys and their permissions (TOML or JSON) [default: `sandbox-key` with every permission].
    #[arg(long, value_name = "FILE")]
    pub keys: Option<PathBuf>,
    /// Multiply the documented rate limits (60 turns 60/min into 60/s); 0 turns them off.
    #[arg(long, default_value_t = 1.0)]
    pub rate_scale: f64,
    /// The status a throttled request gets.
    #[arg(long, default_value_t = 503, value_parser = parse_throttle_status)]
    pub throttle_status: u16,
    /// Throttle writes past this many per period, for all projects together
    /// (not a documented limit), e.g. 100/1s [default: off].
    #[arg(long, value_name = "N/PERIOD")]
    pub write_limit: Option<Quota>,
    /// Send Retry-After with this many seconds on throttled answers [default: no Retry-After].
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
    /// Added latency per request, MIN:MAX in milliseconds [default: none].
    #[arg(long, value_name = "MIN:MAX")]
    pub latency_ms: Option<String>,
    /// Seed project 1 with users user{i}@example.com (plus rewards, points, suppressions).
    #[arg(long, default_value_t = 0)]
    pub seed_testers: usize,
    /// Persist the state to this SQLite file [default: in memory].
    #[arg(long, value_name = "PATH")]
    pub state: Option<PathBuf>,
    /// Add a total_count key to X-Pagination (the real key's name is unknown).
    #[arg(long)]
    pub total_key: bool,
    /// Send a signed webhook to this URL for every state change (as Prefinery does) [default:
    /// none are sent].
    #[arg(long, value_name = "URL")]
    pub webhook_url: Option<String>,
    /// The webhooks' signing secret (a rehearsal's, not a real project's) [default: none;
    /// needed with --webhook-url].
    #[arg(long, value_name = "SECRET", requires = "webhook_url")]
    pub webhook_secret: Option<String>,
    /// Probability that a webhook is delivered twice.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub webhook_duplicate_rate: f64,
    /// Deliver waiting webhooks in shuffled order.
    #[arg(long)]
    pub webhook_reorder: bool,
    /// A random delay before each delivery, MIN:MAX in milliseconds [default: none].
    #[arg(long, value_name = "MIN:MAX")]
    pub webhook_delay: Option<String>,
    /// Divide Prefinery's webhook retry schedule (5 s + N^4 s) by this [default: --rate-scale, or 1
    /// when it is 0].
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
