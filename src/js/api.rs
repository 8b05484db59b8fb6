//! The native half of the `fazt.*`, `console` and `job` API. Each function reads the
//! [`Host`] stored in the context, checks the run was not stopped, validates its input
//! and calls a service. The public shape of the API is built in `prelude.rs`.

use std::time::Duration;

use boa_engine::object::builtins::JsArray;
use boa_engine::{
    js_string, Context, JsError, JsNativeError, JsObject, JsResult, JsString, JsValue,
};

use super::runtime::{Host, LogSink};
use boa_engine::error::PanicError;

/// A host function as boa calls it.
pub type Native = fn(&JsValue, &[JsValue], &mut Context) -> JsResult<JsValue>;

/// Host functions defined outside `js/` (`fazt.worker.*`, `job.*`, `fazt.realtime.*`),
/// each as (name on `__host`, function, arity). The composition root (`app::start`)
/// puts them in the host's [`Env`](super::Env), so `js` depends on none of
/// the modules that define them.
#[derive(Clone, Default)]
pub struct Natives {
    /// In every context.
    pub api: Vec<(&'static str, Native, usize)>,
    /// Only in job contexts.
    pub job: Vec<(&'static str, Native, usize)>,
}

/// The host of the running context, after checking the run was not stopped. A stopped
/// run gets an uncatchable error, so `try/catch` around a loop that calls fazt cannot
/// swallow a cancel.
pub(crate) fn host(ctx: &Context) -> JsResult<Host> {
    let host = ctx
        .get_data::<Host>()
        .cloned()
        .ok_or_else(|| JsNativeError::error().with_message("no host in this context"))?;
    if let Some(reason) = host.interrupt.check() {
        return Err(stopped(reason));
    }
    Ok(host)
}

pub(crate) fn stopped(reason: crate::js::Reason) -> JsError {
    PanicError::new(format!("stopped: {reason:?}")).into()
}

pub(crate) fn type_error(msg: impl Into<String>) -> JsError {
    JsNativeError::typ().with_message(msg.into()).into()
}

pub(crate) fn plain_error(msg: impl Into<String>) -> JsError {
    JsNativeError::error().with_message(msg.into()).into()
}

/// Argument `i` as a string; `what` names it in the error.
pub(crate) fn str_arg(args: &[JsValue], i: usize, what: &str) -> JsResult<String> {
    match args.get(i) {
        Some(v) if v.is_string() => Ok(v
            .as_string()
            .map(|s| s.to_std_string_escaped())
            .unwrap_or_default()),
        _ => Err(type_error(format!("{what} must be a string"))),
    }
}

/// Argument `i` as a string, or None when absent/undefined/null.
pub(crate) fn opt_str_arg(args: &[JsValue], i: usize, what: &str) -> JsResult<Option<String>> {
    match args.get(i) {
        None => Ok(None),
        Some(v) if v.is_undefined() || v.is_null() => Ok(None),
        Some(_) => str_arg(args, i, what).map(Some),
    }
}

/// Why a host call failed when the script did nothing wrong. It rides on the thrown
/// Error as its `cause`, an object only the host can make, so a handler that does not
/// catch it ends typed ([`RunError::Failed`](super::RunError::Failed): 503 or 429) rather
/// than as a 500 "the handler threw"; and an error the script throws with that cause
/// (wrapping it) keeps the type.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, boa_gc::Trace, boa_gc::Finalize, boa_engine::JsData,
)]
#[boa_gc(empty_trace)]
pub enum Failure {
    /// The store cannot write (or is shutting down): try again later.
    Unavailable,
    /// A bounded queue is full: try again later.
    Busy,
}

/// A plain `Error` carrying `failure` as its cause (see [`Failure`]).
pub(crate) fn failure_error(failure: Failure, msg: impl Into<String>) -> JsError {
    let marker = JsObject::from_proto_and_data(None, failure);
    JsNativeError::error()
        .with_message(msg.into())
        .with_cause(JsError::from_opaque(marker.into()))
        .into()
}

/// The [`Failure`] a thrown value carries, read without running any script: only
/// built-in Error objects are looked at, and only their own `cause` data property.
pub(crate) fn failure_of(err: &JsError) -> Option<Failure> {
    let cause = match err.as_native() {
        Some(native) => native.cause()?.as_opaque()?.clone(),
        None => {
            let obj = err.as_opaque()?.as_object()?;
            if !obj.is::<boa_engine::builtins::error::Error>() {
                return None;
            }
            let key = boa_engine::property::PropertyKey::from(js_string!("cause"));
            let desc = obj.borrow().properties().get(&key)?;
            desc.value()?.clone()
        }
    };
    let marker = cause.as_object()?;
    let failure = marker.downcast_ref::<Failure>().map(|f| *f);
    failure
}

/// A store error as a JS error: one the server cannot help now (cannot write, shutting
/// down) carries [`Failure::Unavailable`]; the rest (quota, not found) are plain.
pub(crate) fn store_error(e: crate::store::Error) -> JsError {
    if e.is_transient() || matches!(e, crate::store::Error::Closed) {
        failure_error(Failure::Unavailable, e.to_string())
    } else {
        plain_error(e.to_string())
    }
}

/// Writes one `console.*` or `job.log` line where the running context's lines go.
pub(super) fn log_line(ctx: &Context, level: &str, msg: &str) -> JsResult<()> {
    let host = host(ctx)?;
    match (&host.sink, &host.job) {
        (LogSink::Job, Some(job)) => {
            let line = crate::job::truncate_log_line(msg).into_owned();
            host.services
                .store()
                .job_log(&job.id, level, line, crate::job::LOG_KEEP);
        }
        // Cut like job log lines: one call must not put megabytes into the server log.
        _ => match (level, crate::job::truncate_log_line(msg)) {
            ("error", msg) => log::error!(target: "app", "[{}] {msg}", host.app),
            ("warn", msg) => log::warn!(target: "app", "[{}] {msg}", host.app),
            ("debug", msg) => log::debug!(target: "app", "[{}] {msg}", host.app),
            (_, msg) => log::info!(target: "app", "[{}] {msg}", host.app),
        },
    }
    Ok(())
}

pub(super) fn kv_get(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let host = host(ctx)?;
    let key = str_arg(args, 0, "fazt.storage.kv.get: key")?;
    match host
        .services
        .store()
        .kv_get(&host.app, &key)
        .map_err(store_error)?
    {
        Some(v) => Ok(JsString::from(v.as_str()).into()),
        None => Ok(JsValue::null()),
    }
}

pub(super) fn kv_set(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let host = host(ctx)?;
    let key = str_arg(args, 0, "fazt.storage.kv.set: key")?;
    let value = str_arg(args, 1, "fazt.storage.kv.set: value")?;
    let ttl = match args.get(2) {
        None => None,
        Some(v) if v.is_undefined() || v.is_null() => None,
        Some(v) => match v.as_number() {
            Some(n) if n.is_finite() && (1.0..=1e15).contains(&n) => Some(n as i64),
            _ => {
                return Err(type_error(
                    "fazt.storage.kv.set: ttlMs must be a positive number of milliseconds",
                ))
            }
        },
    };
    host.services
        .store()
        .kv_set(&host.app, &key, value, ttl)
        .map_err(store_error)?;
    Ok(JsValue::undefined())
}

pub(super) fn kv_delete(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let host = host(ctx)?;
    let key = str_arg(args, 0, "fazt.storage.kv.delete: key")?;
    let existed = host
        .services
        .store()
        .kv_delete(&host.app, &key)
        .map_err(store_error)?;
    Ok(existed.into())
}

pub(super) fn kv_list(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let host = host(ctx)?;
    let prefix = str_arg(args, 0, "fazt.storage.kv.list: prefix")?;
    let keys = host
        .services
        .store()
        .kv_list(&host.app, &prefix)
        .map_err(store_error)?;
    let values = keys
        .into_iter()
        .map(|k| JsValue::from(JsString::from(k.as_str())));
    Ok(JsArray::from_iter(values, ctx).into())
}

/// Blocks the JS thread for `ms`, waking at once when the run is stopped.
pub(crate) fn sleep_for(host: &Host, ms: f64) -> JsResult<JsValue> {
    if !ms.is_finite() || ms < 0.0 {
        return Err(type_error("job.sleep: ms must be a non-negative number"));
    }
    match host.interrupt.sleep(Duration::from_millis(ms as u64)) {
        Some(reason) => Err(stopped(reason)),
        None => Ok(JsValue::undefined()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boa_engine::property::Attribute;

    fn thrown_by(ctx: &mut Context, src: &str) -> JsError {
        match ctx.eval(boa_engine::Source::from_bytes(src)) {
            Err(e) => e,
            Ok(v) => panic!("{src} returned {v:?}"),
        }
    }

    #[test]
    fn a_host_failure_survives_a_throw_and_cannot_be_forged() {
        let mut ctx = Context::default();
        let native = failure_error(Failure::Unavailable, "cannot write");
        assert_eq!(failure_of(&native), Some(Failure::Unavailable));
        // As JS sees it once thrown: an Error object whose cause the host made.
        let opaque = JsError::from_opaque(native.into_opaque(&mut ctx).expect("an object"));
        assert_eq!(failure_of(&opaque), Some(Failure::Unavailable));
        let caught = opaque.into_opaque(&mut ctx).expect("an object");
        ctx.register_global_property(js_string!("caught"), caught, Attribute::all())
            .expect("global");
        // Wrapping keeps the type; a look-alike made in JS does not get one.
        let wrapped = thrown_by(&mut ctx, "throw new Error('w', { cause: caught.cause })");
        assert_eq!(failure_of(&wrapped), Some(Failure::Unavailable));
        for forged in [
            "throw new Error('x', { cause: {} })",
            "throw { cause: caught.cause }",
            "throw new Error('x', { cause: 'Unavailable' })",
            "throw 'Unavailable'",
        ] {
            assert_eq!(failure_of(&thrown_by(&mut ctx, forged)), None, "{forged}");
        }
        assert_eq!(failure_of(&plain_error("x")), None);
    }
}
