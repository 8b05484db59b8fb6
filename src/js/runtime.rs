//! Boa contexts and interruptible execution. Every evaluation runs with the run's
//! [`Interrupt`] flag installed in the (patched) engine, which stops loops, calls and
//! regex matches wherever they run, also inside native callbacks; the evaluation is
//! also polled in budget slices so the host looks at the interrupt between slices.
//!
//! Native stack arithmetic (why no JS input overflows a thread's stack). JS threads
//! have 16 MiB (`js::JS_STACK_BYTES`). JS-to-JS calls use heap frames (at most
//! `RECURSION_LIMIT` of them), not the native stack. What does recurse natively, and
//! its guard (all in the patched engine, see vendor/PATCHES.md):
//! - natives that call back into JS (`map`, getters, `toString`, Proxy traps, revivers):
//!   every call passes boa's call check, which throws a RangeError once less than
//!   512 KiB of native stack is left (or boa's 4,096-call limit ends it first);
//! - JSON conversions (`JSON.stringify`, results, kv, checkpoints, job data,
//!   broadcasts): at most 127 levels (RangeError), a few hundred bytes each;
//!   `JSON.parse` without a reviver is parsed by serde_json (127 levels, no JS parser);
//! - the parser (`eval`, `new Function`, module source, `JSON.parse` with a reviver):
//!   checks the stack at every level and caps nesting at 1,000 units (SyntaxError); it
//!   takes up to ~115 KiB per level of brackets, so a 16 MiB thread parses ~130 levels
//!   of `[`, ~990 of `!`. The compiler then recurses over that tree unchecked, needing
//!   less stack per level than the parser did (measured for every form in
//!   `deepest_parsable_source_also_compiles`), from the same height;
//! - regex compilation: regress caps group nesting at 256.
//!
//! The code between two checks (one native frame chain, one JSON level, one parser
//! production) stays far below the 512 KiB margin, so the deepest input ends in an
//! error with the margin to spare.

use std::future::Future;
use std::sync::Arc;
use std::task::{Poll, Waker};

use boa_engine::builtins::promise::PromiseState;
use boa_engine::object::builtins::JsPromise;
use boa_engine::property::PropertyDescriptor;
use boa_engine::{Context, JsError, JsObject, JsString, JsValue, Script};

use super::api::Natives;
use super::interrupt::{Interrupt, Reason};
use crate::store::Store;

/// "Clock cycles" of boa's VM between two interrupt checks: a few tens of microseconds.
const BUDGET: u32 = 20_000;

/// Iterations one function frame may run before boa throws an uncatchable error. The
/// interrupt flag stops runaway loops anywhere (also in native callbacks such as `sort`
/// comparators); this stays as a last resort should a stop never be asked for.
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
    /// A host call failed for a reason that is not the script's (see
    /// [`Failure`](super::Failure)) and the script let it through; the string is the
    /// message.
    Failed(super::Failure, String),
    /// The host stopped it (cancel, timeout, memory, shutdown, idle).
    Interrupted(Reason),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Thrown(m) | RunError::Failed(_, m) => f.write_str(m),
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
    /// Restarts of a daemon before this run (with `attempt`, which run this is).
    pub restarts: i64,
    /// JSON text of `data` given at spawn.
    pub data: Option<String>,
}

/// What the JS host reaches the rest of the server by. The composition
/// (`services::Services`) implements it, so `js` names none of the modules above it.
pub trait Env: Send + Sync {
    /// The app's files, kv data and job rows.
    fn store(&self) -> &Store;
    /// Host functions other modules define, wired in by `app::start`.
    fn natives(&self) -> &Natives;
    /// Puts into a new context the handles those host functions read with
    /// `Context::get_data` (each module's own type: no downcast of this trait).
    fn install(&self, ctx: &mut Context);
}

/// Host state stored in each Context: which app is running, the services it may reach,
/// and the interrupt of the current run. Replaced before every run of a cached context.
#[derive(Clone)]
pub struct Host {
    pub app: Arc<str>,
    pub services: Arc<dyn Env>,
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
    host.services.install(&mut ctx);
    ctx.insert_data(host);
    // Natives only: making a context parses and runs no JS (see prelude.rs).
    super::prelude::install(&mut ctx, is_job)
        .map_err(|e| RunError::Thrown(format!("installing the fazt API: {e}")))?;
    Ok(ctx)
}

/// Calls `func(args...)` under the interrupt. A returned promise is driven until it
/// settles; its rejection is a `Thrown`.
///
/// The call is a direct one into the engine, with the run's interrupt flag installed:
/// the engine checks the flag at every loop back-edge, call and regex match, and the
/// deadline and heap cap are enforced by the `fazt-deadlines` thread setting it, so no
/// budget slicing is needed here (a script trampoline through globals cost most of a
/// warm call).
pub fn call(
    ctx: &mut Context,
    func: &JsValue,
    args: &[JsValue],
    interrupt: &Interrupt,
) -> Result<JsValue, RunError> {
    let Some(f) = func.as_callable() else {
        return Err(RunError::Thrown(
            "module.exports is not a function".to_string(),
        ));
    };
    if let Some(r) = interrupt.check() {
        return Err(RunError::Interrupted(r));
    }
    ctx.set_interrupt_flag(Some(interrupt.flag()));
    let value = f
        .call(&JsValue::undefined(), args, ctx)
        .map_err(|e| classify(e, ctx, interrupt))?;
    let settled = settle(ctx, value, interrupt)?;
    // Drain what the run left queued (reactions it did not await), like a microtask
    // checkpoint: otherwise it would run at the start of the next call of a reused
    // context, under the next request's or job's host.
    ctx.run_jobs().map_err(|e| classify(e, ctx, interrupt))?;
    Ok(settled)
}

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
            PromiseState::Rejected(e) => return Err(thrown(JsError::from_opaque(e), ctx)),
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
    // The engine checks this flag at loop back-edges, calls and regex matches, so a
    // stop reaches code running inside native callbacks too (see vendor/PATCHES.md).
    ctx.set_interrupt_flag(Some(interrupt.flag()));
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
    thrown(err, ctx)
}

/// A throw as a `RunError`: typed when it carries a host [`Failure`](super::Failure).
fn thrown(err: JsError, ctx: &mut Context) -> RunError {
    let message = describe(&err, ctx);
    match super::api::failure_of(&err) {
        Some(f) => RunError::Failed(f, message),
        None => RunError::Thrown(message),
    }
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

/// An ordinary object with `props` as data properties (writable, enumerable,
/// configurable) in the given order: what `JsValue::from_json` makes of a JSON object,
/// built without a `serde_json` tree in between.
pub fn plain_object(
    ctx: &mut Context,
    props: impl IntoIterator<Item = (JsString, JsValue)>,
) -> JsValue {
    let obj = JsObject::with_object_proto(ctx.intrinsics());
    for (key, value) in props {
        obj.insert_property(
            key,
            PropertyDescriptor::builder()
                .value(value)
                .writable(true)
                .enumerable(true)
                .configurable(true),
        );
    }
    obj.into()
}

/// The engine patches (vendor/PATCHES.md) as our code relies on them, on plain boa
/// contexts.
#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use boa_engine::{Context, Script, Source};

    /// Runs `f` on a thread with a `stack`-byte native stack.
    fn on_stack<T: Send + 'static>(stack: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new()
            .stack_size(stack)
            .spawn(f)
            .expect("spawn")
            .join()
            .expect("test thread")
    }

    fn eval(ctx: &mut Context, src: &str) -> Result<String, String> {
        ctx.eval(Source::from_bytes(src))
            .map(|v| v.display().to_string())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn interrupt_flag_stops_loops_inside_native_callbacks_uncatchably() {
        for src in [
            "try { [1].map(() => { for (;;) {} }); } catch (e) {} 'caught'",
            "try { JSON.parse('[1]', () => { for (;;) {} }); } catch (e) {} 'caught'",
            "try { /(a+)+$/.test('a'.repeat(40) + 'b'); } catch (e) {} 'caught'",
            "function f(n) { return n ? f(n - 1) + f(n - 1) : 0; } try { [1].map(() => f(90)); } catch (e) {} 'caught'",
        ] {
            let mut ctx = Context::default();
            let flag = Arc::new(AtomicBool::new(false));
            ctx.set_interrupt_flag(Some(flag.clone()));
            let setter = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                flag.store(true, Ordering::SeqCst);
            });
            let t = Instant::now();
            let r = eval(&mut ctx, src);
            setter.join().expect("setter");
            let err = r.expect_err(src);
            assert!(
                err.starts_with("RuntimeLimitError: execution was interrupted"),
                "{src}: {err}"
            );
            assert!(t.elapsed() < Duration::from_secs(5), "{src}: {:?}", t.elapsed());
        }
    }

    #[test]
    fn native_recursion_on_a_small_stack_is_a_range_error() {
        // A 1 MiB stack holds far fewer nested native calls than boa's call-depth
        // limit, so only the native-stack guard can stop these.
        let out = on_stack(1 << 20, || {
            [
                "function f(n) { return n ? [n].map(() => f(n - 1)) : 0; } try { f(1e5); 'done' } catch (e) { String(e) }",
                "const mk = (n) => n ? { get x() { return mk(n - 1).x; } } : { x: 0 }; try { mk(1e5).x; 'done' } catch (e) { String(e) }",
                "const mk = (n) => new Proxy({}, { get() { return n ? mk(n - 1).x : 0; } }); try { mk(1e5).x; 'done' } catch (e) { String(e) }",
            ]
            .map(|src| {
                let mut ctx = Context::default();
                ctx.runtime_limits_mut().set_recursion_limit(1_000_000);
                ctx.runtime_limits_mut().set_stack_size_limit(10_000_000);
                eval(&mut ctx, src)
            })
        });
        for r in out {
            assert_eq!(
                r,
                Ok("\"RangeError: Maximum call stack size exceeded\"".into())
            );
        }
    }

    #[test]
    fn json_depth_is_capped_where_json_parse_stops() {
        let mut ctx = Context::default();
        let src = |n: usize| {
            format!(
                "let o = 1; for (let i = 0; i < {n}; i++) o = [o]; try {{ JSON.parse(JSON.stringify(o)); 'ok' }} catch (e) {{ String(e) }}"
            )
        };
        // serde_json, which JSON.parse validates with, takes at most 127 levels.
        assert_eq!(
            eval(&mut Context::default(), &src(127)),
            Ok("\"ok\"".into())
        );
        let deeper = eval(&mut Context::default(), &src(128)).unwrap_or_default();
        assert!(deeper.starts_with("\"RangeError"), "{deeper}");
        // The Rust conversion has the same cap.
        let v = ctx
            .eval(Source::from_bytes(
                "let p = 1; for (let i = 0; i < 128; i++) p = { p }; p",
            ))
            .expect("built");
        let e = v.to_json(&mut ctx).expect_err("too deep");
        assert!(e.to_string().starts_with("RangeError"), "{e}");
    }

    /// `JSON.parse` without a reviver is built by serde_json now (vendor/PATCHES.md):
    /// it must keep the language's semantics.
    #[test]
    fn json_parse_fast_path_keeps_js_semantics() {
        let mut ctx = Context::default();
        let cases = [
            // Document order for string keys, integer keys first ascending.
            (
                r#"Object.keys(JSON.parse('{"b":1,"a":2,"2":3,"1":4}')).join()"#,
                r#""1,2,b,a""#,
            ),
            // A repeated key keeps its first position and its last value.
            (
                r#"JSON.stringify(JSON.parse('{"a":1,"b":2,"a":3}'))"#,
                r#""{\"a\":3,\"b\":2}""#,
            ),
            // `__proto__` is an own property, not the prototype.
            (
                r#"const p = JSON.parse('{"__proto__":{"x":1}}'); [Object.getPrototypeOf(p) === Object.prototype, p.x === undefined, Object.keys(p).join()].join()"#,
                r#""true,true,__proto__""#,
            ),
            (r#"Object.is(JSON.parse('-0'), -0)"#, "true"),
            (
                r#"JSON.parse('[1.5, 1e3, 12345678901234567890, true, null, "a\\u00e9"]').join()"#,
                r#""1.5,1000,12345678901234567000,true,,aé""#,
            ),
            (
                r#"try { JSON.parse('{"a":1,}') } catch (e) { e.name }"#,
                r#""SyntaxError""#,
            ),
            (
                r#"try { JSON.parse('1 2') } catch (e) { e.name }"#,
                r#""SyntaxError""#,
            ),
            (r#"JSON.parse(' [ ] ').length"#, "0"),
            // A reviver still sees every value.
            (
                r#"JSON.stringify(JSON.parse('{"a":[1,2]}', (k, v) => typeof v === 'number' ? v * 10 : v))"#,
                r#""{\"a\":[10,20]}""#,
            ),
        ];
        for (src, want) in cases {
            assert_eq!(eval(&mut ctx, src).as_deref(), Ok(want), "{src}");
        }
    }

    /// The parser stops when the native stack runs low or nesting passes 1,000
    /// units; the compiler then recurses over that tree unchecked. For every form of
    /// nesting, parse as deep as the parser allows, then compile and run from the same
    /// stack height: overflowing here would abort the test process.
    #[test]
    fn deepest_parsable_source_also_compiles() {
        let forms: &[(&str, &str, &str, &str)] = &[
            ("brackets", "", "[", "]"),
            ("parens", "", "(", ")"),
            ("unary", "", "!", ""),
            ("objects", "", "({a:", "})"),
            ("binary", "", "1+", ""),
            ("member", "var o = {}; o.x = o; o", "", ".x"),
            ("calls", "var f = () => f; f", "", "()"),
            ("blocks", "", "{", "}"),
            ("functions", "", "function a(){", "}"),
            ("arrows", "", "a=>", ""),
            ("ternary", "", "1?", ":1"),
            ("templates", "", "`${", "}`"),
        ];
        for stack in [2usize << 20, 16 << 20] {
            let out = on_stack(stack, move || {
                forms
                    .iter()
                    .map(|(name, pre, open, close)| {
                        let body = if pre.is_empty() { "1" } else { "" };
                        let src =
                            |n: usize| format!("{pre}{}{body}{}", open.repeat(n), close.repeat(n));
                        let parses = |n: usize| {
                            Script::parse(
                                Source::from_bytes(&src(n)),
                                None,
                                &mut Context::default(),
                            )
                            .is_ok()
                        };
                        let (mut lo, mut hi) = (1usize, 5000usize);
                        while lo < hi {
                            let mid = (lo + hi).div_ceil(2);
                            if parses(mid) {
                                lo = mid
                            } else {
                                hi = mid - 1
                            }
                        }
                        let mut ctx = Context::default();
                        let r = Script::parse(Source::from_bytes(&src(lo)), None, &mut ctx)
                            .map_err(|e| e.to_string())
                            .and_then(|s| s.evaluate(&mut ctx).map_err(|e| e.to_string()));
                        (*name, lo, r.map(|_| ()))
                    })
                    .collect::<Vec<_>>()
            });
            for (name, depth, r) in out {
                println!("{} MiB stack: {name} parses {depth} deep", stack >> 20);
                assert_eq!(r, Ok(()), "{name} at depth {depth}");
                assert!(depth > 3, "{name}: only {depth} levels parse");
            }
        }
        // Past the cap nesting is refused even where the stack would allow it.
        let mut ctx = Context::default();
        let deep = format!("1{}", "+1".repeat(1001));
        let e = Script::parse(Source::from_bytes(&deep), None, &mut ctx).expect_err("too deep");
        assert!(e.to_string().contains("nests too deeply"), "{e}");
    }
}
