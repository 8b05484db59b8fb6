//! Shared plumbing: start/stop the server, raw HTTP with any Host header, deploys,
//! WebSocket clients, polling with a deadline.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Server {
    pub child: Option<Child>,
    pub addr: SocketAddr,
    pub token: String,
    pub dir: PathBuf,
    /// Bytes the server wrote to stderr (its log) so far.
    pub stderr_bytes: Arc<AtomicU64>,
    // Kept last so the temp dir outlives the process that uses it.
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// Starts a server with extra `fazt server` flags.
    pub fn start_with(flags: &[&str]) -> Server {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("data");
        let mut s = Server::start_in(&dir, flags);
        s._tmp = Some(tmp);
        s
    }

    /// Starts a server on `dir` (which may hold data from an earlier run).
    pub fn start_in(dir: &Path, flags: &[&str]) -> Server {
        Server::start_custom(dir, flags, &[], None, None)
    }

    /// Starts a server on `dir` with the given file-creation mask (None: inherit).
    pub fn start_in_umask(dir: &Path, flags: &[&str], umask: Option<u32>) -> Server {
        Server::start_custom(dir, flags, &[], None, umask)
    }

    /// Starts a server with the test-only fault hooks (`FAZT_TEST_HOOKS=1`) enabled.
    pub fn start_hooked(flags: &[&str]) -> Server {
        Server::start_with_env(flags, &[("FAZT_TEST_HOOKS", "1")], None)
    }

    /// Starts a server with extra flags and environment variables, and (if `nofile` is
    /// given) with both open-file limits of the child lowered to it.
    pub fn start_with_env(flags: &[&str], env: &[(&str, &str)], nofile: Option<u64>) -> Server {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("data");
        let mut s = Server::start_custom(&dir, flags, env, nofile, None);
        s._tmp = Some(tmp);
        s
    }

    /// Sets the store's test faults (`{"fail_writes": true}`, `{"max_page_count": 1}`).
    pub fn hooks(&self, v: Value) {
        let r = self.api("POST", "/api/_test/store", Some(v.to_string().as_bytes()));
        assert_eq!(r.status, 200, "test hooks: {}", r.text());
    }

    /// Starts a server on `dir` with extra environment variables.
    pub fn start_in_env(dir: &Path, flags: &[&str], env: &[(&str, &str)]) -> Server {
        Server::start_custom(dir, flags, env, None, None)
    }

    fn start_custom(
        dir: &Path,
        flags: &[&str],
        env: &[(&str, &str)],
        nofile: Option<u64>,
        umask: Option<u32>,
    ) -> Server {
        let mut cmd = server_command(dir, flags);
        cmd.envs(env.iter().copied());
        if let Some(mask) = umask {
            use std::os::unix::process::CommandExt;
            // SAFETY: umask is async-signal-safe and touches no memory.
            unsafe {
                cmd.pre_exec(move || {
                    libc::umask(mask as libc::mode_t);
                    Ok(())
                });
            }
        }
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe and only touches the child.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n as libc::rlim_t,
                        rlim_max: n as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start fazt");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        // Keep draining stderr so the server never blocks on a full pipe.
        let stderr_bytes = Arc::new(AtomicU64::new(0));
        let counted = stderr_bytes.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                counted.fetch_add(line.len() as u64 + 1, Ordering::Relaxed);
                if std::env::var("FAZT_TEST_LOG").is_ok() {
                    eprintln!("server: {line}");
                }
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("fazt listening on http://") {
                    if !sent {
                        let _ = tx.send(a.to_string());
                        sent = true;
                    }
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("server printed its address")
            .parse()
            .expect("address parses");
        let token = std::fs::read_to_string(dir.join("admin.token"))
            .expect("admin token")
            .trim()
            .to_string();
        Server {
            child: Some(child),
            addr,
            token,
            dir: dir.to_path_buf(),
            stderr_bytes,
            _tmp: None,
        }
    }

    /// Ctrl-C, and waits for a clean exit; returns the exit code.
    pub fn stop(&mut self) -> i32 {
        let Some(mut child) = self.child.take() else {
            return -1;
        };
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("server did not stop within 30 s of Ctrl-C");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9: no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a new process on the same data dir (after stop or kill9).
    pub fn restart(&mut self) {
        let tmp = self._tmp.take();
        let mut next = Server::start_in(&self.dir, &[]);
        next._tmp = tmp;
        std::mem::swap(self, &mut next);
        next._tmp = None;
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The server's process id (for /proc/<pid>/task and /proc/<pid>/fd).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    /// True while the server process has not exited.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Threads of the server process whose name starts with `prefix`.
    pub fn threads_named(&self, prefix: &str) -> usize {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return 0;
        };
        tasks
            .filter_map(Result::ok)
            .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
            .filter(|name| name.starts_with(prefix))
            .count()
    }

    /// All threads of the server process.
    pub fn thread_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Open file descriptors of the server process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// GET /health on a fresh connection with a short timeout: Some(status) if the
    /// server answered within `ms`.
    pub fn health_within(&self, ms: u64) -> Option<u16> {
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_millis(ms)).ok()?;
        s.set_read_timeout(Some(Duration::from_millis(ms))).ok()?;
        s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        let line = String::from_utf8_lossy(&raw).lines().next()?.to_string();
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// A request to the system host with the admin token.
    pub fn api(&self, method: &str, path: &str, body: Option<&[u8]>) -> Resp {
        let auth = format!("Bearer {}", self.token);
        request(
            self.addr,
            method,
            "127.0.0.1",
            path,
            &[("Authorization", &auth)],
            body,
        )
    }

    pub fn api_json(&self, method: &str, path: &str) -> Value {
        let r = self.api(method, path, None);
        assert!(r.status < 300, "{method} {path}: {} {}", r.status, r.text());
        r.json()
    }

    /// A request to an app's host.
    pub fn app(&self, app: &str, method: &str, path: &str, body: Option<&str>) -> Resp {
        let host = format!("{app}.localhost:{}", self.port());
        let headers: &[(&str, &str)] = if body.is_some() {
            &[("Content-Type", "application/json")]
        } else {
            &[]
        };
        request(
            self.addr,
            method,
            &host,
            path,
            headers,
            body.map(str::as_bytes),
        )
    }

    /// GET an app route and return its JSON, asserting success.
    pub fn call(&self, app: &str, path: &str) -> Value {
        let r = self.app(app, "GET", path, None);
        assert!(r.status < 300, "GET {app}{path}: {} {}", r.status, r.text());
        r.json()
    }

    pub fn deploy(&self, app: &str, files: &[(&str, &str)]) -> Resp {
        let files: Vec<(String, Vec<u8>)> = files
            .iter()
            .map(|(p, c)| (p.to_string(), c.as_bytes().to_vec()))
            .collect();
        let body = fazt::apps::encode_upload(&files);
        self.api("PUT", &format!("/api/apps/{app}"), Some(&body))
    }

    pub fn deploy_ok(&self, app: &str, files: &[(&str, &str)]) {
        let r = self.deploy(app, files);
        assert_eq!(r.status, 200, "deploy {app}: {}", r.text());
    }

    pub fn job(&self, id: &str) -> Value {
        self.api_json("GET", &format!("/api/jobs/{id}"))
    }

    /// Polls job `id` until `pred` holds, or panics after `secs`.
    pub fn wait_job(&self, id: &str, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        let ok = wait_until(secs, || {
            last = self.job(id);
            pred(&last)
        });
        assert!(
            ok,
            "job {id} did not reach the expected state in {secs}s: {last}"
        );
        last
    }

    pub fn wait_status(&self, id: &str, status: &str, secs: u64) -> Value {
        self.wait_job(id, secs, |j| j["status"] == status)
    }

    pub fn health(&self) -> Value {
        request(self.addr, "GET", "127.0.0.1", "/health", &[], None).json()
    }

    /// Runs the fazt CLI against this server.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_fazt"))
            .args([
                "--server",
                &format!("http://{}", self.addr),
                "--data-dir",
                self.dir.to_str().expect("utf-8"),
            ])
            .args(args)
            .env_remove("FAZT_TOKEN")
            .output()
            .expect("run fazt CLI")
    }

    pub fn ws(&self, app: &str) -> Ws {
        Ws::connect(self.addr, app)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `f` every 20 ms until it returns true or `secs` pass.
pub fn wait_until(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.text()))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// One HTTP/1.1 request with `Connection: close`, any Host header.
pub fn request(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Resp {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let body = body.unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).expect("write head");
    // A server may answer (e.g. 413) before reading a large body: ignore write errors.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_response(&raw)
}

pub fn parse_response(raw: &[u8]) -> Resp {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Resp {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(pos) = b.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&b[..pos]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = pos + 2;
        let Some(chunk) = b.get(start..start + size) else {
            break;
        };
        out.extend_from_slice(chunk);
        b = b.get(start + size + 2..).unwrap_or_default();
    }
    out
}

/// A WebSocket client speaking the fazt realtime protocol.
pub struct Ws {
    pub ws: tungstenite::WebSocket<TcpStream>,
}

impl Ws {
    pub fn connect(addr: SocketAddr, app: &str) -> Ws {
        Ws::try_connect(addr, app).expect("WebSocket connect")
    }

    pub fn try_connect(addr: SocketAddr, app: &str) -> Result<Ws, tungstenite::Error> {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let url = format!("ws://{app}.localhost:{}/_ws", addr.port());
        let (ws, _) = tungstenite::client::client(url.as_str(), stream).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(f) => f,
            tungstenite::HandshakeError::Interrupted(_) => tungstenite::Error::ConnectionClosed,
        })?;
        Ok(Ws { ws })
    }

    pub fn send(&mut self, v: Value) {
        self.ws
            .send(tungstenite::Message::text(v.to_string()))
            .expect("ws send");
    }

    /// The next JSON message (panics after the read timeout).
    pub fn recv(&mut self) -> Value {
        loop {
            match self.ws.read().expect("ws read") {
                tungstenite::Message::Text(t) => {
                    return serde_json::from_str(t.as_str()).expect("JSON message")
                }
                tungstenite::Message::Close(_) => panic!("server closed the WebSocket"),
                _ => continue,
            }
        }
    }

    /// Next message within `ms`, or None.
    pub fn recv_within(&mut self, ms: u64) -> Option<Value> {
        self.ws
            .get_mut()
            .set_read_timeout(Some(Duration::from_millis(ms)))
            .expect("timeout");
        let out = loop {
            match self.ws.read() {
                Ok(tungstenite::Message::Text(t)) => break serde_json::from_str(t.as_str()).ok(),
                Ok(_) => continue,
                Err(_) => break None,
            }
        };
        let _ = self
            .ws
            .get_mut()
            .set_read_timeout(Some(Duration::from_secs(10)));
        out
    }

    pub fn subscribe(&mut self, ch: &str) {
        self.send(serde_json::json!({"type": "subscribe", "channel": ch}));
        let m = self.recv();
        assert_eq!(m["type"], "subscribed", "{m}");
        assert_eq!(m["channel"], ch);
    }
}

/// `fazt server` on `dir` on a free port (not yet started).
fn server_command(dir: &Path, flags: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fazt"));
    cmd.args([
        "--data-dir",
        dir.to_str().expect("utf-8 path"),
        "server",
        "--listen",
        "127.0.0.1:0",
    ])
    .args(flags)
    .env("RUST_LOG", "info");
    cmd
}

/// Starts `fazt server` on `dir` expecting it to refuse: returns its exit code and
/// stderr (panics if it is still running after 30 s).
pub fn start_refused(dir: &Path) -> (i32, String) {
    let mut child = server_command(dir, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fazt");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server started instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (status.code().unwrap_or(-1), err)
}
