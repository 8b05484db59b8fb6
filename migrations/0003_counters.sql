-- Counters kept by triggers, so /metrics, the kv quota and job retention read a handful
-- of rows instead of scanning tables that grow with use.

-- Jobs per app and status.
CREATE TABLE job_counts (
    app    TEXT NOT NULL,
    status TEXT NOT NULL,
    n      INTEGER NOT NULL,
    PRIMARY KEY (app, status)
) WITHOUT ROWID;
INSERT INTO job_counts(app, status, n)
    SELECT app, status, COUNT(*) FROM worker_jobs GROUP BY app, status;

CREATE TRIGGER worker_jobs_count_insert AFTER INSERT ON worker_jobs BEGIN
    INSERT INTO job_counts(app, status, n) VALUES (NEW.app, NEW.status, 1)
        ON CONFLICT(app, status) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER worker_jobs_count_delete AFTER DELETE ON worker_jobs BEGIN
    UPDATE job_counts SET n = n - 1 WHERE app = OLD.app AND status = OLD.status;
END;
CREATE TRIGGER worker_jobs_count_update AFTER UPDATE OF app, status ON worker_jobs
    WHEN NEW.status IS NOT OLD.status OR NEW.app IS NOT OLD.app BEGIN
    UPDATE job_counts SET n = n - 1 WHERE app = OLD.app AND status = OLD.status;
    INSERT INTO job_counts(app, status, n) VALUES (NEW.app, NEW.status, 1)
        ON CONFLICT(app, status) DO UPDATE SET n = n + 1;
END;

-- Bytes of keys and values each app keeps in kv (the quota).
CREATE TABLE kv_usage (
    app   TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO kv_usage(app, bytes)
    SELECT app, SUM(length(CAST(key AS BLOB)) + length(CAST(value AS BLOB))) FROM kv GROUP BY app;

CREATE TRIGGER kv_usage_insert AFTER INSERT ON kv BEGIN
    INSERT INTO kv_usage(app, bytes)
        VALUES (NEW.app, length(CAST(NEW.key AS BLOB)) + length(CAST(NEW.value AS BLOB)))
        ON CONFLICT(app) DO UPDATE SET bytes = bytes + excluded.bytes;
END;
CREATE TRIGGER kv_usage_delete AFTER DELETE ON kv BEGIN
    UPDATE kv_usage
        SET bytes = bytes - length(CAST(OLD.key AS BLOB)) - length(CAST(OLD.value AS BLOB))
        WHERE app = OLD.app;
END;
CREATE TRIGGER kv_usage_update AFTER UPDATE OF key, value ON kv BEGIN
    UPDATE kv_usage
        SET bytes = bytes - length(CAST(OLD.key AS BLOB)) - length(CAST(OLD.value AS BLOB))
        WHERE app = OLD.app;
    INSERT INTO kv_usage(app, bytes)
        VALUES (NEW.app, length(CAST(NEW.key AS BLOB)) + length(CAST(NEW.value AS BLOB)))
        ON CONFLICT(app) DO UPDATE SET bytes = bytes + excluded.bytes;
END;

-- Retention: finished jobs by end time, overall and per app (unfinished rows have no
-- done_at and stay out of these indexes).
CREATE INDEX worker_jobs_done ON worker_jobs(done_at) WHERE done_at IS NOT NULL;
CREATE INDEX worker_jobs_app_done ON worker_jobs(app, done_at) WHERE done_at IS NOT NULL;
