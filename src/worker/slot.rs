//! A slot thread: receives one job at a time from the scheduler, runs it in a fresh boa
//! context (contexts are never shared between jobs, so nothing leaks between them),
//! and reports the outcome. Everything runs under `catch_unwind`.

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use super::pool::{Msg, Queued};
use crate::js::{self, Host, Interrupt, JobHost, LogSink, Reason, RunError};
use crate::services::Services;

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
    /// Threw, rejected, or could not be started; the message.
    Failed(String),
    /// Stopped by the host.
    Interrupted(Reason),
}

pub(crate) fn run(
    index: usize,
    gen: u64,
    rx: &Receiver<SlotMsg>,
    events: &Sender<Msg>,
    services: &Arc<Services>,
) {
    while let Ok(SlotMsg::Run(run)) = rx.recv() {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_job(&run.job, &run.interrupt, services)
        }))
        .unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            log::error!("job {} panicked the runtime: {msg}", run.job.id);
            Outcome::Failed(format!("internal error while running the job: {msg}"))
        });
        if events
            .send(Msg::Finished {
                slot: index,
                gen,
                outcome,
            })
            .is_err()
        {
            return;
        }
    }
}

fn run_job(job: &Queued, interrupt: &Interrupt, services: &Arc<Services>) -> Outcome {
    let source = match services.store.app_file(&job.app, &job.path) {
        Ok(Some(s)) => s,
        Ok(None) => {
            return Outcome::Failed(format!(
                "worker file {} no longer exists in app '{}'",
                job.path, job.app
            ))
        }
        Err(e) => return Outcome::Failed(format!("loading {}: {e}", job.path)),
    };
    let Ok(source) = String::from_utf8(source) else {
        return Outcome::Failed(format!("{} is not valid UTF-8", job.path));
    };
    let host = Host {
        app: Arc::from(job.app.as_str()),
        services: services.clone(),
        interrupt: interrupt.clone(),
        job: Some(Arc::new(JobHost {
            id: job.id.clone(),
            attempt: job.attempt,
            data: job.data.clone(),
        })),
        sink: LogSink::Job,
    };
    let result = (|| -> Result<Option<String>, RunError> {
        let mut ctx = js::new_context(host)?;
        let exports = js::load_module(&mut ctx, &job.path, &source, interrupt)?;
        let job_obj = ctx
            .global_object()
            .get(boa_engine::js_string!("__job"), &mut ctx)
            .map_err(|e| RunError::Thrown(e.to_string()))?;
        let out = js::call(&mut ctx, &exports, &[job_obj], interrupt)?;
        let json = js::to_json(&out, &mut ctx)?;
        Ok(json.map(|j| j.to_string()))
    })();
    match result {
        Ok(Some(r)) if r.len() > super::MAX_JSON_BYTES => Outcome::Failed(format!(
            "the result is {} bytes of JSON; the limit is {}",
            r.len(),
            super::MAX_JSON_BYTES
        )),
        Ok(r) => Outcome::Done(r),
        Err(RunError::Thrown(m)) => Outcome::Failed(m),
        Err(RunError::Interrupted(r)) => Outcome::Interrupted(r),
    }
}
