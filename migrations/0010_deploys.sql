-- One identity per deployment. Every deploy takes the next id of `deploys`, which
-- AUTOINCREMENT never hands out twice (not even after rows are deleted), so an id names
-- one set of files forever: caches of code are keyed by it. `app_id` is the deploy id
-- that created the app; it stays across redeploys and changes when an app is removed
-- and a new one takes its name, so nothing of the old app is mistaken for the new one.
CREATE TABLE deploys (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    app        TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

ALTER TABLE apps ADD COLUMN app_id INTEGER NOT NULL DEFAULT 0;
ALTER TABLE apps ADD COLUMN deploy_id INTEGER NOT NULL DEFAULT 0;

INSERT INTO deploys(app, created_at) SELECT name, updated_at FROM apps ORDER BY name;
UPDATE apps SET
    deploy_id = (SELECT MAX(id) FROM deploys WHERE deploys.app = apps.name),
    app_id = (SELECT MAX(id) FROM deploys WHERE deploys.app = apps.name);
