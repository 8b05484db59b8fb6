-- Apps and their files. A redeploy replaces every row of an app in one transaction and
-- bumps `version`, which handler caches use to notice new code.
CREATE TABLE apps (
    name        TEXT PRIMARY KEY,
    version     INTEGER NOT NULL,
    file_count  INTEGER NOT NULL,
    total_bytes INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);

CREATE TABLE app_files (
    app     TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
    path    TEXT NOT NULL,
    content BLOB NOT NULL,
    PRIMARY KEY (app, path)
) WITHOUT ROWID;

-- Per-app key/value storage behind fazt.storage.kv. `expires_at` is epoch ms or NULL.
CREATE TABLE kv (
    app        TEXT NOT NULL,
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    expires_at INTEGER,
    PRIMARY KEY (app, key)
) WITHOUT ROWID;
