//! The `fazt` binary: parse the command line, set up logging, and hand over to the
//! library (`app::start` for the server, `cli::run_client` for everything else).

use clap::Parser;

use fazt::cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let result = match &cli.command {
        Command::Server {
            listen,
            http_threads,
            ws_max_per_app,
            ws_max_per_ip,
            store,
        } => store.limits().and_then(|limits| {
            run_server(
                &cli,
                listen,
                *http_threads,
                *ws_max_per_app,
                *ws_max_per_ip,
                limits,
            )
        }),
        _ => fazt::cli::run_client(&cli),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run_server(
    cli: &Cli,
    listen: &str,
    http_threads: usize,
    ws_max_per_app: usize,
    ws_max_per_ip: usize,
    store: fazt::store::Limits,
) -> anyhow::Result<()> {
    if http_threads == 0 || ws_max_per_app == 0 || ws_max_per_ip == 0 {
        anyhow::bail!("--http-threads, --ws-max-per-app and --ws-max-per-ip must be at least 1");
    }
    let mut config = fazt::config::Config {
        listen: listen.to_string(),
        data_dir: cli.data_dir.clone(),
        http_threads,
        store,
        ..Default::default()
    };
    config.realtime.per_app = ws_max_per_app;
    config.realtime.per_ip = ws_max_per_ip;
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
    let signals = std::sync::atomic::AtomicUsize::new(0);
    ctrlc::set_handler(move || {
        // The first Ctrl-C shuts down gracefully; a second one means "now".
        if signals.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0 {
            eprintln!("second interrupt: exiting without waiting");
            std::process::exit(130);
        }
        let _ = stop_tx.try_send(());
    })
    .map_err(|e| anyhow::anyhow!("installing the Ctrl-C handler: {e}"))?;
    let handle = fazt::app::start(config)?;
    let _ = stop_rx.recv();
    handle.shutdown();
    Ok(())
}
