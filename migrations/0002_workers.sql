-- Background jobs. `config` holds the validated spawn options as JSON; `checkpoint` the
-- last value a worker saved with job.checkpoint (JSON text, at most 1 MB).
CREATE TABLE worker_jobs (
    id          TEXT PRIMARY KEY,
    app         TEXT NOT NULL,
    path        TEXT NOT NULL,
    status      TEXT NOT NULL,
    config      TEXT NOT NULL,
    data        TEXT,
    progress    INTEGER NOT NULL DEFAULT 0,
    result      TEXT,
    error       TEXT,
    checkpoint  TEXT,
    attempt     INTEGER NOT NULL DEFAULT 1,
    restarts    INTEGER NOT NULL DEFAULT 0,
    unique_key  TEXT,
    created_at  INTEGER NOT NULL,
    started_at  INTEGER,
    done_at     INTEGER
);
CREATE INDEX worker_jobs_app_status ON worker_jobs(app, status);
CREATE INDEX worker_jobs_status ON worker_jobs(status);
CREATE INDEX worker_jobs_created ON worker_jobs(created_at);

-- Job log lines; only the newest 1,000 per job are kept.
CREATE TABLE job_logs (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id  TEXT NOT NULL,
    ts      INTEGER NOT NULL,
    level   TEXT NOT NULL,
    msg     TEXT NOT NULL
);
CREATE INDEX job_logs_job ON job_logs(job_id, id);
