//! A slot thread: receives one job at a time from the scheduler, runs it in a boa
//! context kept warm for the app's next job (never shared between apps, thrown away
//! after an interrupted run), and reports the outcome. Everything runs under
//! `catch_unwind`.

use std::collections::HashMap;
use std::sync::Arc;

use boa_engine::{Context, JsValue};

use crossbeam_channel::Sender;

use super::mailbox::Mailbox;
use super::pool::{Msg, Queued};
use super::Env;
use crate::js::{self, Host, Interrupt, JobHost, LogSink, Reason, RunError};

pub(crate) struct RunJob {
    pub job: Queued,
    pub interrupt: Interrupt,
}

pub(crate) enum SlotMsg {
    Run(Box<RunJob>),
}

/// How a run ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Returned; the result as JSON text (None for undefined).
    Done(Option<String>),
    /// Threw or rejected; the message. Retried or restarted as configured.
    Failed(String),
    /// Cannot work however often it is tried (its worker file is gone); never retried.
    Fatal(String),
    /// Stopped by the host.
    Interrupted(Reason),
}

/// The context of the last app this slot ran, kept for that app's next job: a fresh
/// context costs ~0.2 ms plus loading the worker file, a warm one a function call. Only one
/// app's context is kept, so idle slots hold little memory; jobs of the same app may
/// see each other's globals, never another app's.
struct Warm {
    app: String,
    ctx: Context,
    /// The runner of each worker file loaded, by path (see `js::load_entry`).
    modules: HashMap<String, JsValue>,
    /// The deploy id whose code this context loaded: a redeploy, or a new app under
    /// the old name, gets a fresh context.
    deploy: i64,
    /// Heap growth of this thread across the jobs this context served.
    grown: i64,
}

/// Heap a slot may keep between jobs for its warm context.
const MAX_WARM_BYTES: i64 = 16 << 20;

pub(crate) fn run(
    index: usize,
    gen: u64,
    rx: &Mailbox<SlotMsg>,
    events: &Sender<Msg>,
    services: &Arc<dyn Env>,
    heap: &std::sync::atomic::AtomicI64,
) {
    let mut warm: Option<Warm> = None;
    let heap_now = || heap.load(std::sync::atomic::Ordering::Relaxed);
    while let Some(SlotMsg::Run(run)) = rx.recv() {
        let before = heap_now();
        let mut ran = std::time::Duration::ZERO;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_job(&run.job, &run.interrupt, services, &mut warm, &mut ran)
        }))
        .unwrap_or_else(|p| {
            warm = None;
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            log::error!("job {} panicked the runtime: {msg}", run.job.id);
            Outcome::Failed(format!("internal error while running the job: {msg}"))
        });
        // A warm context that grew (module-level caches, leaked globals) would hold
        // memory outside any job's reservation: collect, and if it is still too big,
        // start the next job fresh instead.
        if let Some(w) = warm.as_mut() {
            w.grown += heap_now() - before;
            if w.grown > MAX_WARM_BYTES {
                let pre = heap_now();
                boa_gc::force_collect();
                w.grown -= pre - heap_now();
                if w.grown > MAX_WARM_BYTES {
                    log::debug!(
                        "slot: warm context of '{}' dropped: grew {} bytes",
                        w.app,
                        w.grown
                    );
                    warm = None;
                    boa_gc::force_collect();
                }
            }
        }
        if events
            .send(Msg::Finished {
                slot: index,
                gen,
                outcome,
                ran,
            })
            .is_err()
        {
            return;
        }
    }
}

fn run_job(
    job: &Queued,
    interrupt: &Interrupt,
    services: &Arc<dyn Env>,
    warm: &mut Option<Warm>,
    ran: &mut std::time::Duration,
) -> Outcome {
    // The job is a run of the app's live deployment until it ends: a removal waits for
    // it (the pool stops it), and the deploy id says whether the warm context still
    // has the app's current code.
    let run = match services.enter_app(&job.app, None) {
        Ok(Some(run)) => run,
        Ok(None) => return Outcome::Fatal(format!("app '{}' was removed", job.app)),
        Err(e) => return Outcome::Failed(format!("looking up app '{}': {e}", job.app)),
    };
    let deploy = run.deployment.deploy_id;
    let reusable = warm
        .as_ref()
        .is_some_and(|w| w.app == job.app && w.deploy == deploy);
    crate::metrics::global().job_context(reusable);
    if !reusable {
        log::debug!(
            "slot: fresh context for app '{}' (warm for {:?})",
            job.app,
            warm.as_ref().map(|w| (&w.app, w.deploy))
        );
        *warm = None;
    }
    let loaded = warm
        .as_ref()
        .is_some_and(|w| w.modules.contains_key(&job.path));
    let source = if loaded {
        String::new()
    } else {
        match services.store().app_file(&job.app, &job.path) {
            Ok(Some(bytes)) => match String::from_utf8(bytes) {
                Ok(text) => text,
                Err(_) => return Outcome::Fatal(format!("{} is not valid UTF-8", job.path)),
            },
            Ok(None) => {
                return Outcome::Fatal(format!(
                    "worker file {} no longer exists in app '{}'",
                    job.path, job.app
                ))
            }
            Err(e) => return Outcome::Failed(format!("loading {}: {e}", job.path)),
        }
    };
    let host = Host {
        app: Arc::from(job.app.as_str()),
        services: services.clone(),
        interrupt: interrupt.clone(),
        job: Some(Arc::new(JobHost {
            id: job.id.clone(),
            attempt: job.attempt,
            restarts: job.restarts,
            data: job.data.clone(),
        })),
        sink: LogSink::Job,
    };
    let result = (|| -> Result<Option<String>, RunError> {
        let w = match warm {
            Some(w) => {
                w.ctx.insert_data(host);
                w
            }
            None => warm.insert(Warm {
                app: job.app.clone(),
                ctx: js::new_context(host)?,
                modules: HashMap::new(),
                deploy,
                grown: 0,
            }),
        };
        let exports = match w.modules.get(&job.path) {
            Some(e) => e.clone(),
            None => {
                let e =
                    js::load_entry(&mut w.ctx, &job.path, &source, js::Kind::Worker, interrupt)?;
                w.modules.insert(job.path.clone(), e.clone());
                e
            }
        };
        let called = std::time::Instant::now();
        let make_job = w
            .ctx
            .global_object()
            .get(boa_engine::js_string!("__fazt_make_job"), &mut w.ctx)
            .map_err(|e| RunError::Thrown(e.to_string()))?;
        let job_obj = js::call(&mut w.ctx, &make_job, &[], interrupt)?;
        let out = js::call(&mut w.ctx, &exports, &[job_obj], interrupt);
        *ran = called.elapsed();
        let out = out?;
        let json = js::to_json(&out, &mut w.ctx)?;
        Ok(json.map(|j| j.to_string()))
    })();
    if matches!(result, Err(RunError::Interrupted(_))) {
        // The interrupted run left frames behind: never reuse this context.
        *warm = None;
    }
    drop(run);
    match result {
        Ok(Some(r)) if r.len() > super::MAX_JSON_BYTES => Outcome::Failed(format!(
            "the result is {} bytes of JSON; the limit is {}",
            r.len(),
            super::MAX_JSON_BYTES
        )),
        Ok(r) => Outcome::Done(r),
        Err(RunError::Thrown(m) | RunError::Failed(_, m)) => Outcome::Failed(m),
        Err(RunError::Interrupted(r)) => Outcome::Interrupted(r),
    }
}
