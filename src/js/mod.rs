//! Running user JavaScript with boa: context set-up, the `fazt.*` host API, module
//! loading (every script form, `require`: see `loader.rs`), interruptible calls, and value conversion.
//! Nothing here touches sockets or files; host functions reach the rest of the
//! server only through the [`Env`] the composition root implements.

mod api;
/// Helpers for host functions defined outside `js/` (worker, realtime).
pub(crate) mod api_support {
    pub(crate) use super::api::{
        failure_error, host, opt_str_arg, plain_error, sleep_for, store_error, str_arg, type_error,
    };
}
pub mod interrupt;
mod jobs;
mod loader;
mod prelude;
mod runtime;

pub use api::{Failure, Native, Natives};

/// Stack for threads that run user JS (HTTP handler threads, worker slots): boa
/// recurses on the native stack for calls made from native code, so the 2 MB default
/// is too tight for deep but legal programs.
pub const JS_STACK_BYTES: usize = 16 << 20;
pub use interrupt::{Interrupt, Reason};
pub use loader::{load_entry, Kind};
pub use runtime::{
    call, from_json, new_context, plain_object, to_json, Env, Host, JobHost, LogSink, RunError,
};
