-- The console's job list pages newest first by (created_at, id) with keyset cursors,
-- filtered by app or status: these indexes serve each page with a range scan, so page
-- 500 of 10,000+ jobs costs what page 1 costs.
CREATE INDEX worker_jobs_app_created ON worker_jobs(app, created_at, id);
CREATE INDEX worker_jobs_status_created ON worker_jobs(status, created_at, id);
CREATE INDEX worker_jobs_created_id ON worker_jobs(created_at, id);
