//! The `fazt` binary: parse the command line, set up logging, and hand over to the
//! library (`app::start` for the server, `cli::run_client` for everything else).

use clap::Parser;

use fazt::cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    fazt::store::configure_sqlite();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let result = match &cli.command {
        Command::Server(args) => args.to_config(&cli.data_dir).and_then(run_server),
        _ => fazt::cli::run_client(&cli),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run_server(config: fazt::config::Config) -> anyhow::Result<()> {
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
