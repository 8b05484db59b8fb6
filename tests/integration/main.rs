//! Integration tests: each starts the real `fazt` binary on an ephemeral port with a
//! fresh data dir, deploys apps over HTTP and speaks HTTP and WebSocket to it.

mod util;

mod browser;
mod compat;
mod console;
mod disk;
mod errors;
mod hostile;
mod hostile_js;
mod isolation;
mod perf_http;
mod platform;
mod quotas;
mod realtime;
mod review;
mod tidy;
mod workers;
