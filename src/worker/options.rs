//! Parsing and validating `fazt.worker.spawn` options: durations ('100ms', '30s', '5m',
//! '2h', '1d'), memory sizes ('512KB', '64MB', '1GB') and the options object itself.
//! Anything unknown or malformed is an error with a clear message, never ignored.

use crate::job::{JobConfig, Priority};

pub const MAX_RETRY: u32 = 100;
/// Longest duration accepted (1000 days); beyond it a typo is more likely than intent.
pub const MAX_DURATION_MS: u64 = 1000 * 86_400_000;

/// `'100ms' | '30s' | '5m' | '2h' | '1d'` → milliseconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || {
        format!("invalid duration '{s}': use a whole number and a unit, e.g. '100ms', '30s', '5m', '2h' or '1d'")
    };
    if num.is_empty() || num.len() > 12 {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    if n == 0 {
        return Err(format!("invalid duration '{s}': must be greater than zero"));
    }
    n.checked_mul(mult)
        .filter(|ms| *ms <= MAX_DURATION_MS)
        .ok_or_else(|| format!("invalid duration '{s}': longer than 1000 days"))
}

/// `'512KB' | '64MB' | '1GB'` → bytes (binary units; case-insensitive unit).
pub fn parse_memory(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad =
        || format!("invalid memory size '{s}': use a whole number and KB, MB or GB, e.g. '64MB'");
    if num.is_empty() || num.len() > 9 {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult = match unit.to_ascii_uppercase().as_str() {
        "KB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        _ => return Err(bad()),
    };
    if n == 0 {
        return Err(format!(
            "invalid memory size '{s}': must be greater than zero"
        ));
    }
    Ok(n * mult)
}

pub fn format_bytes(b: u64) -> String {
    if b >= 1 << 30 && b.is_multiple_of(1 << 30) {
        format!("{}GB", b >> 30)
    } else if b >= 1 << 20 {
        format!("{}MB", (b + (1 << 19)) >> 20)
    } else {
        format!("{}KB", (b + 512) >> 10)
    }
}

pub fn format_ms(ms: u64) -> String {
    if ms.is_multiple_of(86_400_000) {
        format!("{}d", ms / 86_400_000)
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// The spawn options object (already JSON) → a config plus the job's `data` as JSON text.
pub fn parse_options(
    opts: &serde_json::Value,
    budget: u64,
) -> Result<(JobConfig, Option<String>), String> {
    let obj = match opts {
        serde_json::Value::Null => return Ok((JobConfig::default(), None)),
        serde_json::Value::Object(o) => o,
        _ => return Err("spawn options must be an object".into()),
    };
    let mut cfg = JobConfig::default();
    let mut data = None;
    let mut timeout_given = false;
    for (key, v) in obj {
        let null = v.is_null();
        match key.as_str() {
            "data" => {
                data = if null { None } else { Some(v.to_string()) };
            }
            "memory" => {
                let s = v.as_str().ok_or("memory must be a string such as '64MB'")?;
                cfg.memory_bytes = parse_memory(s)?;
                if cfg.memory_bytes > budget {
                    return Err(format!(
                        "memory '{s}' is more than the whole worker memory budget ({}): this job could never run",
                        format_bytes(budget)
                    ));
                }
            }
            "timeout" => {
                timeout_given = true;
                cfg.timeout_ms = if null {
                    None
                } else {
                    let s = v.as_str().ok_or(
                        "timeout must be a string such as '30s' or '5m', or null for none",
                    )?;
                    Some(parse_duration(s)?)
                };
            }
            "daemon" => {
                cfg.daemon = v.as_bool().ok_or("daemon must be true or false")?;
            }
            "retry" => {
                let n = v
                    .as_u64()
                    .filter(|n| *n <= MAX_RETRY as u64)
                    .ok_or(format!(
                        "retry must be a whole number from 0 to {MAX_RETRY}"
                    ))?;
                cfg.retry = n as u32;
            }
            "retryDelay" => {
                let s = v
                    .as_str()
                    .ok_or("retryDelay must be a string such as '5s'")?;
                cfg.retry_delay_ms = parse_duration(s)?;
            }
            "uniqueKey" => {
                if !null {
                    let s = v.as_str().ok_or("uniqueKey must be a string")?;
                    if s.is_empty() || s.len() > 256 {
                        return Err("uniqueKey must be 1 to 256 characters".into());
                    }
                    cfg.unique_key = Some(s.to_string());
                }
            }
            "idleTimeout" => {
                if !null {
                    let s = v
                        .as_str()
                        .ok_or("idleTimeout must be a string such as '1m'")?;
                    cfg.idle_timeout_ms = Some(parse_duration(s)?);
                }
            }
            "idleChannel" => {
                if !null {
                    let s = v.as_str().ok_or("idleChannel must be a string")?;
                    crate::realtime::check_channel(s)?;
                    cfg.idle_channel = Some(s.to_string());
                }
            }
            "priority" => {
                if !null {
                    cfg.priority = v
                        .as_str()
                        .and_then(Priority::parse)
                        .ok_or("priority must be 'low', 'normal' or 'high'")?;
                }
            }
            other => {
                return Err(format!(
                    "unknown spawn option '{other}' (known: data, memory, timeout, daemon, retry, \
                     retryDelay, uniqueKey, idleTimeout, idleChannel, priority)"
                ))
            }
        }
    }
    if cfg.idle_timeout_ms.is_some() != cfg.idle_channel.is_some() {
        return Err("idleTimeout and idleChannel go together: give both or neither".into());
    }
    if cfg.daemon && !timeout_given {
        // A daemon is meant to run until stopped; the 30m default would kill it.
        cfg.timeout_ms = None;
    }
    if let Some(d) = &data {
        if d.len() > super::MAX_JSON_BYTES {
            return Err(format!(
                "data is {} bytes of JSON; the limit is {}",
                d.len(),
                super::MAX_JSON_BYTES
            ));
        }
    }
    Ok((cfg, data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::MEMORY_BUDGET;
    use serde_json::json;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("100ms"), Ok(100));
        assert_eq!(parse_duration("30s"), Ok(30_000));
        assert_eq!(parse_duration("5m"), Ok(300_000));
        assert_eq!(parse_duration("2h"), Ok(7_200_000));
        assert_eq!(parse_duration("1d"), Ok(86_400_000));
        for bad in [
            "",
            "5",
            "s",
            "1.5s",
            "-1s",
            "5 min",
            "5M",
            "0s",
            "10w",
            "99999999999999s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("512KB"), Ok(512 << 10));
        assert_eq!(parse_memory("64MB"), Ok(64 << 20));
        assert_eq!(parse_memory("1GB"), Ok(1 << 30));
        assert_eq!(parse_memory("64mb"), Ok(64 << 20));
        for bad in ["", "64", "MB", "1.5GB", "64 MB", "0MB", "64TB", "-1MB"] {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
        assert_eq!(format_bytes(64 << 20), "64MB");
    }

    #[test]
    fn options_defaults_and_validation() {
        let (cfg, data) = parse_options(&json!({}), MEMORY_BUDGET).expect("empty options");
        assert_eq!(cfg, JobConfig::default());
        assert_eq!(data, None);
        let (cfg, data) = parse_options(
            &json!({
                "data": {"n": 1}, "memory": "64MB", "timeout": "5s", "retry": 2,
                "retryDelay": "100ms", "uniqueKey": "k"
            }),
            MEMORY_BUDGET,
        )
        .expect("full options");
        assert_eq!(cfg.memory_bytes, 64 << 20);
        assert_eq!(cfg.timeout_ms, Some(5000));
        assert_eq!(cfg.retry, 2);
        assert_eq!(data.as_deref(), Some(r#"{"n":1}"#));
        let (cfg, _) = parse_options(&json!({"daemon": true}), MEMORY_BUDGET).expect("daemon");
        assert_eq!(cfg.timeout_ms, None, "daemons default to no timeout");
        let (cfg, _) = parse_options(&json!({"timeout": null}), MEMORY_BUDGET).expect("no timeout");
        assert_eq!(cfg.timeout_ms, None);
        let (cfg, _) =
            parse_options(&json!({"priority": "high"}), MEMORY_BUDGET).expect("priority");
        assert_eq!(cfg.priority, Priority::High);
        // Configs stored before `priority` existed still load.
        let old: JobConfig = serde_json::from_value(json!({
            "memory_bytes": 1, "timeout_ms": null, "daemon": false, "retry": 0,
            "retry_delay_ms": 1, "unique_key": null, "idle_timeout_ms": null, "idle_channel": null
        }))
        .expect("old config");
        assert_eq!(old.priority, Priority::Normal);

        for (bad, needle) in [
            (json!({"memroy": "1MB"}), "unknown spawn option 'memroy'"),
            (json!({"memory": "1GB"}), "budget"),
            (json!({"memory": 64}), "memory must be a string"),
            (json!({"timeout": "soon"}), "invalid duration"),
            (json!({"retry": -1}), "retry must be"),
            (json!({"retry": 1.5}), "retry must be"),
            (json!({"daemon": "yes"}), "daemon must be"),
            (json!({"idleTimeout": "1m"}), "go together"),
            (json!({"idleChannel": "c"}), "go together"),
            (json!({"priority": "urgent"}), "priority must be"),
            (json!({"priority": 2}), "priority must be"),
            (json!([1]), "must be an object"),
        ] {
            let err = parse_options(&bad, MEMORY_BUDGET).expect_err(&bad.to_string());
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }
}
