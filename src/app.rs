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
    raise_fd_limit();
    prepare_data_dir(&config.data_dir)?;
    let (admin_token, created) = admin_token(&config.data_dir)?;
    let store = Store::open(&config.data_dir).with_context(|| {
        format!(
            "opening the database in {} (is it a fazt data dir, and not corrupt?)",
            config.data_dir.display()
        )
    })?;
    let listener = TcpListener::bind(&config.listen)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener
        .local_addr()
        .context("reading the listen address")?;
    let listeners = Arc::new(Listeners::default());
    let (pool, runner) = Pool::new(config.pool.clone(), store.clone());
    let services = Arc::new(Services {
        store,
        pool,
        hub: Hub::new(listeners.clone(), config.realtime.clone()),
        listeners,
        admin_token: admin_token.clone(),
        metrics: Default::default(),
        started: Instant::now(),
        listen_port: addr.port(),
        apps: Default::default(),
    });
    runner.start(services.clone())?;
    let http = HttpServer::start(listener, config.http_threads, services.clone())?;
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

/// Each WebSocket holds a few descriptors; the common soft limit of 1,024 would cap a
/// server at a couple of hundred clients. Raise the soft limit to the hard one.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                log::warn!("could not raise the open-file limit");
            }
        }
    }
}

fn prepare_data_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!("data dir {} exists but is not a directory", dir.display());
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the data dir {}", dir.display()))?;
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
