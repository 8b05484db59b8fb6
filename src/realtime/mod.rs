//! Realtime: per-app WebSocket hubs with channels, listener counts shared with the
//! worker pool (idle timeouts), and the `fazt.realtime.*` host functions.

mod conn;
mod event_loop;
mod hub;
mod session;
mod socket;

pub use hub::{Hub, HubLimits, Listeners};
pub use session::{accept, attach_raw, SYSTEM_HUB};

use boa_engine::object::builtins::JsArray;
use boa_engine::{Context, JsResult, JsString, JsValue};

use std::sync::Arc;

use crate::js::api_support::{host, opt_str_arg, plain_error, str_arg};

/// What a WebSocket session needs from the rest of the server; the composition
/// (`services::Services`) implements it, so `realtime` names nothing above it.
pub trait Env: Send + Sync {
    fn hub(&self) -> &Hub;
    /// Whether `app` has a live deployment a session may join (false once its removal
    /// began: a run of it can no longer start).
    fn app_live(&self, app: &str) -> bool;
    /// Counts an accepted WebSocket connection for /metrics.
    fn ws_connected(&self);
}

/// The handles the `fazt.realtime.*` host functions use, put into every JS context by
/// the host's `js::Env::install`.
#[derive(Clone)]
pub struct JsEnv {
    pub hub: Arc<Hub>,
    /// Shared with the hub (writes) and the scheduler (idle checks).
    pub listeners: Arc<Listeners>,
}

fn js_env(ctx: &Context) -> JsResult<JsEnv> {
    ctx.get_data::<JsEnv>()
        .cloned()
        .ok_or_else(|| plain_error("no realtime handles in this context"))
}

/// Longest channel name.
pub const MAX_CHANNEL_BYTES: usize = 128;

/// Channel names: 1–128 characters of `A-Z a-z 0-9 _ - . :`.
pub fn check_channel(ch: &str) -> Result<(), String> {
    let ok = !ch.is_empty()
        && ch.len() <= MAX_CHANNEL_BYTES
        && ch
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid channel name '{ch}': use 1-{MAX_CHANNEL_BYTES} letters, digits, '_', '-', '.' or ':'"
        ))
    }
}

type Native = fn(&JsValue, &[JsValue], &mut Context) -> JsResult<JsValue>;

pub(crate) fn js_natives() -> Vec<(&'static str, Native, usize)> {
    vec![
        ("rtBroadcast", rt_broadcast, 2),
        ("rtBroadcastAll", rt_broadcast_all, 1),
        ("rtCount", rt_count, 1),
        ("rtSubscribers", rt_subscribers, 1),
    ]
}

fn channel_arg(args: &[JsValue], i: usize, what: &str) -> JsResult<String> {
    let ch = str_arg(args, i, what)?;
    check_channel(&ch).map_err(|e| plain_error(format!("{what}: {e}")))?;
    Ok(ch)
}

fn rt_broadcast(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let h = host(ctx)?;
    let rt = js_env(ctx)?;
    let ch = channel_arg(args, 0, "fazt.realtime.broadcast: channel")?;
    let data = str_arg(args, 1, "fazt.realtime.broadcast: data")?;
    let n = rt
        .hub
        .broadcast(&h.app, Some(&ch), &data)
        .map_err(plain_error)?;
    Ok((n as f64).into())
}

fn rt_broadcast_all(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let h = host(ctx)?;
    let rt = js_env(ctx)?;
    let data = str_arg(args, 0, "fazt.realtime.broadcastAll: data")?;
    let n = rt.hub.broadcast(&h.app, None, &data).map_err(plain_error)?;
    Ok((n as f64).into())
}

fn rt_count(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let h = host(ctx)?;
    let rt = js_env(ctx)?;
    let n = match opt_str_arg(args, 0, "fazt.realtime.count: channel")? {
        Some(ch) => rt.listeners.count(&h.app, &ch),
        None => rt.hub.connections(&h.app),
    };
    Ok((n as f64).into())
}

fn rt_subscribers(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let h = host(ctx)?;
    let rt = js_env(ctx)?;
    let ch = channel_arg(args, 0, "fazt.realtime.subscribers: channel")?;
    let ids = rt.hub.subscribers(&h.app, &ch);
    let values = ids
        .into_iter()
        .map(|id| JsValue::from(JsString::from(id.as_str())));
    Ok(JsArray::from_iter(values, ctx).into())
}

#[cfg(test)]
mod tests {
    use super::check_channel;

    #[test]
    fn channel_names() {
        assert!(check_channel("mall").is_ok());
        assert!(check_channel("room:1.a_b-c").is_ok());
        for bad in ["", "a b", "a/b", "é", &"x".repeat(129)] {
            assert!(check_channel(bad).is_err(), "{bad}");
        }
    }
}
