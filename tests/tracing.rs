//! The `tracing` feature: a span per task in the parent, with the task's
//! name, pid and outcome, and the events its worker emits forwarded into it,
//! bounded. A `harness = false` target (it forks); a recording subscriber is
//! the global default, installed after the zygote started.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::{TestResult, checked, ensure};
use libtest_mimic::Trial;
use run_in_process::{ErrorKind, Zygote};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// One recorded span: its name, fields, and whether it closed.
#[derive(Debug, Clone, Default)]
struct SpanRec {
    name: String,
    fields: BTreeMap<String, String>,
    closed: bool,
}

/// One recorded event, with the serial number of its parent span.
#[derive(Debug, Clone)]
struct EventRec {
    target: String,
    level: tracing::Level,
    parent: Option<u64>,
    fields: BTreeMap<String, String>,
}

#[derive(Default)]
struct Log {
    spans: BTreeMap<u64, SpanRec>,
    events: Vec<EventRec>,
}

/// Records spans and events. Span ids are reused by the registry, so each
/// span gets a serial number of its own in its extensions.
#[derive(Clone, Default)]
struct Recorder {
    log: Arc<Mutex<Log>>,
    next: Arc<AtomicU64>,
}

struct Serial(u64);

#[derive(Default)]
struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Recorder {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let serial = self.next.fetch_add(1, Ordering::Relaxed);
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Serial(serial));
        }
        self.log.lock().unwrap().spans.insert(
            serial,
            SpanRec {
                name: attrs.metadata().name().to_owned(),
                fields: fields.0,
                closed: false,
            },
        );
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(serial) = ctx
            .span(id)
            .and_then(|s| s.extensions().get::<Serial>().map(|s| s.0))
        else {
            return;
        };
        let mut fields = Fields::default();
        values.record(&mut fields);
        if let Some(span) = self.log.lock().unwrap().spans.get_mut(&serial) {
            span.fields.extend(fields.0);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let parent = ctx
            .event_span(event)
            .and_then(|s| s.extensions().get::<Serial>().map(|s| s.0));
        let mut fields = Fields::default();
        event.record(&mut fields);
        self.log.lock().unwrap().events.push(EventRec {
            target: event.metadata().target().to_owned(),
            level: *event.metadata().level(),
            parent,
            fields: fields.0,
        });
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(serial) = ctx
            .span(&id)
            .and_then(|s| s.extensions().get::<Serial>().map(|s| s.0))
        else {
            return;
        };
        if let Some(span) = self.log.lock().unwrap().spans.get_mut(&serial) {
            span.closed = true;
        }
    }
}

impl Recorder {
    /// The one task span whose `task` field names `function`.
    fn task_span(&self, function: &str) -> Result<(u64, SpanRec), String> {
        let log = self.log.lock().unwrap();
        let found: Vec<_> = log
            .spans
            .iter()
            .filter(|(_, s)| {
                s.name == "run_in_process::task"
                    && s.fields
                        .get("task")
                        .is_some_and(|t| t.ends_with(&format!("::{function}")))
            })
            .map(|(k, s)| (*k, s.clone()))
            .collect();
        match &found[..] {
            [one] => Ok(one.clone()),
            other => Err(format!("{} task spans for {function}", other.len())),
        }
    }

    fn events_in(&self, span: u64) -> Vec<EventRec> {
        let log = self.log.lock().unwrap();
        log.events
            .iter()
            .filter(|e| e.parent == Some(span))
            .cloned()
            .collect()
    }
}

fn traced_ok(x: u64) -> u64 {
    tracing::info!(
        answer = x * 2,
        who = "worker",
        "hello from {}",
        "the worker"
    );
    tracing::debug!("a debug event");
    x * 2
}

fn traced_reused(n: u64) -> u32 {
    tracing::info!(n, "served");
    std::process::id()
}

fn traced_run(x: u64) -> u64 {
    x + 1
}

fn traced_panic(_: ()) -> u64 {
    panic!("traced boom")
}

fn traced_segfault(_: ()) -> u64 {
    tracing::warn!("about to crash");
    // SAFETY: installing SIG_DFL runs no code; raising a signal has no
    // memory-safety preconditions.
    unsafe { libc::signal(libc::SIGSEGV, libc::SIG_DFL) };
    // SAFETY: as above.
    unsafe { libc::raise(libc::SIGSEGV) };
    0
}

fn traced_sleep(_: ()) -> u64 {
    std::thread::sleep(std::time::Duration::from_secs(600));
    0
}

const FLOOD: u64 = 1_000_000;

fn traced_flood(n: u64) -> u64 {
    for i in 0..n {
        tracing::info!(i, "flood");
    }
    n
}

fn field<'a>(fields: &'a BTreeMap<String, String>, name: &str) -> &'a str {
    fields.get(name).map_or("", String::as_str)
}

/// The span's task name, outcome, duration and closing, and a pid when
/// `pid` says the parent knew it.
fn check_span(rec: &Recorder, function: &str, outcome: &str, pid: Option<u32>) -> TestResult {
    let (_, span) = rec.task_span(function)?;
    ensure(span.closed, format!("{function}: span not closed"))?;
    ensure(
        field(&span.fields, "outcome") == outcome,
        format!("{function}: outcome {:?}, not {outcome}", span.fields),
    )?;
    ensure(
        span.fields.contains_key("duration_us"),
        format!("{function}: no duration"),
    )?;
    if let Some(pid) = pid {
        ensure(
            field(&span.fields, "pid") == pid.to_string(),
            format!("{function}: pid {:?}, not {pid}", span.fields),
        )?;
    }
    Ok(())
}

async fn spans_carry_name_pid_and_outcome(z: Zygote, rec: Recorder) -> TestResult {
    let p = z.open(traced_ok, 21).await?;
    let pid = p.pid();
    ensure(p.result().await? == 42, "value")?;
    check_span(&rec, "traced_ok", "ok", Some(pid))?;

    ensure(z.run(traced_run, 1).await? == 2, "run value")?;
    check_span(&rec, "traced_run", "ok", None)?;

    let p = z.open(traced_panic, ()).await?;
    let pid = p.pid();
    let e = p.result().await.unwrap_err();
    ensure(e.kind() == ErrorKind::Panicked, format!("{e}"))?;
    check_span(&rec, "traced_panic", "panicked", Some(pid))?;

    let p = z.open(traced_segfault, ()).await?;
    let pid = p.pid();
    let e = p.result().await.unwrap_err();
    ensure(e.kind() == ErrorKind::Signaled, format!("{e}"))?;
    check_span(&rec, "traced_segfault", "signaled", Some(pid))?;
    // What the worker wrote before it crashed is still delivered.
    let (serial, _) = rec.task_span("traced_segfault")?;
    let events = rec.events_in(serial);
    ensure(
        events
            .iter()
            .any(|e| field(&e.fields, "message") == "about to crash"),
        format!("the crashed worker's event: {events:?}"),
    )?;

    let p = z.open(traced_sleep, ()).await?;
    let pid = p.pid();
    drop(p);
    check_span(&rec, "traced_sleep", "cancelled", Some(pid))
}

async fn worker_events_arrive_in_the_task_span(z: Zygote, rec: Recorder) -> TestResult {
    // `traced_ok` ran in the previous trial too: use a fresh span.
    rec.log.lock().unwrap().spans.clear();
    ensure(z.run(traced_ok, 5).await? == 10, "value")?;
    let (serial, _) = rec.task_span("traced_ok")?;
    let events = rec.events_in(serial);
    let info = events
        .iter()
        .find(|e| e.level == tracing::Level::INFO)
        .ok_or_else(|| format!("no INFO event in the task span: {events:?}"))?;
    ensure(info.target == "run_in_process::worker", &info.target)?;
    ensure(
        field(&info.fields, "message") == "hello from the worker",
        format!("{:?}", info.fields),
    )?;
    ensure(
        field(&info.fields, "worker.fields") == "answer=10 who=worker",
        format!("{:?}", info.fields),
    )?;
    // The worker's own target is the module of the `info!`: this crate's root.
    ensure(
        field(&info.fields, "worker.target") == module_path!(),
        format!("{:?}", info.fields),
    )?;
    ensure(
        events.iter().any(|e| {
            e.level == tracing::Level::DEBUG && field(&e.fields, "message") == "a debug event"
        }),
        format!("no DEBUG event: {events:?}"),
    )?;
    ensure(events.len() == 2, format!("{events:?}"))
}

/// In reuse mode each task's events land in its own span, also when one
/// worker serves them all.
async fn a_reused_workers_events_arrive_in_each_tasks_span(z: Zygote, rec: Recorder) -> TestResult {
    let mut pids = std::collections::BTreeSet::new();
    for n in 1..=3u64 {
        rec.log.lock().unwrap().spans.clear();
        pids.insert(z.run(traced_reused, n).await?);
        let (serial, span) = rec.task_span("traced_reused")?;
        ensure(
            field(&span.fields, "outcome") == "ok",
            format!("task {n}: {span:?}"),
        )?;
        let events = rec.events_in(serial);
        ensure(
            events.len() == 1 && field(&events[0].fields, "worker.fields") == format!("n={n}"),
            format!("task {n}: {events:?}"),
        )?;
    }
    ensure(
        pids.len() == 1,
        format!("one worker served them all: {pids:?}"),
    )
}

async fn a_flood_is_bounded_and_counted(z: Zygote, rec: Recorder) -> TestResult {
    // The worker does not wait for the parent: a million events cost it no
    // more than the time to count them, and the task returns.
    ensure(z.run(traced_flood, FLOOD).await? == FLOOD, "value")?;
    let (serial, span) = rec.task_span("traced_flood")?;
    ensure(field(&span.fields, "outcome") == "ok", "outcome")?;
    let events = rec.events_in(serial);
    let kept = events
        .iter()
        .filter(|e| field(&e.fields, "message") == "flood")
        .count() as u64;
    // 1024 records of this size fit the buffer's bytes.
    ensure(kept == 1024, format!("{kept} events kept"))?;
    let note = events
        .iter()
        .find(|e| e.fields.contains_key("dropped"))
        .ok_or("no dropped-events note")?;
    ensure(note.level == tracing::Level::WARN, "the note is a warning")?;
    ensure(
        field(&note.fields, "dropped") == (FLOOD - kept).to_string(),
        format!("{:?}", note.fields),
    )?;
    // The first ones are kept, in order.
    ensure(
        field(&events[0].fields, "worker.fields") == "i=0",
        format!("{:?}", events[0].fields),
    )
}

fn traced_confined(_: ()) -> u64 {
    tracing::info!("confined and still heard");
    7
}

async fn a_confined_task_is_traced_too(z: Zygote, rec: Recorder) -> TestResult {
    // The buffer is mapped before the sandbox and the fd limit apply, and
    // its fd closed: neither takes anything from the task.
    let sandbox = run_in_process::Sandbox::new()
        .deny_network()
        .deny_exec()
        .deny_fs_writes();
    let task = z
        .task(traced_confined, ())
        .sandbox(sandbox)
        .open_files_limit(6);
    ensure(task.run().await? == 7, "value")?;
    let (serial, _) = rec.task_span("traced_confined")?;
    let events = rec.events_in(serial);
    ensure(
        events
            .iter()
            .any(|e| field(&e.fields, "message") == "confined and still heard"),
        format!("{events:?}"),
    )
}

fn main() {
    let zygote = Zygote::builder()
        .max_in_flight(4)
        .start()
        .expect("start the zygote");
    // One worker at a time, serving every task: its trace buffers come with
    // jobs on the socket, which its job cell points to (`job_cell`).
    let reused = Zygote::builder()
        .max_in_flight(1)
        .parked(1)
        .reuse(1000)
        .start()
        .expect("start the reuse zygote");
    let recorder = Recorder::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(recorder.clone()))
        .expect("install the recording subscriber");

    let args = common::harness_args();
    let mut trials = Vec::new();
    macro_rules! trial {
        ($name:ident) => {{
            let z = zygote.clone();
            let rec = recorder.clone();
            trials.push(Trial::test(stringify!($name), move || {
                checked(&z, |z| $name(z, rec))
            }));
        }};
    }
    trial!(spans_carry_name_pid_and_outcome);
    trial!(worker_events_arrive_in_the_task_span);
    trial!(a_flood_is_bounded_and_counted);
    trial!(a_confined_task_is_traced_too);
    trials.push(Trial::test(
        "a_reused_workers_events_arrive_in_each_tasks_span",
        {
            let rec = recorder.clone();
            move || {
                common::checked_pooled(&reused, common::REUSED_KEPT, |z| {
                    a_reused_workers_events_arrive_in_each_tasks_span(z, rec)
                })
            }
        },
    ));
    libtest_mimic::run(&args, trials).exit();
}
