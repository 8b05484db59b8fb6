//! Boa contexts and interruptible execution. Every evaluation runs through
//! `evaluate_async_with_budget`, polled by hand, so the host checks the [`Interrupt`]
//! between slices: a `while(true){}` stops within one slice of a cancel or timeout.

use std::future::Future;
use std::sync::Arc;
use std::task::{Poll, Waker};

use boa_engine::builtins::promise::PromiseState;
use boa_engine::object::builtins::JsPromise;
use boa_engine::property::Attribute;
use boa_engine::{js_string, Context, JsError, JsObject, JsValue, Script, Source};

use super::interrupt::{Interrupt, Reason};
use crate::services::Services;

/// "Clock cycles" of boa's VM between two interrupt checks: a few tens of microseconds.
const BUDGET: u32 = 20_000;

/// Iterations one function frame may run before boa throws an uncatchable error. The
/// budgeted loop stops ordinary code long before this; it is the safety net for loops
/// boa runs outside that loop (native callbacks such as `sort` comparators).
const LOOP_ITERATION_LIMIT: u64 = 1_000_000_000;

/// Deepest call nesting user code may reach before boa stops it with an error.
const RECURSION_LIMIT: usize = 4096;
/// Most values on boa's operand stack.
const VALUE_STACK_LIMIT: usize = 256 * 1024;

/// Why a piece of JS did not produce a value.
#[derive(Debug, Clone, PartialEq)]
pub enum RunError {
    /// The user's code threw (or a promise rejected); the string is what it threw.
    Thrown(String),
    /// The host stopped it (cancel, timeout, memory, shutdown, idle).
    Interrupted(Reason),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Thrown(m) => f.write_str(m),
            RunError::Interrupted(r) => write!(f, "interrupted ({r:?})"),
        }
    }
}

/// Where `console.*` and `job.log` lines go.
#[derive(Clone)]
pub enum LogSink {
    /// Handlers: the server log, tagged with the app name.
    Server,
    /// Workers: the job's log (stored, last 1,000 kept).
    Job,
}

/// What a running job exposes to its `job` object.
pub struct JobHost {
    pub id: String,
    pub attempt: i64,
    /// JSON text of `data` given at spawn.
    pub data: Option<String>,
}

/// Host state stored in each Context: which app is running, the services it may reach,
/// and the interrupt of the current run. Replaced before every run of a cached context.
#[derive(Clone)]
pub struct Host {
    pub app: Arc<str>,
    pub services: Arc<Services>,
    pub interrupt: Interrupt,
    pub job: Option<Arc<JobHost>>,
    pub sink: LogSink,
}

/// A fresh context with the `fazt` API, `console` and the interruptible builtins.
pub fn new_context(host: Host) -> Result<Context, RunError> {
    let mut ctx = boa_engine::context::ContextBuilder::new()
        .job_executor(std::rc::Rc::new(super::jobs::InterruptibleJobs::default()))
        .build()
        .map_err(|e| RunError::Thrown(format!("creating a JS context: {e}")))?;
    let limits = ctx.runtime_limits_mut();
    limits.set_loop_iteration_limit(LOOP_ITERATION_LIMIT);
    // boa's defaults (512 calls deep, 10k stack values) are too tight for real code;
    // JS-to-JS calls use heap frames, and the thread stacks are 16 MB.
    limits.set_recursion_limit(RECURSION_LIMIT);
    limits.set_stack_size_limit(VALUE_STACK_LIMIT);
    let is_job = host.job.is_some();
    let interrupt = host.interrupt.clone();
    ctx.insert_data(host);
    let natives = super::api::natives(&mut ctx);
    ctx.register_global_property(js_string!("__host"), natives, Attribute::CONFIGURABLE)
        .map_err(|e| RunError::Thrown(format!("installing the host API: {e}")))?;
    ctx.register_global_property(
        js_string!("__isJob"),
        JsValue::from(is_job),
        Attribute::CONFIGURABLE,
    )
    .map_err(|e| RunError::Thrown(format!("installing the host API: {e}")))?;
    let prelude = Script::parse(Source::from_bytes(PRELUDE), None, &mut ctx)
        .map_err(|e| RunError::Thrown(format!("prelude: {e}")))?;
    run_script(&mut ctx, &prelude, &interrupt)?;
    Ok(ctx)
}

const PRELUDE: &str = include_str!("prelude.js");

/// Evaluates a CommonJS module and returns its `module.exports`.
pub fn load_module(
    ctx: &mut Context,
    name: &str,
    source: &str,
    interrupt: &Interrupt,
) -> Result<JsValue, RunError> {
    // The wrapper keeps the user's first line on line 1, so error positions match.
    let wrapped = format!("(function (module, exports) {{{source}\n}})");
    let script = Script::parse(Source::from_bytes(wrapped.as_bytes()), None, ctx)
        .map_err(|e| RunError::Thrown(format!("{name}: {e}")))?;
    let factory = run_script(ctx, &script, interrupt)?;
    let exports = JsObject::with_object_proto(ctx.intrinsics());
    let module = JsObject::with_object_proto(ctx.intrinsics());
    module
        .set(js_string!("exports"), exports.clone(), false, ctx)
        .map_err(|e| thrown(e, ctx))?;
    call(
        ctx,
        &factory,
        &[module.clone().into(), exports.into()],
        interrupt,
    )
    .map_err(|e| match e {
        RunError::Thrown(m) => RunError::Thrown(format!("{name}: {m}")),
        other => other,
    })?;
    module
        .get(js_string!("exports"), ctx)
        .map_err(|e| thrown(e, ctx))
}

/// Calls `func(args...)` under the interrupt. A returned promise is driven until it
/// settles; its rejection is a `Thrown`.
pub fn call(
    ctx: &mut Context,
    func: &JsValue,
    args: &[JsValue],
    interrupt: &Interrupt,
) -> Result<JsValue, RunError> {
    if !func.is_callable() {
        return Err(RunError::Thrown(
            "module.exports is not a function".to_string(),
        ));
    }
    let arr = boa_engine::object::builtins::JsArray::from_iter(args.iter().cloned(), ctx);
    let global = ctx.global_object();
    global
        .set(js_string!("__fazt_fn"), func.clone(), false, ctx)
        .map_err(|e| thrown(e, ctx))?;
    global
        .set(js_string!("__fazt_args"), arr, false, ctx)
        .map_err(|e| thrown(e, ctx))?;
    let script = match ctx.get_data::<CallScript>() {
        Some(cached) => cached.0.clone(),
        None => {
            let s = Script::parse(Source::from_bytes("__fazt_fn(...__fazt_args)"), None, ctx)
                .map_err(|e| RunError::Thrown(e.to_string()))?;
            ctx.insert_data(CallScript(s.clone()));
            s
        }
    };
    let value = run_script(ctx, &script, interrupt);
    let _ = global.delete_property_or_throw(js_string!("__fazt_fn"), ctx);
    let _ = global.delete_property_or_throw(js_string!("__fazt_args"), ctx);
    let value = value?;
    let settled = settle(ctx, value, interrupt)?;
    // Drain what the run left queued (reactions it did not await), like a microtask
    // checkpoint: otherwise it would run at the start of the next call of a reused
    // context, under the next request's or job's host.
    ctx.run_jobs().map_err(|e| classify(e, ctx, interrupt))?;
    Ok(settled)
}

/// The trampoline `call` evaluates, parsed once per context: parsing is most of the
/// cost of a warm call. Held in the context's host data, it stays rooted while the
/// context lives.
struct CallScript(Script);

fn settle(ctx: &mut Context, value: JsValue, interrupt: &Interrupt) -> Result<JsValue, RunError> {
    let Some(obj) = value.as_object() else {
        return Ok(value);
    };
    let Ok(promise) = JsPromise::from_object(obj.clone()) else {
        return Ok(value);
    };
    loop {
        if let Some(r) = interrupt.check() {
            return Err(RunError::Interrupted(r));
        }
        match promise.state() {
            PromiseState::Fulfilled(v) => return Ok(v),
            PromiseState::Rejected(e) => {
                return Err(RunError::Thrown(describe(&JsError::from_opaque(e), ctx)))
            }
            PromiseState::Pending => {}
        }
        ctx.run_jobs().map_err(|e| classify(e, ctx, interrupt))?;
        if let PromiseState::Pending = promise.state() {
            // Nothing is left to run (fazt has no timers), so it can never settle.
            if let Some(r) = interrupt.check() {
                return Err(RunError::Interrupted(r));
            }
            return Err(RunError::Thrown(
                "the returned promise never settles (awaiting something that never resolves)"
                    .to_string(),
            ));
        }
    }
}

/// Runs a parsed script in budget slices, checking the interrupt between slices.
pub(crate) fn run_script(
    ctx: &mut Context,
    script: &Script,
    interrupt: &Interrupt,
) -> Result<JsValue, RunError> {
    let result = {
        let fut = script.evaluate_async_with_budget(ctx, BUDGET);
        let mut fut = std::pin::pin!(fut);
        let mut cx = std::task::Context::from_waker(Waker::noop());
        loop {
            if let Some(r) = interrupt.check() {
                // Dropping the future abandons the frames mid-flight; the caller must
                // throw this context away.
                return Err(RunError::Interrupted(r));
            }
            if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
                break r;
            }
        }
    };
    result.map_err(|e| classify(e, ctx, interrupt))
}

/// Turns a boa error into a `RunError`: an uncatchable error raised because we were
/// interrupted (e.g. inside `job.sleep`) is an interrupt, anything else a throw.
fn classify(err: JsError, ctx: &mut Context, interrupt: &Interrupt) -> RunError {
    if err.as_engine().is_some() {
        if let Some(r) = interrupt.check() {
            return RunError::Interrupted(r);
        }
    }
    RunError::Thrown(describe(&err, ctx))
}

fn thrown(err: JsError, ctx: &mut Context) -> RunError {
    RunError::Thrown(describe(&err, ctx))
}

/// A readable message for a thrown value: `String(err)` for Error objects ("TypeError:
/// x is not a function"), JSON for other values.
pub(crate) fn describe(err: &JsError, ctx: &mut Context) -> String {
    if let Some(engine) = err.as_engine() {
        return engine.to_string();
    }
    let value = match err.clone().into_opaque(ctx) {
        Ok(v) => v,
        Err(e) => return e.to_string(),
    };
    if let Some(obj) = value.as_object() {
        if obj.is::<boa_engine::builtins::error::Error>() {
            if let Ok(s) = value.to_string(ctx) {
                return s.to_std_string_escaped();
            }
        }
    }
    if value.is_string() {
        if let Ok(s) = value.to_string(ctx) {
            return s.to_std_string_escaped();
        }
    }
    match value.to_json(ctx) {
        Ok(Some(j)) => j.to_string(),
        _ => value.display().to_string(),
    }
}

/// A JS value as JSON (`undefined`, functions and symbols give None).
pub fn to_json(value: &JsValue, ctx: &mut Context) -> Result<Option<serde_json::Value>, RunError> {
    if value.is_undefined() || value.is_callable() || value.is_symbol() {
        return Ok(None);
    }
    let json = value.to_json(ctx).map_err(|e| thrown(e, ctx))?;
    Ok(json.map(integral_numbers))
}

/// JS has only doubles; write whole numbers as integers (`3`, not `3.0`).
fn integral_numbers(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 => {
                Value::from(f as i64)
            }
            _ => Value::Number(n),
        },
        Value::Array(a) => Value::Array(a.into_iter().map(integral_numbers).collect()),
        Value::Object(o) => Value::Object(
            o.into_iter()
                .map(|(k, v)| (k, integral_numbers(v)))
                .collect(),
        ),
        other => other,
    }
}

pub fn from_json(value: &serde_json::Value, ctx: &mut Context) -> Result<JsValue, RunError> {
    JsValue::from_json(value, ctx).map_err(|e| thrown(e, ctx))
}
