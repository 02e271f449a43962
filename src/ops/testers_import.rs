//! `import testers` as an operation of the engine: a mapped CSV row into a
//! tester create or update.
//!
//! Telling new users from existing ones costs testers-list calls (60 a
//! minute): the project is listed once into the checkpoint when that is
//! cheaper than looking each row up, and the listing then answers at
//! dispatch. A create's effect is found by looking its email up; an
//! update's by comparing the user with what the row asks for.

use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value;

use crate::api::{ApiError, Client, PAGE_SIZE, RateClass, Tester, TesterInput};
use crate::checkpoint::Checkpoint;
use crate::engine::{
    Cost, Decision, Doubt, Effect, Intent, Operation, Order, Parsed, Prepare, Sent,
};
use crate::exit::usage;
use crate::import::mapping::{self, EMAILING_STATUSES, EmptyCells, MapSource, Mapped, Mapping};
use crate::import::presets::MailchimpList;
use crate::input::{CsvInput, Source};
use crate::mirror::Mirror;
use crate::ops::suppressions::{Reason, create_suppression, suppression_effect};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Mode {
    /// Create users that are new, update those that exist.
    Upsert,
    /// Only create; a user that exists is rejected.
    Create,
    /// Only update; a user that does not exist is rejected.
    Update,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Resolve {
    /// List the whole project once into the checkpoint.
    List,
    /// Look each email up (`email_is`).
    Lookup,
    /// Read the local mirror (sync): no call at all to tell new from
    /// existing, and unchanged rows cost nothing.
    Mirror,
}

/// The mirror a run reads (sync) or writes back to (`--mirror`).
pub struct MirrorUse {
    pub mirror: std::sync::Arc<Mirror>,
    /// The project's numeric id in the mirror.
    pub beta_id: i64,
}

/// The import of testers.
pub struct TestersImport {
    pub client: Client,
    pub beta: String,
    pub mode: Mode,
    /// Chosen by the user; else decided in `prepare`.
    pub resolve: Option<Resolve>,
    pub default_status: String,
    pub allow_emails: bool,
    /// The `--map` file, read once the header row is known.
    pub map: Option<PathBuf>,
    /// A preset's name, or `auto`; `map` overrides its entries.
    pub preset: Option<String>,
    /// Which Mailchimp list the input is (else told from its file name).
    pub mailchimp_list: Option<MailchimpList>,
    /// Import rows that `skip_if` rules would skip.
    pub include_flagged: bool,
    /// `--status`, which wins over the map's `default_status`.
    pub status: Option<String>,
    pub empty: EmptyCells,
    /// Refuse columns that map to nothing.
    pub strict: bool,
    /// The mirror: read when `resolve` is `Mirror`; written back to with
    /// what the API returns for each create and update either way.
    pub mirror: Option<MirrorUse>,
    /// `--order`; else the map's (sorted by `order_by`, strict when it
    /// says so), else the file's.
    pub order: Option<Order>,
    /// `--link-referrers`: send the referrer's Prefinery id, found among
    /// this run's rows, as `referrer_id` on each create.
    pub link_referrers: bool,
    /// `--suppress`: rows of people who left (a `suppress_if` rule,
    /// Mailchimp's unsubscribed and cleaned files) are sent as
    /// suppressions instead of being skipped.
    pub suppress: bool,
    /// When the run began (a suppression found in doubt that is older was
    /// there before it).
    run_started: Option<std::time::SystemTime>,
    mapping: Option<Mapping>,
    /// A dry run: an update's row keeps the fields it would change, for
    /// the plan.
    dry_run: bool,
    links: Option<Links>,
}

/// What `--link-referrers` keeps while the run goes.
struct Links {
    referrals: mapping::Referrals,
    /// The rows some row names as its referrer, and the Prefinery id each
    /// one's row ended with (0: not done yet). Bounded by the number of
    /// referrers, not of rows.
    ids: std::sync::Mutex<std::collections::HashMap<u64, u64>>,
    made: std::sync::atomic::AtomicU64,
    not_made: std::sync::atomic::AtomicU64,
}

/// What became of a create's referrer, for the results file.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Link {
    /// Sent as `referrer_id`.
    Made { id: u64, line: u64 },
    /// No row of this file is that referrer.
    NotInFile(String),
    /// The referrer's row had no Prefinery id yet (it comes later in the
    /// order, or was rejected, or was still in flight: `--order sorted`).
    NotYet { line: u64 },
}

impl TestersImport {
    pub fn new(client: Client, beta: String) -> TestersImport {
        TestersImport {
            client,
            beta,
            mode: Mode::Upsert,
            resolve: None,
            default_status: "imported".into(),
            allow_emails: false,
            map: None,
            preset: None,
            mailchimp_list: None,
            include_flagged: false,
            status: None,
            empty: EmptyCells::Keep,
            strict: false,
            mirror: None,
            order: None,
            link_referrers: false,
            suppress: false,
            run_started: None,
            mapping: None,
            links: None,
            dry_run: false,
        }
    }

    fn mapping(&self) -> &Mapping {
        self.mapping
            .as_ref()
            .expect("the engine gives the header row before any row")
    }

    async fn lookup(&self, email: &str) -> Result<Option<Value>, ApiError> {
        let t: Option<Tester> = self.client.find_tester(&self.beta, email).await?;
        Ok(t.map(|t| serde_json::to_value(t).unwrap()))
    }

    /// The user as it stands, from what the row learnt or the API.
    async fn current(&self, row: &mut ImportRow) -> Result<Option<Value>, ApiError> {
        if let Some(known) = row.learnt.take() {
            return Ok(*known);
        }
        match self.resolve {
            None => Ok(None),
            Some(Resolve::List | Resolve::Mirror) => Ok(row.known.as_deref().cloned()),
            Some(Resolve::Lookup) => self.lookup(row.email()).await,
        }
    }
}

/// One row of the import.
#[derive(Debug)]
pub struct ImportRow {
    email_key: String,
    input: TesterInput,
    /// The user as the project listing showed it (`--resolve list`).
    /// Boxed, as the rest: rows are moved through queues, and most rows
    /// never have these.
    known: Option<Box<Value>>,
    /// The user as a lookup just found it (`Some(None)`: not there), for
    /// the next decision.
    learnt: Option<Box<Option<Value>>>,
    /// The status was the default for new users, not the file's.
    defaulted: bool,
    /// The update the decision made.
    change: Option<Box<(u64, TesterInput)>>,
    /// Its line (told by the engine before it is worked on).
    line: u64,
    /// `--link-referrers`: the line of the row it names as its referrer,
    /// or the name no row has; and, once created, what became of it.
    referrer: Option<Box<ReferrerOf>>,
    /// In a dry run, the fields an update would change, as the plan says
    /// them.
    would_change: Option<Box<str>>,
    /// An earlier call for this row may have taken effect unseen (its
    /// outcome was unknown, or it was in flight when a run stopped): an
    /// email found taken may be this row's own create.
    in_doubt: bool,
    /// `--suppress`: the row is a suppression to add, as this reason.
    suppress_as: Option<Reason>,
}

/// A row's referrer, for `--link-referrers`.
#[derive(Debug)]
struct ReferrerOf {
    /// The line of the row it names, or the name no row has.
    named: Result<u64, String>,
    /// What became of it, once the create was sent.
    link: Option<Link>,
}

impl ImportRow {
    /// The email as the file has it (trimmed), for a lookup.
    fn email(&self) -> &str {
        self.input.email.as_deref().unwrap_or_default()
    }
}

/// A suppression's action (`added`, `unsubscribed`, `unchanged`) as the
/// import reports it.
fn suppressed_action(action: &'static str) -> &'static str {
    match action {
        "added" => "suppressed",
        other => other,
    }
}

fn id_of(t: &Value) -> u64 {
    t.get("id").and_then(Value::as_u64).unwrap_or(0)
}

impl Operation for TestersImport {
    type Row = ImportRow;

    fn kind(&self) -> &'static str {
        if self.resolve == Some(Resolve::Mirror) {
            "testers.sync"
        } else {
            "testers.import"
        }
    }

    fn actions(&self) -> &'static [&'static str] {
        if self.suppress {
            &[
                "created",
                "updated",
                "unchanged",
                "suppressed",
                "unsubscribed",
            ]
        } else {
            &["created", "updated", "unchanged"]
        }
    }

    fn intent(&self, name: &str) -> Option<(Intent, &'static str)> {
        match name {
            "create" => Some(("create", "created")),
            "update" => Some(("update", "updated")),
            "suppress" => Some(("suppress", "suppressed")),
            _ => None,
        }
    }

    /// The header row decides the mapping (a preset's, `--map`'s, or the
    /// two together): columns that map to nothing are warned about (or
    /// refused with `--strict`), the status of new users is settled, and a
    /// date column whose first cells match none of its formats stops the
    /// run here, before any call (not dozens of rejected rows later).
    fn start(&mut self, input: &mut CsvInput) -> anyhow::Result<()> {
        let file_name = input
            .source
            .path()
            .filter(|_| matches!(input.source, Source::File(_)))
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned());
        let mapping = Mapping::from_source(
            &input.headers,
            &MapSource {
                map: self.map.as_deref(),
                preset: self.preset.as_deref(),
                file_name: file_name.as_deref(),
                mailchimp_list: self.mailchimp_list,
                include_flagged: self.include_flagged,
                empty: self.empty,
            },
        )?;
        for note in &mapping.notes {
            tracing::info!("{note}");
        }
        self.default_status = match (&self.status, &mapping.default_status) {
            (Some(s), _) => s.clone(),
            (None, Some(s)) => {
                check_default_status(s, "the map's default_status", self.allow_emails)?;
                s.clone()
            }
            (None, None) => "imported".to_string(),
        };
        if !mapping.unmapped.is_empty() {
            let list = mapping.unmapped.join(", ");
            if self.strict {
                return Err(usage(format!(
                    "columns that map to nothing: {list}. Map them with --map, or drop --strict to ignore them"
                )));
            }
            tracing::warn!(
                "these columns map to nothing and are ignored: {list} (use --map to map them, --strict to refuse)"
            );
        }
        let mut probe = mapping.date_probe();
        while !probe.satisfied() {
            match input.next_record()? {
                Some(Ok(r)) => probe.feed(r.line, &r.fields),
                Some(Err(_)) => {}
                None => break,
            }
        }
        probe
            .finish()
            .map_err(|e| usage(format!("{}: {e}", input.source.display())))?;
        if matches!(self.order, Some(Order::Sorted | Order::Strict)) && mapping.order_by.is_none() {
            return Err(usage(
                "--order sorted and strict need the field to sort on: the map's order_by \
                 (e.g. order_by = \"profile.signed_up_at\", written by the signup date column)",
            ));
        }
        if self.link_referrers {
            match &mapping.referrals {
                Some(r) => {
                    self.links = Some(Links {
                        referrals: r.clone(),
                        ids: Default::default(),
                        made: Default::default(),
                        not_made: Default::default(),
                    })
                }
                None => {
                    return Err(usage(
                        "--link-referrers needs to know how rows name their referrer: a [referrals] table in the map \
                         (referrer = \"profile.source_referrer\", matches = \"email\" or the referrer's field), \
                         and columns that write both",
                    ));
                }
            }
        }
        self.mapping = Some(mapping);
        Ok(())
    }

    fn parse(&self, cells: &csv::StringRecord) -> Result<Parsed<ImportRow>, String> {
        let row = match self.mapping().apply(cells)? {
            Mapped::Row(row) => row,
            Mapped::Skip(skip) => {
                // Someone who left becomes a suppression (with an email to
                // suppress); never a user.
                if self.suppress
                    && let (Some(kind), Some(email_key)) = (skip.suppress_as, &skip.email_key)
                {
                    return Ok(Parsed::Row(ImportRow {
                        email_key: email_key.clone(),
                        input: TesterInput {
                            email: Some(email_key.clone()),
                            ..Default::default()
                        },
                        known: None,
                        learnt: None,
                        defaulted: false,
                        change: None,
                        line: 0,
                        referrer: None,
                        in_doubt: false,
                        would_change: None,
                        suppress_as: Some(if kind == "Manual" {
                            Reason::Manual
                        } else {
                            Reason::Unsubscribe
                        }),
                    }));
                }
                return Ok(Parsed::Skip {
                    class: skip.class.as_str(),
                    key: skip.email_key,
                    reason: skip.reason,
                });
            }
        };
        let mut row = ImportRow {
            email_key: row.email_key,
            input: row.input,
            known: None,
            learnt: None,
            defaulted: false,
            change: None,
            line: 0,
            referrer: None,
            in_doubt: false,
            would_change: None,
            suppress_as: None,
        };
        if let (Some(Resolve::Mirror), Some(m)) = (self.resolve, &self.mirror) {
            let known = m
                .mirror
                .tester(m.beta_id, &row.email_key)
                .map_err(|e| format!("failed to read the mirror: {e:#}"))?;
            match &known {
                // Sync never brings back someone who left: a suppressed
                // email is not created again.
                None => {
                    if let Some(reason) = m
                        .mirror
                        .suppression(m.beta_id, &row.email_key)
                        .map_err(|e| format!("failed to read the mirror: {e:#}"))?
                    {
                        return Ok(Parsed::Skip {
                            class: "suppressed",
                            key: Some(row.email_key),
                            reason: format!(
                                "the email is suppressed ({reason}): sync never creates it again"
                            ),
                        });
                    }
                }
                // Nor sets an unsubscribed user back to an active status:
                // the row's status is dropped, its other fields go.
                Some(t) if !t.get("unsubscribed_at").is_none_or(Value::is_null) => {
                    if row.input.status.take().is_some() {
                        tracing::debug!(
                            email = row.email_key,
                            "unsubscribed: the row's status is not sent (sync never re-subscribes)"
                        );
                    }
                }
                Some(_) => {}
            }
            row.known = known.map(Box::new);
        }
        Ok(Parsed::Row(row))
    }

    fn key<'r>(&self, row: &'r ImportRow) -> &'r str {
        &row.email_key
    }

    fn key_name(&self) -> &'static str {
        "email"
    }

    /// The column the mapping reads the email from (a preset's `Email
    /// Address`, a map's own name).
    fn key_column(&self) -> Option<usize> {
        self.mapping.as_ref().map(|m| m.email_column)
    }

    /// A sync is run again to converge again (the mirror tells what
    /// changed). An import of a file a run finished, with the same
    /// settings, is not sent again: its reports stay those of the run that
    /// did the work (a second run would find every row unchanged and
    /// report that instead), and it costs no call; `--fresh` sends it.
    fn repeatable(&self) -> bool {
        self.resolve == Some(Resolve::Mirror)
    }

    /// Rows that may set a status that emails people must all be counted
    /// before anything is sent.
    fn single_pass(&self) -> bool {
        // Linking referrers needs every row's name known before the first
        // create.
        !self.link_referrers && (self.allow_emails || !self.mapping().sets_status())
    }

    fn order(&self) -> Order {
        let m = self.mapping();
        self.order.unwrap_or(match (&m.order_by, m.strict_order) {
            (None, _) => Order::File,
            (Some(_), false) => Order::Sorted,
            (Some(_), true) => Order::Strict,
        })
    }

    /// The row's date in the `order_by` field; rows without one go last.
    fn order_key(&self, row: &ImportRow) -> i64 {
        self.mapping()
            .order_by
            .as_ref()
            .and_then(|t| mapping::field_value(&row.input, t))
            .and_then(mapping::date_order_key)
            .unwrap_or(i64::MAX)
    }

    fn in_turn(&self, intent: Intent) -> bool {
        intent == "create"
    }

    fn note_planned(
        &self,
        ck: &Checkpoint,
        run: i64,
        line: u64,
        row: &ImportRow,
    ) -> anyhow::Result<()> {
        if let Some(l) = &self.links {
            if let Some(own) = l.referrals.own(&row.input) {
                ck.note_ref(run, &own, line)?;
            }
            if let Some(named) = l.referrals.named(&row.input) {
                ck.note_wanted_ref(run, &named)?;
            }
        }
        Ok(())
    }

    fn place(&self, row: &mut ImportRow, line: u64, _stopped_detail: Option<String>) {
        row.line = line;
    }

    fn finished(&self, row: &mut ImportRow, _action: &'static str, target: u64) {
        if let Some(l) = &self.links
            && target != 0
            && let Some(id) = l.ids.lock().unwrap().get_mut(&row.line)
        {
            *id = target;
        }
    }

    /// In a dry run, the fields an update would change (old and new
    /// value), for the plan; with --link-referrers, what became of a
    /// create's referrer; nothing otherwise (a note costs a write).
    fn done_note(&self, row: &ImportRow, action: &str) -> Option<String> {
        if self.dry_run && action == "updated" {
            return row.would_change.as_deref().map(str::to_string);
        }
        if row.suppress_as.is_some() && action == "unchanged" {
            return Some("the email was suppressed already (error 2702)".into());
        }
        if action != "created" {
            return None;
        }
        Some(match row.referrer.as_deref()?.link.as_ref()? {
            Link::Made { id, line } => {
                format!("referrer linked: referrer_id {id} (the row on line {line})")
            }
            Link::NotInFile(name) => {
                format!("referrer not linked: no row of this file is {name:?}")
            }
            Link::NotYet { line } => format!(
                "referrer not linked: its row (line {line}) had no Prefinery id when this one was created"
            ),
        })
    }

    fn gate(&self, row: &ImportRow) -> bool {
        !self.allow_emails
            && row
                .input
                .status
                .as_deref()
                .is_some_and(|s| EMAILING_STATUSES.contains(&s))
    }

    fn gate_refusal(&self, rows: u64, first_line: u64) -> anyhow::Error {
        usage(format!(
            "{rows} rows set a status ({}) that makes Prefinery email these people (first at line {first_line}); \
             add --allow-emails to send them, or change the status",
            EMAILING_STATUSES.join(", ")
        ))
    }

    async fn prepare(&mut self, p: Prepare<'_>) -> anyhow::Result<()> {
        if let Some(l) = &self.links {
            // The referrers, with the ids of those a stopped run did.
            let mut ids = l.ids.lock().unwrap();
            for (line, target) in p.checkpoint.named_rows(p.run)? {
                ids.insert(line, target.unwrap_or(0));
            }
            tracing::info!(
                referrers = ids.len(),
                "--link-referrers: {} rows of this file are named as a referrer",
                ids.len()
            );
        }
        self.dry_run = p.dry_run;
        self.run_started = p.checkpoint.run(p.run)?.map(|r| {
            std::time::SystemTime::UNIX_EPOCH
                + std::time::Duration::from_secs(u64::try_from(r.started_at).unwrap_or(0))
        });
        // A sync reads the mirror, which the caller made fresh.
        if self.resolve == Some(Resolve::Mirror) {
            return Ok(());
        }
        self.resolve = match self.mode {
            // Creating needs no resolving, except for the rows a stopped
            // run had in flight: each is looked up, unless listing the
            // project is cheaper.
            Mode::Create if p.in_flight > 0 && !p.dry_run => {
                let beta = self.client.beta(&self.beta).await?;
                let pages = beta.testers_count.unwrap_or(0).div_ceil(PAGE_SIZE as u64);
                let list = pages < p.in_flight;
                tracing::info!(
                    in_flight = p.in_flight,
                    "{} rows were in flight when the last run stopped: {}",
                    p.in_flight,
                    if list {
                        format!("listing the project ({pages} testers-list calls) to find them")
                    } else {
                        "looking each one up".to_string()
                    }
                );
                list.then_some(Resolve::List)
            }
            Mode::Create => None,
            _ => Some(match self.resolve {
                Some(r) => r,
                None => {
                    let beta = self.client.beta(&self.beta).await?;
                    let users = beta.testers_count.unwrap_or(0);
                    let pages = users.div_ceil(PAGE_SIZE as u64);
                    let choice = if pages < p.open {
                        Resolve::List
                    } else {
                        Resolve::Lookup
                    };
                    tracing::info!(
                        project_users = users,
                        rows_to_do = p.open,
                        "resolving emails by {}: listing costs {pages} testers-list calls, looking up costs {}",
                        match choice {
                            Resolve::List => "listing the project",
                            Resolve::Lookup | Resolve::Mirror => "looking each email up",
                        },
                        p.open
                    );
                    choice
                }
            }),
        };
        if self.resolve == Some(Resolve::List) && p.open > 0 {
            let n = crate::ops::tester_ref::list_into_known(
                &self.client,
                p.checkpoint,
                p.run,
                &self.beta,
                None,
                p.stop,
                p.progress,
            )
            .await?;
            tracing::info!(users = n, "listed the project");
        }
        Ok(())
    }

    fn cost(&self) -> Cost {
        // Looking each email up costs a testers-list call a row.
        match self.resolve {
            Some(Resolve::Lookup) => Cost {
                class: Some(RateClass::TestersList),
                calls_per_row: 1.0,
            },
            _ => Cost {
                class: None,
                calls_per_row: 1.0,
            },
        }
    }

    /// A create when the row is new to the project (or nothing is
    /// resolved), an update when the listing shows a difference; `None`
    /// when a lookup must decide, or nothing will be sent.
    fn plan(
        &self,
        ck: &Checkpoint,
        run: i64,
        row: &mut ImportRow,
    ) -> anyhow::Result<Option<Intent>> {
        if row.suppress_as.is_some() {
            return Ok(Some("suppress"));
        }
        if let Some(l) = &self.links
            && let Some(named) = l.referrals.named(&row.input)
        {
            let found = ck.ref_line(run, &named)?.ok_or_else(|| named.into_owned());
            row.referrer = Some(Box::new(ReferrerOf {
                named: found,
                link: None,
            }));
        }
        if self.resolve == Some(Resolve::List) {
            row.known = ck
                .known(run, &row.email_key)?
                .and_then(|s| serde_json::from_str(&s).ok())
                .map(Box::new);
        }
        Ok(match (self.resolve, &row.known, self.mode) {
            (None, _, _) => Some("create"),
            (Some(Resolve::List | Resolve::Mirror), None, Mode::Upsert | Mode::Create) => {
                Some("create")
            }
            (Some(Resolve::List | Resolve::Mirror), Some(t), Mode::Upsert | Mode::Update) => {
                let t: &Value = t;
                mapping::diff(t, &row.input).map(|_| "update")
            }
            _ => None,
        })
    }

    async fn find_effect(&self, row: &mut ImportRow, doubt: Doubt) -> Result<Effect, ApiError> {
        row.in_doubt = true;
        if row.suppress_as.is_some() {
            if matches!(doubt, Doubt::InFlightAtStop(None)) {
                return Ok(Effect::NotDone);
            }
            let effect =
                suppression_effect(&self.client, &self.beta, &row.email_key, self.run_started)
                    .await?;
            return Ok(match effect {
                Effect::Done { action, target } => Effect::Done {
                    action: suppressed_action(action),
                    target,
                },
                e => e,
            });
        }
        // This run listed the project after the stopped one died, so for a
        // row in flight then the listing answers as well as a lookup (and
        // costs no call). The mirror may be older than the stopped run's
        // calls, and after an unknown outcome in this run only a lookup
        // tells.
        let (found, intent) = match doubt {
            Doubt::InFlightAtStop(intent) if self.resolve == Some(Resolve::List) => {
                (row.known.as_deref().cloned(), intent)
            }
            Doubt::InFlightAtStop(intent) => (self.lookup(row.email()).await?, intent),
            Doubt::OutcomeUnknown(intent) => (self.lookup(row.email()).await?, Some(intent)),
        };
        // Found by a lookup: the API's own record, which the mirror learns
        // too (a create whose answer was lost was never written back).
        let looked_up =
            !matches!(doubt, Doubt::InFlightAtStop(_)) || self.resolve != Some(Resolve::List);
        if looked_up
            && let (Some(t), Some(m)) = (&found, &self.mirror)
            && let Err(e) = m.mirror.write_tester(m.beta_id, t)
        {
            tracing::warn!("failed to write a user back to the mirror: {e:#}");
        }
        let effect = match (&found, intent) {
            (Some(t), Some("create")) => Effect::Done {
                action: "created",
                target: id_of(t),
            },
            // Nothing left to change: the update went through.
            (Some(t), Some("update")) if mapping::diff(t, &row.input).is_none() => Effect::Done {
                action: "updated",
                target: id_of(t),
            },
            _ => Effect::NotDone,
        };
        row.learnt = Some(Box::new(found));
        Ok(effect)
    }

    async fn decide(&self, row: &mut ImportRow) -> Result<Decision, ApiError> {
        if row.suppress_as.is_some() {
            return Ok(Decision::Send("suppress"));
        }
        let existing = self.current(row).await?;
        Ok(match (existing, self.mode) {
            (Some(t), Mode::Create) => Decision::Reject {
                message: format!(
                    "{} already exists in the project (id {}); --mode create does not update users",
                    row.email_key,
                    id_of(&t)
                ),
            },
            (Some(t), _) => {
                let id = id_of(&t);
                match mapping::diff(&t, &row.input) {
                    None => Decision::Done {
                        action: "unchanged",
                        target: id,
                    },
                    Some(change) => {
                        if self.dry_run {
                            row.would_change = Some(Box::from(describe_changes(&field_changes(
                                Some(&t),
                                &change,
                            ))));
                        }
                        row.change = Some(Box::new((id, change)));
                        Decision::Send("update")
                    }
                }
            }
            (None, Mode::Update) => Decision::Reject {
                message: format!(
                    "{} is not in the project; --mode update does not create users",
                    row.email_key
                ),
            },
            (None, _) => {
                // New users get the default status; an existing one (the
                // fallback to an update) keeps its own.
                if row.input.status.is_none() {
                    row.input.status = Some(self.default_status.clone());
                    row.defaulted = true;
                }
                Decision::Send("create")
            }
        })
    }

    async fn send(&self, row: &mut ImportRow, intent: Intent) -> Result<Sent, ApiError> {
        if let Some(reason) = row.suppress_as {
            return Ok(
                match create_suppression(&self.client, &self.beta, &row.email_key, reason).await? {
                    Sent::Done { action, target } => Sent::Done {
                        action: suppressed_action(action),
                        target,
                    },
                    other => other,
                },
            );
        }
        if intent == "update" {
            let (id, change) = row.change.as_deref().expect("an update decided its change");
            let t = self.client.update_tester(&self.beta, *id, change).await?;
            self.write_back(&t);
            return Ok(Sent::Done {
                action: "updated",
                target: *id,
            });
        }
        self.link_referrer(row);
        // With a mirror to keep current, the whole created user is read
        // from the answer; without, only its id (a tenth of the work).
        let created = match &self.mirror {
            Some(_) => self
                .client
                .create_tester(&self.beta, &row.input)
                .await
                .map(|t| {
                    self.write_back(&t);
                    t.id
                }),
            None => self.client.create_tester_id(&self.beta, &row.input).await,
        };
        match created {
            Ok(id) => Ok(Sent::Done {
                action: "created",
                target: id,
            }),
            Err(ApiError::Rejected {
                status: 422,
                messages,
                ..
            }) if messages.mentions("taken") || messages.mentions("already exists") => {
                // In --mode create, a row never in doubt is refused only
                // because the person exists: rejected at once, without a
                // lookup (a testers-list call, 60 a minute) that could not
                // change its fate.
                if self.mode == Mode::Create && !row.in_doubt {
                    return Ok(Sent::Rejected {
                        status: Some(422),
                        message: format!(
                            "{} already exists in the project (the API says the email is taken); --mode create does not update users",
                            row.email_key
                        ),
                    });
                }
                match self.lookup(row.email()).await? {
                    // An earlier create of this row had an unknown outcome
                    // (the lookup after it may have come too early): the
                    // user there is its effect, as `find_effect` would say.
                    Some(t) if self.mode == Mode::Create => {
                        if let Some(m) = &self.mirror
                            && let Err(e) = m.mirror.write_tester(m.beta_id, &t)
                        {
                            tracing::warn!("failed to write a user back to the mirror: {e:#}");
                        }
                        Ok(Sent::Done {
                            action: "created",
                            target: id_of(&t),
                        })
                    }
                    // Someone else created it since it was resolved: update it.
                    Some(t) => {
                        if row.defaulted {
                            row.input.status = None;
                            row.defaulted = false;
                        }
                        row.learnt = Some(Box::new(Some(t)));
                        Ok(Sent::Redecide)
                    }
                    _ => Ok(Sent::Rejected {
                        status: Some(422),
                        message: format!("the API says the email is taken: {messages}"),
                    }),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The map is compared by content, not only by name; the status of new
    /// users as it came out of `--status`, the map and the preset.
    fn settings(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        let map = match &self.map {
            Some(p) => {
                let digest = std::fs::read(p)
                    .map(|b| sha1_smol::Sha1::from(&b).digest().to_string())
                    .unwrap_or_default();
                format!("{} (sha1 {})", p.display(), &digest[..digest.len().min(12)])
            }
            None => "none".into(),
        };
        m.insert("--map".into(), Value::String(map));
        let preset = self.mapping.as_ref().and_then(|m| m.preset.clone());
        m.insert(
            "--preset".into(),
            Value::String(preset.unwrap_or_else(|| "none".into())),
        );
        m.insert(
            "--mode".into(),
            serde_json::to_value(self.mode).unwrap_or_default(),
        );
        m.insert(
            "--status".into(),
            Value::String(self.default_status.clone()),
        );
        m.insert("--allow-emails".into(), Value::Bool(self.allow_emails));
        m.insert(
            "--empty".into(),
            serde_json::to_value(self.empty).unwrap_or_default(),
        );
        m.insert(
            "--include-flagged".into(),
            Value::Bool(self.include_flagged),
        );
        m.insert(
            "--mailchimp-list".into(),
            serde_json::to_value(self.mailchimp_list).unwrap_or_default(),
        );
        if self.mapping.is_some() {
            m.insert("--order".into(), Value::String(self.order().name().into()));
        }
        m.insert("--link-referrers".into(), Value::Bool(self.link_referrers));
        m.insert("--suppress".into(), Value::Bool(self.suppress));
        m
    }

    fn notes(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert(
            "resolve".into(),
            Value::String(
                match self.resolve {
                    None => "none (create only)",
                    Some(Resolve::List) => "list",
                    Some(Resolve::Lookup) => "lookup",
                    Some(Resolve::Mirror) => "mirror",
                }
                .into(),
            ),
        );
        m.insert(
            "preset".into(),
            self.mapping
                .as_ref()
                .and_then(|m| m.preset.clone())
                .map_or(Value::Null, Value::String),
        );
        m.insert(
            "unmapped_columns".into(),
            Value::from(
                self.mapping
                    .as_ref()
                    .map(|m| m.unmapped.clone())
                    .unwrap_or_default(),
            ),
        );
        if self.mapping.is_some() {
            m.insert("order".into(), Value::String(self.order().name().into()));
        }
        if let Some(l) = &self.links {
            m.insert(
                "referrers_linked".into(),
                Value::from(l.made.load(std::sync::atomic::Ordering::Relaxed)),
            );
            m.insert(
                "referrers_not_linked".into(),
                Value::from(l.not_made.load(std::sync::atomic::Ordering::Relaxed)),
            );
        }
        m
    }
}

impl TestersImport {
    /// `--link-referrers`: the referrer's Prefinery id, when its row has
    /// one by now, goes into the create as `referrer_id`. Decided once a
    /// row (a create sent again keeps what the first try sent).
    fn link_referrer(&self, row: &mut ImportRow) {
        let (Some(l), Some(r)) = (&self.links, row.referrer.as_deref_mut()) else {
            return;
        };
        if r.link.is_some() {
            return;
        }
        let link = match &r.named {
            Err(name) => Link::NotInFile(name.clone()),
            Ok(line) => match l.ids.lock().unwrap().get(line).copied() {
                Some(id) if id != 0 && *line != row.line => Link::Made { id, line: *line },
                _ => Link::NotYet { line: *line },
            },
        };
        if let Link::Made { id, .. } = link {
            row.input.referrer_id = Some(id.to_string());
            l.made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else {
            l.not_made
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        r.link = Some(link);
    }

    /// Keeps the mirror current with the API's answer. A failure to write
    /// does not undo the call: it is logged, and the next listing mends
    /// the mirror.
    fn write_back(&self, t: &Tester) {
        if let Some(m) = &self.mirror {
            let v = serde_json::to_value(t).unwrap_or(Value::Null);
            if let Err(e) = m.mirror.write_tester(m.beta_id, &v) {
                tracing::warn!(
                    "failed to write user {} back to the mirror {}: {e:#}",
                    t.id,
                    m.mirror.path().display()
                );
            }
        }
    }
}

/// Refuses a status for new users that is unknown, or that emails people
/// without `--allow-emails`.
pub fn check_default_status(s: &str, from: &str, allow_emails: bool) -> anyhow::Result<()> {
    if !mapping::STATUSES.contains(&s) {
        return Err(usage(format!(
            "unknown {from} {s:?}; expected one of {}",
            mapping::STATUSES.join(", ")
        )));
    }
    if EMAILING_STATUSES.contains(&s) && !allow_emails {
        return Err(usage(format!(
            "{from} {s} makes Prefinery email every new user; add --allow-emails if that is what you want"
        )));
    }
    Ok(())
}

/// What a plan says of one row: its action, the record it acts on, that
/// record's `updated_at` as the mirror had it, and each field it sets
/// (name, old value, new value).
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedRow {
    pub action: &'static str,
    pub target: Option<u64>,
    pub base_updated_at: Option<String>,
    pub fields: Vec<(String, String, String)>,
    pub reason: String,
}

/// A field's value as a plan shows it (text as is, anything else as JSON).
pub fn cell_of(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// The fields `input` sets, each with its value in `current` (a record the
/// API returned) and its new value. The names are those of a mapping file:
/// `status`, `profile.first_name`, `response.101`.
pub fn field_changes(
    current: Option<&Value>,
    input: &TesterInput,
) -> Vec<(String, String, String)> {
    let now = |path: &[&str]| -> String {
        let mut v = current;
        for p in path {
            v = v.and_then(|x| x.get(*p));
        }
        cell_of(v)
    };
    let mut out = vec![];
    for (name, value) in [
        ("email", &input.email),
        ("status", &input.status),
        ("invitation_code", &input.invitation_code),
        ("referrer_id", &input.referrer_id),
    ] {
        if let Some(v) = value {
            out.push((name.to_string(), now(&[name]), v.clone()));
        }
    }
    for (k, v) in &input.profile {
        out.push((
            format!("profile.{k}"),
            now(&["profile", k]),
            cell_of(Some(v)),
        ));
    }
    for (q, a) in &input.responses {
        let old = current
            .and_then(|c| c.get("responses"))
            .and_then(Value::as_array)
            .and_then(|rs| {
                rs.iter()
                    .find(|r| cell_of(r.get("question_id")) == *q)
                    .map(|r| cell_of(r.get("answer")))
            })
            .unwrap_or_default();
        out.push((format!("response.{q}"), old, a.clone()));
    }
    out
}

/// Field changes as one line of text, for a dry run's plan:
/// `would change profile.first_name "Ann" -> "Anne"; status "applied" -> "imported"`.
pub fn describe_changes(changes: &[(String, String, String)]) -> String {
    let parts: Vec<String> = changes
        .iter()
        .map(|(field, old, new)| format!("{field} {old:?} -> {new:?}"))
        .collect();
    format!("would change {}", parts.join("; "))
}

/// The fields of a plan back as what a create or an update sends.
pub fn input_of(fields: &serde_json::Map<String, Value>) -> TesterInput {
    let mut t = TesterInput::default();
    for (k, v) in fields {
        let s = cell_of(Some(v));
        match k.as_str() {
            "email" => t.email = Some(s),
            "status" => t.status = Some(s),
            "invitation_code" => t.invitation_code = Some(s),
            "referrer_id" => t.referrer_id = Some(s),
            k => {
                if let Some(p) = k.strip_prefix("profile.") {
                    t.profile.insert(p.to_string(), Value::String(s));
                } else if let Some(q) = k.strip_prefix("response.") {
                    t.responses.push((q.to_string(), s));
                }
            }
        }
    }
    t
}

impl TestersImport {
    /// What a sync would do with this row, decided against the mirror
    /// alone (no call): the plan's line for it.
    pub fn planned(&self, row: &ImportRow) -> PlannedRow {
        let known = row.known.as_deref();
        let base = known
            .and_then(|t| t.get("updated_at"))
            .map(|v| cell_of(Some(v)));
        let target = known.map(id_of);
        match (known, self.mode) {
            (Some(t), Mode::Create) => PlannedRow {
                action: "reject",
                target,
                base_updated_at: base,
                fields: vec![],
                reason: format!(
                    "{} already exists (id {}); --mode create does not update users",
                    row.email_key,
                    id_of(t)
                ),
            },
            (Some(t), _) => match mapping::diff(t, &row.input) {
                None => PlannedRow {
                    action: "unchanged",
                    target,
                    base_updated_at: base,
                    fields: vec![],
                    reason: String::new(),
                },
                Some(change) => PlannedRow {
                    action: "update",
                    target,
                    base_updated_at: base,
                    fields: field_changes(Some(t), &change),
                    reason: String::new(),
                },
            },
            (None, Mode::Update) => PlannedRow {
                action: "reject",
                target: None,
                base_updated_at: None,
                fields: vec![],
                reason: format!(
                    "{} is not in the project; --mode update does not create users",
                    row.email_key
                ),
            },
            (None, _) => {
                let mut input = row.input.clone();
                if input.status.is_none() {
                    input.status = Some(self.default_status.clone());
                }
                PlannedRow {
                    action: "create",
                    target: None,
                    base_updated_at: None,
                    fields: field_changes(None, &input),
                    reason: String::new(),
                }
            }
        }
    }
}
