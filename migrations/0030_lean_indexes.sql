-- Every index is written on each insert and each status change of a job. These two are
-- prefixes of the console's indexes (status, created_at, id) and (created_at, id), which
-- serve every query they served: dropping them saves two b-tree writes per insert and
-- per status change.
DROP INDEX IF EXISTS worker_jobs_status;
DROP INDEX IF EXISTS worker_jobs_created;
