//! fazt: a single-binary, self-hosted app server with a background worker system for
//! user JavaScript. Modules in reading order:
//!
//! - [`config`], [`cli`]: what the user asks for.
//! - [`app`]: start-up and shutdown, wiring the pieces below together.
//! - [`services`]: the shared handles every request and job uses.
//! - [`http`]: routing, the system API, app traffic (static files, handlers).
//! - [`js`]: boa contexts, the `fazt.*` host API, interruptible execution.
//! - [`worker`]: jobs, the pool (scheduler, slots, memory budget), daemons.
//! - [`realtime`]: WebSocket hubs, channels, listener counts.
//! - [`job`]: the job model (status, options, filters), a leaf every layer shares.
//! - [`store`]: the only module that touches SQLite.
//! - [`apps`]: app name, path and upload rules shared by server and CLI.
//! - [`metrics`]: latency histograms and per-app counters (bounded label sets).

pub mod app;
pub mod apps;
pub mod cli;
pub mod config;
pub mod http;
pub mod job;
pub mod js;
pub mod metrics;
pub mod realtime;
pub mod services;
pub mod store;
pub mod worker;

/// Counts heap bytes per thread so the pool knows what each job holds.
#[global_allocator]
static GLOBAL: worker::CountingAlloc = worker::CountingAlloc;
