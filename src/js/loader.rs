//! The one loader for app code: `api/*.js` handlers, `workers/*.js` jobs and the files
//! they `require`. It compiles a file as a function body (as Node's CommonJS wrapper
//! does), so every form fazt apps are written in runs unmodified: `module.exports =
//! function`, top-level code with `request`/`job` in scope and a top-level `return`,
//! or a top-level `function handler`. The JS half lives in `compat.js`, installed in a
//! context the first time it loads a file.

use std::path::Path;

use boa_engine::object::ObjectInitializer;
use boa_engine::{
    js_string, Context, JsNativeError, JsResult, JsString, JsValue, NativeFunction, Script, Source,
};

use super::api_support::{host, plain_error, store_error, str_arg};
use super::interrupt::Interrupt;
use super::runtime::{call, run_script, RunError};

/// What a file is run as: it decides the name of the per-run argument and which
/// helpers the context gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `api/*.js`: `request` in scope, a global `respond`.
    Handler,
    /// `workers/*.js`: `job` in scope, a global `sleep`.
    Worker,
}

impl Kind {
    fn arg_name(self) -> &'static str {
        match self {
            Kind::Handler => "request",
            Kind::Worker => "job",
        }
    }
}

const COMPAT: &str = include_str!("compat.js");
const REQUIRE: &str = include_str!("require.js");

/// The object `compat.js` returned, kept in the context's host data (which roots it).
struct Compat {
    entry: JsValue,
}

/// Loads entry file `path` (its `source`) into `ctx` and returns a function to call
/// once per run with the request or the job object; it returns the run's result.
/// Call it through [`call`](super::call), like any JS function.
pub fn load_entry(
    ctx: &mut Context,
    path: &str,
    source: &str,
    kind: Kind,
    interrupt: &Interrupt,
) -> Result<JsValue, RunError> {
    let entry = match ctx.get_data::<Compat>() {
        Some(c) => c.entry.clone(),
        None => install(ctx, interrupt)?,
    };
    let factory = compile(ctx, path, source, Some(kind), interrupt).map_err(RunError::from)?;
    call(
        ctx,
        &entry,
        &[factory, JsString::from(path).into()],
        interrupt,
    )
}

/// Evaluates one of the loader's JS files: each is a function expression.
fn evaluate(
    ctx: &mut Context,
    name: &str,
    source: &str,
    interrupt: &Interrupt,
) -> Result<JsValue, RunError> {
    // Parsing is most of what a fresh context pays for these files.
    let script = Script::parse(Source::from_bytes(source), None, ctx)
        .map_err(|e| RunError::Thrown(format!("{name}: {e}")))?;
    run_script(ctx, &script, interrupt)
}

/// Evaluates `compat.js` in `ctx`, with the loader's natives. (The helpers of each
/// kind, `respond` and `sleep`, are natives every context gets: see prelude.rs.)
fn install(ctx: &mut Context, interrupt: &Interrupt) -> Result<JsValue, RunError> {
    let setup = evaluate(ctx, "compat.js", COMPAT, interrupt)?;
    let fns: [(&str, Native, usize); 3] = [
        ("readModule", read_module, 1),
        ("compile", compile_native, 2),
        ("requireSupport", require_support, 0),
    ];
    let mut init = ObjectInitializer::new(ctx);
    for (name, f, len) in fns {
        init.function(NativeFunction::from_fn_ptr(f), JsString::from(name), len);
    }
    let natives: JsValue = init.build().into();
    let api = call(ctx, &setup, std::slice::from_ref(&natives), interrupt)?;
    let entry = api
        .as_object()
        .map(|o| o.get(js_string!("entry"), ctx))
        .transpose()
        .map_err(|e| RunError::Thrown(format!("compat.js: {e}")))?
        .filter(JsValue::is_callable)
        .ok_or_else(|| RunError::Thrown("compat.js did not return its entry function".into()))?;
    ctx.insert_data(Compat {
        entry: entry.clone(),
    });
    Ok(entry)
}

/// The source text a file is compiled from: its body as a function body, with the
/// wrapper all on the first line so that error positions keep the file's own line
/// numbers. The names the wrapper provides are parameters of an outer function and the
/// body is an inner arrow function, so a file may redeclare any of them (`const job =
/// fazt.worker.spawn(...)`, as upstream's globals allowed). Entry files get the run's
/// argument and a tail that reports a body that ran to its end.
fn wrap(source: &str, kind: Option<Kind>) -> String {
    match kind {
        Some(k) => format!(
            "(function (exports, require, module, __filename, __dirname, {}, __faztEnd) {{ return (() => {{{source}\n;return __faztEnd(typeof handler === \"function\" ? handler : undefined);\n}})(); }})",
            k.arg_name()
        ),
        None => format!(
            "(function (exports, require, module, __filename, __dirname) {{ return (() => {{{source}\n}})(); }})"
        ),
    }
}

/// Compiles file `path` into its module function. Evaluating the wrapper only creates
/// a function, unless the file closes the wrapper early: that code runs under the
/// interrupt like any other.
fn compile(
    ctx: &mut Context,
    path: &str,
    source: &str,
    kind: Option<Kind>,
    interrupt: &Interrupt,
) -> Result<JsValue, CompileError> {
    let wrapped = wrap(source, kind);
    // The path names the file in error stacks (`at f (lib/x.js:3:9)`).
    let src = Source::from_bytes(wrapped.as_bytes()).with_path(Path::new(path));
    let script = Script::parse(src, None, ctx).map_err(|e| {
        // boa's parse errors read "expected ... at line 2, col 7".
        let msg = match e.as_native() {
            Some(native) => native.message().to_string(),
            None => e.to_string(),
        };
        CompileError::Syntax(format!("{path}: {msg}"))
    })?;
    let f = run_script(ctx, &script, interrupt).map_err(CompileError::Run)?;
    if !f.is_callable() {
        return Err(CompileError::Syntax(format!(
            "{path}: the file closes its module wrapper early (unbalanced braces)"
        )));
    }
    Ok(f)
}

/// Why a file did not compile: a syntax error (a catchable SyntaxError for `require`)
/// or what running the wrapper did.
enum CompileError {
    /// "<file>: <what> at line L, col C".
    Syntax(String),
    Run(RunError),
}

impl From<CompileError> for RunError {
    fn from(e: CompileError) -> RunError {
        match e {
            CompileError::Syntax(m) => RunError::Thrown(format!("SyntaxError: {m}")),
            CompileError::Run(e) => e,
        }
    }
}

/// A `RunError` raised inside a native call: a stop stays uncatchable, a host failure
/// keeps its type.
fn rethrow(e: RunError) -> boa_engine::JsError {
    match e {
        RunError::Thrown(m) => plain_error(m),
        RunError::Failed(f, m) => super::api::failure_error(f, m),
        RunError::Interrupted(r) => super::api::stopped(r),
    }
}

type Native = fn(&JsValue, &[JsValue], &mut Context) -> JsResult<JsValue>;

/// `readModule(path)`: the text of one of the app's files, or null.
fn read_module(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let host = host(ctx)?;
    let path = str_arg(args, 0, "require: path")?;
    crate::apps::check_path(&path).map_err(|e| plain_error(format!("require: {e}")))?;
    match host
        .services
        .store()
        .app_file(&host.app, &path)
        .map_err(store_error)?
    {
        Some(bytes) => match String::from_utf8(bytes) {
            Ok(text) => Ok(JsString::from(text.as_str()).into()),
            Err(_) => Err(plain_error(format!(
                "require: {path} is not valid UTF-8 text"
            ))),
        },
        None => Ok(JsValue::null()),
    }
}

/// `compile(path, source)`: a required file's module function. A syntax error is a
/// catchable SyntaxError naming the file and position.
fn compile_native(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let host = host(ctx)?;
    let path = str_arg(args, 0, "compile: path")?;
    let source = str_arg(args, 1, "compile: source")?;
    compile(ctx, &path, &source, None, &host.interrupt).map_err(|e| match e {
        CompileError::Syntax(m) => JsNativeError::syntax().with_message(m).into(),
        CompileError::Run(e) => rethrow(e),
    })
}

/// `requireSupport()`: the function in `require.js`, compiled on the first `require`.
fn require_support(_: &JsValue, _: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let host = host(ctx)?;
    evaluate(ctx, "require.js", REQUIRE, &host.interrupt).map_err(rethrow)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapper_keeps_line_numbers() {
        for kind in [None, Some(Kind::Handler), Some(Kind::Worker)] {
            let w = wrap("a\nb", kind);
            assert_eq!(w.lines().nth(1), Some("b"), "{w}");
            assert!(!w.lines().next().unwrap_or_default().contains('\n'));
        }
        assert!(wrap("x", Some(Kind::Handler)).contains(", request, __faztEnd)"));
        // The body is its own scope inside the one that holds the provided names.
        assert!(wrap("x", None).contains("{ return (() => {x\n}"));
        assert!(wrap("x", Some(Kind::Worker)).contains(", job, __faztEnd)"));
    }
}
