//! Shared by the benches: a whole server started in-process on a free port.

/// A running server and its temp data dir, kept as long as the server runs.
pub struct Running {
    pub handle: fazt::app::Handle,
    _tmp: tempfile::TempDir,
}

pub fn start_server(http_threads: usize) -> Running {
    let tmp = tempfile::tempdir().expect("temp dir");
    let config = fazt::config::Config {
        listen: "127.0.0.1:0".into(),
        data_dir: tmp.path().join("data"),
        http_threads,
        ..Default::default()
    };
    let handle = fazt::app::start(config).expect("start the server");
    Running { handle, _tmp: tmp }
}
