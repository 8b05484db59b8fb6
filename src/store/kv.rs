//! Per-app key/value storage behind `fazt.storage.kv`. Values are JSON text; expired
//! keys read as absent and are deleted lazily.

use rusqlite::{params, OptionalExtension};

use super::{now_ms, query_all, Error, Result, SqlContext, Store};

/// Largest value one key may hold (JSON text), so one app cannot fill the disk in one call.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// Longest key.
pub const MAX_KEY_BYTES: usize = 512;

impl Store {
    pub fn kv_get(&self, app: &str, key: &str) -> Result<Option<String>> {
        self.read(|c| {
            c.prepare_cached(
                "SELECT value FROM kv WHERE app = ?1 AND key = ?2
                 AND (expires_at IS NULL OR expires_at > ?3)",
            )
            .ctx("reading a key")?
            .query_row(params![app, key, now_ms()], |r| r.get(0))
            .optional()
            .ctx("reading a key")
        })
    }

    /// Stores `value` (JSON text); `ttl_ms` makes it expire.
    pub fn kv_set(&self, app: &str, key: &str, value: String, ttl_ms: Option<i64>) -> Result<()> {
        check_key(key)?;
        if value.len() > MAX_VALUE_BYTES {
            return Err(Error::Invalid(format!(
                "kv value for '{key}' is {} bytes; the limit is {MAX_VALUE_BYTES}",
                value.len()
            )));
        }
        let (app, key) = (app.to_string(), key.to_string());
        let now = now_ms();
        let expires = ttl_ms.map(|t| now + t);
        let quota = self.limits().kv_bytes_per_app;
        self.write(false, move |c| {
            let need = (key.len() + value.len()) as u64;
            if usage_after(c, &app, &key, need)? > quota {
                // Expired keys still count until deleted: drop them before refusing.
                c.prepare_cached(
                    "DELETE FROM kv WHERE app = ?1 AND expires_at IS NOT NULL AND expires_at <= ?2",
                )
                .ctx("deleting expired keys")?
                .execute(params![app, now])
                .ctx("deleting expired keys")?;
                let after = usage_after(c, &app, &key, need)?;
                if after > quota {
                    return Err(Error::Invalid(format!(
                        "fazt.storage.kv.set: the kv storage of app '{app}' is full: writing '{key}' \
                         would use {after} bytes of its {quota}-byte quota; delete keys first"
                    )));
                }
            }
            c.prepare_cached(
                "INSERT INTO kv(app, key, value, expires_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(app, key) DO UPDATE SET value = ?3, expires_at = ?4",
            )
            .ctx("writing a key")?
            .execute(params![app, key, value, expires])
            .ctx("writing a key")?;
            Ok(())
        })
    }

    pub fn kv_delete(&self, app: &str, key: &str) -> Result<bool> {
        let (app, key) = (app.to_string(), key.to_string());
        self.write(false, move |c| {
            let n = c
                .execute(
                    "DELETE FROM kv WHERE app = ?1 AND key = ?2",
                    params![app, key],
                )
                .ctx("deleting a key")?;
            Ok(n > 0)
        })
    }

    /// Live keys starting with `prefix` (case-sensitive, unlike LIKE), in order, at most
    /// 1,000.
    pub fn kv_list(&self, app: &str, prefix: &str) -> Result<Vec<String>> {
        self.read(|c| {
            query_all(
                c,
                "SELECT key FROM kv WHERE app = ?1 AND substr(key, 1, length(?2)) = ?2
                 AND (expires_at IS NULL OR expires_at > ?3) ORDER BY key LIMIT 1000",
                params![app, prefix, now_ms()],
                "listing keys",
                |r| r.get(0),
            )
        })
    }
}

/// Bytes app's kv would use once `key` holds `need` bytes (key + value), from the
/// trigger-kept `kv_usage` counter, so the check does not scan the app's keys.
fn usage_after(c: &rusqlite::Connection, app: &str, key: &str, need: u64) -> Result<u64> {
    let used: i64 = c
        .prepare_cached("SELECT bytes FROM kv_usage WHERE app = ?1")
        .ctx("reading kv usage")?
        .query_row([app], |r| r.get(0))
        .optional()
        .ctx("reading kv usage")?
        .unwrap_or(0);
    let old: i64 = c
        .prepare_cached(
            "SELECT length(CAST(key AS BLOB)) + length(CAST(value AS BLOB)) FROM kv
             WHERE app = ?1 AND key = ?2",
        )
        .ctx("reading kv usage")?
        .query_row(params![app, key], |r| r.get(0))
        .optional()
        .ctx("reading kv usage")?
        .unwrap_or(0);
    Ok((used - old).max(0) as u64 + need)
}

fn check_key(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(Error::Invalid(format!(
            "kv keys must be 1 to {MAX_KEY_BYTES} bytes long"
        )));
    }
    Ok(())
}
