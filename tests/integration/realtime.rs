//! Realtime through the real binary: the WebSocket protocol, channel and app
//! isolation, counts, fan-out to many clients, slow clients, and idle timeouts.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::{wait_until, Server, Ws};

const RT_API: &str = r#"
module.exports = function (req) {
  const q = req.query;
  if (q.op === "broadcast") return { sent: fazt.realtime.broadcast(q.ch, { n: Number(q.n || 0), from: fazt.app.name }) };
  if (q.op === "blob") return { sent: fazt.realtime.broadcast(q.ch, { n: Number(q.n), pad: "x".repeat(4096) }) };
  if (q.op === "big") return { sent: fazt.realtime.broadcast(q.ch, { n: Number(q.n), pad: "x".repeat(60000) }) };
  if (q.op === "all") return { sent: fazt.realtime.broadcastAll({ hello: "everyone" }) };
  if (q.op === "count") return { count: q.ch ? fazt.realtime.count(q.ch) : fazt.realtime.count() };
  if (q.op === "subs") return { subs: fazt.realtime.subscribers(q.ch) };
  if (q.op === "bad") { try { fazt.realtime.broadcast("no spaces", 1); } catch (e) { return { error: String(e) }; } }
  if (q.op === "spawn") return fazt.worker.spawn("workers/ticker.js", { daemon: true, idleTimeout: q.idle, idleChannel: q.ch });
  return { status: 400, body: "op?" };
};
"#;

const TICKER: &str = r#"
module.exports = function (job) {
  let i = 0;
  while (!job.cancelled) {
    fazt.realtime.broadcast("ticks", { i: i++ });
    job.sleep(50);
  }
  return { wound_down: true, ticks: i };
};
"#;

fn rt_server(apps: &[&str]) -> Server {
    let s = Server::start();
    for a in apps {
        s.deploy_ok(a, &[("api/rt.js", RT_API), ("workers/ticker.js", TICKER)]);
    }
    s
}

fn message_on(ws: &mut Ws, ch: &str) -> Value {
    loop {
        let m = ws.recv();
        if m["type"] == "message" && m["channel"] == ch {
            return m;
        }
    }
}

#[test]
fn subscribers_receive_broadcasts_from_handlers() {
    let s = rt_server(&["live"]);
    let mut ws = s.ws("live");
    ws.subscribe("news");
    let sent = s.call("live", "/api/rt?op=broadcast&ch=news&n=7");
    assert_eq!(sent["sent"], 1);
    let m = ws.recv();
    assert_eq!(m["type"], "message");
    assert_eq!(m["channel"], "news");
    assert_eq!(m["data"], json!({"n": 7, "from": "live"}));
    assert!(m["timestamp"]
        .as_i64()
        .is_some_and(|t| t > 1_600_000_000_000));
    ws.send(json!({"type": "ping"}));
    assert_eq!(ws.recv()["type"], "pong");
    let all = s.call("live", "/api/rt?op=all");
    assert_eq!(all["sent"], 1);
    assert_eq!(ws.recv()["data"]["hello"], "everyone");
}

#[test]
fn channels_and_apps_are_isolated() {
    let s = rt_server(&["a", "b"]);
    let mut a_news = s.ws("a");
    a_news.subscribe("news");
    let mut a_sport = s.ws("a");
    a_sport.subscribe("sport");
    let mut b_news = s.ws("b");
    b_news.subscribe("news");
    assert_eq!(s.call("a", "/api/rt?op=broadcast&ch=news&n=1")["sent"], 1);
    assert_eq!(a_news.recv()["data"]["n"], 1);
    assert_eq!(a_sport.recv_within(300), None, "other channel got nothing");
    assert_eq!(b_news.recv_within(300), None, "other app got nothing");
    assert_eq!(s.call("b", "/api/rt?op=broadcast&ch=news&n=2")["sent"], 1);
    assert_eq!(b_news.recv()["data"]["from"], "b");
    assert_eq!(a_news.recv_within(300), None);
}

#[test]
fn unsubscribe_count_and_subscribers() {
    let s = rt_server(&["c"]);
    let mut one = s.ws("c");
    let mut two = s.ws("c");
    one.subscribe("room");
    two.subscribe("room");
    assert_eq!(s.call("c", "/api/rt?op=count&ch=room")["count"], 2);
    assert_eq!(s.call("c", "/api/rt?op=count")["count"], 2);
    assert_eq!(
        s.call("c", "/api/rt?op=subs&ch=room")["subs"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    two.send(json!({"type": "unsubscribe", "channel": "room"}));
    assert_eq!(
        two.recv(),
        json!({"type": "unsubscribed", "channel": "room"})
    );
    assert_eq!(s.call("c", "/api/rt?op=count&ch=room")["count"], 1);
    assert_eq!(s.call("c", "/api/rt?op=broadcast&ch=room")["sent"], 1);
    assert_eq!(message_on(&mut one, "room")["data"]["n"], 0);
    assert_eq!(two.recv_within(300), None);
    drop(one);
    assert!(wait_until(10, || s.call("c", "/api/rt?op=count&ch=room")
        ["count"]
        == 0));
}

#[test]
fn malformed_frames_get_an_error_and_the_session_lives_on() {
    let s = rt_server(&["m"]);
    let mut ws = s.ws("m");
    for (frame, needle) in [
        ("not json", "malformed JSON"),
        (r#"{"type":"subscribe"}"#, "needs a string 'channel'"),
        (
            r#"{"type":"subscribe","channel":"bad name"}"#,
            "invalid channel name",
        ),
        (r#"{"type":"dance"}"#, "unknown message type 'dance'"),
    ] {
        ws.ws.send(tungstenite::Message::text(frame)).expect("send");
        let m = ws.recv();
        assert_eq!(m["type"], "error", "{frame}");
        assert!(
            m["error"].as_str().is_some_and(|e| e.contains(needle)),
            "{frame}: {m}"
        );
    }
    ws.subscribe("ok");
    assert!(s.call("m", "/api/rt?op=bad")["error"]
        .as_str()
        .is_some_and(|e| e.contains("invalid channel name")));
    // Plain HTTP to /_ws is refused clearly.
    let r = s.app("m", "GET", "/_ws", None);
    assert_eq!(r.status, 400);
    assert!(r.error().contains("WebSocket"));
}

#[test]
fn two_hundred_clients_all_receive_a_broadcast() {
    let s = rt_server(&["fan"]);
    let mut clients: Vec<Ws> = (0..200).map(|_| s.ws("fan")).collect();
    for c in &mut clients {
        c.subscribe("all");
    }
    assert_eq!(s.call("fan", "/api/rt?op=count&ch=all")["count"], 200);
    let t = Instant::now();
    assert_eq!(
        s.call("fan", "/api/rt?op=broadcast&ch=all&n=42")["sent"],
        200
    );
    for c in &mut clients {
        assert_eq!(message_on(c, "all")["data"]["n"], 42);
    }
    println!("200 clients received one broadcast in {:?}", t.elapsed());
}

#[test]
fn a_client_that_stops_reading_does_not_stall_the_others() {
    let s = rt_server(&["slow"]);
    let mut stalled = s.ws("slow");
    stalled.subscribe("firehose");
    let mut healthy = s.ws("slow");
    healthy.subscribe("firehose");
    let t = Instant::now();
    // 4 KB messages: the stalled client's socket buffers and then its bounded queue
    // fill up, and the server cuts it off; the healthy client keeps receiving.
    for n in 1..=3000 {
        let r = s.call("slow", &format!("/api/rt?op=blob&ch=firehose&n={n}"));
        assert!(r["sent"].as_u64().is_some());
        if n % 250 == 0 {
            let mut got = 0;
            while got < n {
                got = message_on(&mut healthy, "firehose")["data"]["n"]
                    .as_i64()
                    .unwrap_or(0);
            }
        }
    }
    println!(
        "3000 broadcasts with one stalled client took {:?}",
        t.elapsed()
    );
    assert!(
        wait_until(20, || s.call("slow", "/api/rt?op=count&ch=firehose")
            ["count"]
            == 1),
        "the stalled client was disconnected"
    );
    let metrics = s.api("GET", "/metrics", None).text();
    assert!(
        metrics.contains("fazt_ws_slow_disconnects_total 1"),
        "{metrics}"
    );
    assert_eq!(
        s.call("slow", "/api/rt?op=broadcast&ch=firehose&n=1")["sent"],
        1
    );
}

#[test]
fn idle_daemons_stop_and_listeners_keep_them_alive() {
    let s = rt_server(&["idle"]);
    // Nobody listens: stopped after ~1 s, status 'stopped', never restarted.
    let job = s.call("idle", "/api/rt?op=spawn&ch=lonely&idle=1s");
    let jid = job["id"].as_str().expect("id").to_string();
    let t = Instant::now();
    let stopped = s.wait_status(&jid, "stopped", 20);
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert!(
        stopped["error"]
            .as_str()
            .is_some_and(|e| e.contains("no listener for 1s")),
        "{stopped}"
    );
    // It saw job.cancelled and returned by itself.
    assert_eq!(stopped["result"]["wound_down"], true, "{stopped}");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(s.job(&jid)["status"], "stopped", "not restarted");
    assert_eq!(s.job(&jid)["restarts"], 0);

    // A listener arriving in time keeps it running.
    let mut ws = s.ws("idle");
    ws.subscribe("busy");
    let job = s.call("idle", "/api/rt?op=spawn&ch=busy&idle=1s");
    let jid = job["id"].as_str().expect("id").to_string();
    s.wait_status(&jid, "running", 20);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(s.job(&jid)["status"], "running");
    // The daemon's broadcasts reach the listener ("ticks" channel is separate).
    ws.subscribe("ticks");
    assert!(message_on(&mut ws, "ticks")["data"]["i"].is_u64());
    // The listener leaves: it stops about a second later.
    drop(ws);
    let stopped = s.wait_status(&jid, "stopped", 20);
    assert_eq!(stopped["restarts"], 0);
}

#[test]
fn connection_caps_refuse_with_a_clear_error() {
    let s = Server::start_with(&["--ws-max-per-app", "3", "--ws-max-per-ip", "4"]);
    for a in ["x", "y"] {
        s.deploy_ok(a, &[("api/rt.js", RT_API)]);
    }
    let _x: Vec<Ws> = (0..3).map(|_| s.ws("x")).collect();
    let err = Ws::try_connect(s.addr, "x")
        .err()
        .expect("fourth connection to x is refused");
    let text = format!("{err:?}");
    assert!(text.contains("429"), "{text}");
    let _y = s.ws("y");
    let err = Ws::try_connect(s.addr, "y")
        .err()
        .expect("fifth connection from this IP is refused");
    assert!(format!("{err:?}").contains("429"));
    // A refusal is a readable HTTP error.
    let host = format!("x.localhost:{}", s.port());
    let r = crate::util::request(
        s.addr,
        "GET",
        &host,
        "/_ws",
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ],
        None,
    );
    assert_eq!(r.status, 429);
    assert!(
        r.error().contains("too many WebSocket connections"),
        "{}",
        r.text()
    );
}

/// Resident memory of the server process (VmRSS), in KB.
fn rss_kb(s: &Server) -> u64 {
    std::fs::read_to_string(format!("/proc/{}/status", s.pid()))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Raises this process's open-file soft limit to at least `want` (up to the hard
/// limit); false when even the hard limit is below it.
fn raise_nofile(want: u64) -> bool {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return false;
        }
        if lim.rlim_cur >= want {
            return true;
        }
        lim.rlim_cur = lim.rlim_max.min(want.max(lim.rlim_cur));
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur >= want
    }
}

/// A subscriber with a small read buffer (tungstenite's default, 128 KB zero-filled,
/// would make 2,000 of them cost this test process 256 MB).
fn small_subscriber(addr: std::net::SocketAddr, app: &str, ch: &str) -> Ws {
    let stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let url = format!("ws://{app}.localhost:{}/_ws", addr.port());
    let config = tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096);
    let (ws, _) = tungstenite::client::client_with_config(url.as_str(), stream, Some(config))
        .unwrap_or_else(|e| panic!("WebSocket connect: {e}"));
    let mut ws = Ws { ws };
    ws.subscribe(ch);
    ws
}

/// Issue 10, goal 6 (WebSocket scale): 1,000 subscribers cost 3,043 threads and 222 MB
/// (a reader and a writer thread per socket, 128 KB read buffers). Sessions now live
/// in one event loop: 2,000 subscribers add almost no threads, little memory each,
/// and every broadcast reaches every one of them.
#[test]
fn websocket_scale_two_thousand_subscribers_few_threads_small_rss() {
    const SUBS: usize = 2000;
    const BROADCASTS: u64 = 20;
    assert!(
        raise_nofile(SUBS as u64 + 512),
        "this test needs {} open files",
        SUBS + 512
    );
    let s = Server::start_with(&["--ws-max-per-app", "5000", "--ws-max-per-ip", "5000"]);
    s.deploy_ok("scale", &[("api/rt.js", RT_API)]);
    // Warm the HTTP side first so its threads and contexts are in the baseline.
    assert_eq!(s.call("scale", "/api/rt?op=count")["count"], 0);
    let threads_before = s.thread_count();
    let rss_before = rss_kb(&s);
    let t = Instant::now();
    let mut clients: Vec<Ws> = (0..SUBS)
        .map(|_| small_subscriber(s.addr, "scale", "all"))
        .collect();
    println!("{SUBS} subscribers connected in {:?}", t.elapsed());
    assert_eq!(s.call("scale", "/api/rt?op=count&ch=all")["count"], SUBS);
    let threads = s.thread_count().saturating_sub(threads_before);
    let rss = rss_kb(&s).saturating_sub(rss_before);
    let per_sub_kb = rss as f64 / SUBS as f64;
    println!(
        "{SUBS} subscribers: +{threads} threads, +{} MB RSS ({per_sub_kb:.1} KB each)",
        rss / 1024
    );
    assert!(
        threads <= 20,
        "{threads} more threads for {SUBS} subscribers (was 3 per subscriber)"
    );
    assert!(
        per_sub_kb <= 16.0,
        "{per_sub_kb:.1} KB of RSS per subscriber (was ~220 KB)"
    );
    for n in 1..=BROADCASTS {
        let sent = s.call("scale", &format!("/api/rt?op=broadcast&ch=all&n={n}"));
        assert_eq!(sent["sent"], SUBS, "broadcast {n}");
    }
    for c in &mut clients {
        for n in 1..=BROADCASTS {
            assert_eq!(message_on(c, "all")["data"]["n"], n);
        }
    }
    println!(
        "{} deliveries to {SUBS} subscribers in {:?}",
        SUBS as u64 * BROADCASTS,
        t.elapsed()
    );
    let metrics = s.api("GET", "/metrics", None).text();
    assert!(
        metrics.contains("fazt_ws_slow_disconnects_total 0"),
        "{metrics}"
    );
}

/// Review F1: a text frame without FIN followed by endless empty continuation frames
/// never completes a message, so one `read` of that session never returned while the
/// client kept sending, and the one event loop stopped serving every other session.
/// Each session now reads at most 64 KB per loop turn.
#[test]
fn endless_empty_continuation_frames_do_not_stall_other_sessions() {
    use std::io::{Read, Write};
    let s = rt_server(&["live"]);
    let mut victim = s.ws("live");
    victim.send(json!({"type": "ping"}));
    assert_eq!(victim.recv()["type"], "pong");

    let mut attacker = std::net::TcpStream::connect(s.addr).expect("connect");
    write!(
        attacker,
        "GET /_ws HTTP/1.1\r\nHost: live.localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .expect("handshake");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        attacker.read_exact(&mut byte).expect("101");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    // Masked client frames: text without FIN, then empty continuations without FIN.
    attacker
        .write_all(&[0x01, 0x80, 0, 0, 0, 0])
        .expect("first frame");
    let flood: Vec<u8> = [0x00u8, 0x80, 0, 0, 0, 0].repeat(20_000);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if attacker.write_all(&flood).is_err() {
                    break;
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let t = Instant::now();
        victim.send(json!({"type": "ping"}));
        let pong = victim.recv_within(5_000);
        worst = worst.max(t.elapsed());
        assert_eq!(
            pong.as_ref().map(|m| m["type"].clone()),
            Some(json!("pong")),
            "no pong within 5 s while another client floods continuation frames"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = flooder.join();
    assert!(worst < Duration::from_secs(1), "worst pong {worst:?}");
}

/// Review F5: a client's close reply (and an error reply) queued behind frames its full
/// socket had not taken yet was thrown away: the session was removed and its socket
/// shut at once, so the client got part of what was sent and no closing handshake.
/// The loop now keeps writing a closed connection's last frames until they are out.
#[test]
fn a_close_reply_behind_a_full_socket_still_reaches_the_client() {
    let s = rt_server(&["drain"]);
    let mut ws = s.ws("drain");
    ws.subscribe("big");
    // ~12 MB, more than the socket buffers hold while the client does not read, in
    // 200 frames (the per-connection queue holds 1,024).
    for n in 1..=200 {
        let r = s.call("drain", &format!("/api/rt?op=big&ch=big&n={n}"));
        assert_eq!(r["sent"], 1, "{r}");
    }
    ws.ws.close(None).expect("send a close frame");
    let _ = ws.ws.flush();
    let mut last = 0;
    let closed = loop {
        match ws.ws.read() {
            Ok(tungstenite::Message::Text(t)) => {
                let v: Value = serde_json::from_str(t.as_str()).expect("JSON");
                if v["channel"] == "big" {
                    last = v["data"]["n"].as_i64().unwrap_or(0);
                }
            }
            Ok(tungstenite::Message::Close(_)) => break true,
            Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed) => break true,
            Err(e) => {
                println!("read ended: {e}");
                break false;
            }
        }
    };
    assert_eq!(
        last, 200,
        "the client got the broadcasts up to {last} of 200"
    );
    assert!(
        closed,
        "no close reply: the socket ended without a closing handshake"
    );
}
