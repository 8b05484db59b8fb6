//! The promise job queue. boa's stock executor runs queued jobs (promise reactions,
//! `await` continuations) back to back without looking up; this one checks the run's
//! [`Interrupt`](super::Interrupt) before every job, so `for (;;) await 0` or an endless
//! promise chain is stopped. A single continuation runs to its next `await` in one go
//! (boa resumes it synchronously); a loop there is stopped by the engine's interrupt
//! flag like any other loop.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use boa_engine::job::{Job, JobExecutor};
use boa_engine::{Context, JsResult};

use super::runtime::Host;

#[derive(Default)]
pub(crate) struct InterruptibleJobs {
    queue: RefCell<VecDeque<Job>>,
}

impl JobExecutor for InterruptibleJobs {
    fn enqueue_job(self: Rc<Self>, job: Job, _context: &mut Context) {
        match job {
            Job::PromiseJob(_) | Job::GenericJob(_) => self.queue.borrow_mut().push_back(job),
            // fazt offers no timers and no native async functions; nothing enqueues
            // these, and silently running them later would be wrong.
            _ => log::debug!("dropped a JS job kind fazt does not run"),
        }
    }

    fn run_jobs(self: Rc<Self>, context: &mut Context) -> JsResult<()> {
        loop {
            let stop = context.get_data::<Host>().and_then(|h| h.interrupt.check());
            if let Some(reason) = stop {
                self.queue.borrow_mut().clear();
                return Err(super::api::stopped(reason));
            }
            let Some(job) = self.queue.borrow_mut().pop_front() else {
                return Ok(());
            };
            let result = match job {
                Job::PromiseJob(j) => j.call(context),
                Job::GenericJob(j) => j.call(context),
                _ => Ok(boa_engine::JsValue::undefined()),
            };
            // WeakRef targets are kept alive only until the current job ends.
            context.clear_kept_objects();
            if let Err(e) = result {
                // What is left belongs to a run that failed: never carry it into the
                // next run of a reused context.
                self.queue.borrow_mut().clear();
                return Err(e);
            }
        }
    }
}
