//! Start-up and shutdown: open the data dir and store, create the admin token, bind,
//! start the worker pool and the HTTP threads; `Handle::shutdown` undoes it in order.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context as _};

use crate::config::Config;
use crate::http::HttpServer;
use crate::realtime::{Hub, Listeners};
use crate::services::Services;
use crate::store::Store;
use crate::worker::Pool;

pub struct Handle {
    pub addr: SocketAddr,
    pub services: Arc<Services>,
    // Shut down in this order: stop HTTP (finish in-flight requests), close
    // WebSockets, stop the pool, then flush and close the store.
    http: Option<HttpServer>,
}

pub fn start(config: Config) -> anyhow::Result<Handle> {
    raise_fd_limit(config.http.max_connections);
    prepare_data_dir(&config.data_dir)?;
    check_database(&config.data_dir)
        .with_context(|| format!("opening the database in {}", config.data_dir.display()))?;
    create_private(&config.data_dir.join("fazt.db"))?;
    let store = Store::open_with(&config.data_dir, config.store.clone()).with_context(|| {
        format!(
            "opening the database in {} (is it a fazt data dir, and not corrupt?)",
            config.data_dir.display()
        )
    })?;
    make_private(&config.data_dir)?;
    // The token is made after the database exists, so a token never stands beside a
    // database that was not set up (see `check_database`).
    let (admin_token, created) = admin_token(&config.data_dir)?;
    let listener = TcpListener::bind(&config.listen)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener
        .local_addr()
        .context("reading the listen address")?;
    widen_backlog(&listener);
    let listeners = Arc::new(Listeners::default());
    let (pool, runner) = Pool::new(config.pool.clone(), store.clone());
    let services = Arc::new(Services {
        store,
        pool: Arc::new(pool),
        hub: Arc::new(Hub::new(listeners.clone(), config.realtime.clone())),
        listeners,
        admin_token: admin_token.clone(),
        metrics: Default::default(),
        started: Instant::now(),
        apps: Default::default(),
        // The composition root hands `js` the host functions other modules define.
        natives: crate::js::Natives {
            api: [crate::worker::js_natives(), crate::realtime::js_natives()].concat(),
            job: crate::worker::job_natives(),
        },
    });
    runner.start(services.clone())?;
    crate::http::start_overview(&services).context("starting the console thread")?;
    let http = HttpServer::start(
        listener,
        config.http_threads,
        config.http.clone(),
        services.clone(),
    )?;
    if created {
        println!(
            "created admin token (stored in {}): {admin_token}",
            config.data_dir.join("admin.token").display()
        );
    }
    println!("fazt listening on http://{addr}");
    let _ = std::io::stdout().flush();
    Ok(Handle {
        addr,
        services,
        http: Some(http),
    })
}

impl Handle {
    pub fn shutdown(mut self) {
        log::info!("shutting down: finishing in-flight requests");
        if let Some(http) = self.http.take() {
            http.shutdown();
        }
        self.services.hub.close_all();
        self.services.pool.shutdown();
        if let Err(e) = self.services.store.flush() {
            log::error!("final store flush failed: {e}");
        }
        self.services.store.close();
        log::info!("shutdown complete");
    }
}

/// Each connection holds a descriptor (a WebSocket two); the common soft limit of 1,024
/// would cap a server at a few hundred clients. Raise the soft limit to the hard one,
/// and say so when the connection cap cannot be reached within it (past the limit the
/// accept loop backs off and retries instead of failing).
fn raise_fd_limit(max_connections: usize) {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    let soft = unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            } else {
                log::warn!("could not raise the open-file limit");
            }
        }
        lim.rlim_cur
    };
    // Room for the database, the worker pool and WebSockets beside the connections.
    let needed = max_connections as u64 + 256;
    if (soft as u64) < needed {
        log::warn!(
            "the open-file limit ({soft}) is below --max-connections + 256 ({needed}): \
             raise it (ulimit -n) or lower --max-connections"
        );
    }
}

/// std listens with a backlog of 128: a burst of more simultaneous connections overflows
/// it, and each dropped SYN costs its client a one-second retransmit. Listening again on
/// a listening socket only changes the backlog (the kernel caps it at somaxconn).
fn widen_backlog(listener: &TcpListener) {
    use std::os::fd::AsRawFd;
    // SAFETY: listen() on a socket we own; on failure the old backlog stays.
    if unsafe { libc::listen(listener.as_raw_fd(), 4096) } != 0 {
        log::warn!(
            "could not widen the listen backlog: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// How long the start-up `quick_check` may take; a larger database is checked in full
/// with `fazt check`.
const QUICK_CHECK_BUDGET: std::time::Duration = std::time::Duration::from_secs(2);

/// Refuses to start on a database that is damaged, or that is empty (or gone) beside
/// an `admin.token`: that data dir held a server's data, and starting would silently
/// replace every app with an empty server.
fn check_database(dir: &Path) -> anyhow::Result<()> {
    use crate::store::check::{self, Verdict};
    let db = dir.join("fazt.db");
    let token = dir.join("admin.token");
    let initialised = check::is_initialised(&db).unwrap_or(true);
    if token.exists() && !initialised {
        bail!(
            "{} is empty or missing, but {} exists: this data dir held a fazt server's data, \
             which is gone. Restore fazt.db from a backup (`fazt backup FILE` makes one), \
             or, to start over with no apps, delete {} as well",
            db.display(),
            token.display(),
            token.display()
        );
    }
    if !db.exists() {
        return Ok(());
    }
    let started = Instant::now();
    match check::quick_check(&db, QUICK_CHECK_BUDGET) {
        Ok(Verdict::Ok) => {
            log::debug!(
                "quick_check of {} ok in {:?}",
                db.display(),
                started.elapsed()
            );
            Ok(())
        }
        Ok(Verdict::Unfinished) => {
            log::warn!(
                "the start-up quick_check of {} did not finish within {:?}; run `fazt check` \
                 for a full integrity check",
                db.display(),
                QUICK_CHECK_BUDGET
            );
            Ok(())
        }
        Ok(Verdict::Damaged(found)) => bail!(
            "{} is damaged (SQLite's quick_check: {}). Refusing to start: restore it from a \
             backup, or run `fazt check` for the full report",
            db.display(),
            found.join("; ")
        ),
        Err(e) => Err(e).with_context(|| format!("checking {}", db.display())),
    }
}

/// Makes the data dir 0700 and the database files 0600, whatever the umask was when
/// they were created: they hold every app's files, data and logs.
fn make_private(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let set = |path: &Path, mode: u32| -> anyhow::Result<()> {
        match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("making {} private", path.display())),
        }
    };
    set(dir, 0o700)?;
    // SQLite gives the -wal and -shm files it creates later the database file's mode.
    for name in ["fazt.db", "fazt.db-wal", "fazt.db-shm", "admin.token"] {
        set(&dir.join(name), 0o600)?;
    }
    Ok(())
}

/// Creates `path` empty with mode 0600 unless it exists, so SQLite never makes it (or
/// the -wal and -shm files, which take its mode) readable by others, not even briefly.
fn create_private(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map(drop)
        .with_context(|| format!("creating {}", path.display()))
}

fn prepare_data_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!("data dir {} exists but is not a directory", dir.display());
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create the data dir {}", dir.display()))?;
    }
    make_private(dir)?;
    let probe = dir.join(".fazt-write-test");
    std::fs::write(&probe, b"ok")
        .with_context(|| format!("the data dir {} is not writable", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Reads `admin.token`, creating it (mode 0600) on first start. Returns it and whether
/// it was created now.
fn admin_token(dir: &Path) -> anyhow::Result<(String, bool)> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("admin.token");
    if path.exists() {
        let t = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let t = t.trim().to_string();
        if t.len() < 16 {
            bail!(
                "{} is too short to be a token; delete it to make a new one",
                path.display()
            );
        }
        return Ok((t, false));
    }
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes)
        .map_err(|e| anyhow::anyhow!("no randomness for the admin token: {e}"))?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(token.as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok((token, true))
}
