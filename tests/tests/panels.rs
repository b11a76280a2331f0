//! The web panels on the admin listeners (issue #4): plain server-rendered HTML on
//! `GET /` of the relay and of the shim.
//!
//! Over plain HTTP: the relay's page lists the connected nodes with their public ports,
//! the shim's page shows its peers and their paths; the relay's deny button (a form
//! post) cuts the node off, which its own `/api/status` then reports; the shim's deny
//! button closes a peer's overlay connection even with `--allow-any`; cross-site posts
//! are refused; the token travels in a cookie set by `/login`; hostile strings are
//! escaped; in grid mode the invite form issues a code that `ferry-shim join` redeems.
//!
//! In a real browser: headless Chromium, driven over its DevTools protocol, logs in,
//! loads both panels, finds the node list and the peer paths in the rendered DOM,
//! clicks the deny buttons with the mouse, and the nodes are refused afterwards. Without
//! Chromium the browser test prints `SKIPPED: …`; with `FERRY_REQUIRE_NETLAB=1` (CI) a
//! skip fails.
//!
//! Relays here use public ports 22700-22749.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::*;
use serde_json::{Value, json};

/// One HTTP exchange as the test saw it on the wire.
struct Reply {
    status: u16,
    /// Status line and headers.
    head: String,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (n, value) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then_some(value.trim())
        })
    }
}

/// A raw HTTP/1.1 request (no redirects followed, exact headers), so the test sees
/// what a browser would be sent.
fn http(admin: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let host = admin.trim_start_matches("http://");
    let mut tcp = TcpStream::connect(host).unwrap_or_else(|e| panic!("connect {host}: {e}"));
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if method == "POST" {
        request.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body);
    tcp.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {head:?}"));
    Reply {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

fn get_page(admin: &str) -> String {
    let reply = http(admin, "GET", "/", &[], "");
    assert_eq!(reply.status, 200, "GET {admin}/: {}", reply.body);
    assert!(
        reply
            .header("content-type")
            .is_some_and(|c| c.starts_with("text/html")),
        "{}",
        reply.head
    );
    reply.body
}

/// What the panel's own page sends with a form: `Origin` of the listener itself.
fn origin_of(admin: &str) -> String {
    admin.trim_end_matches('/').to_string()
}

fn relay_state(shim: &Shim) -> (String, String) {
    let status = shim.status();
    let relay = &status["relays"][0];
    (
        relay["state"].as_str().unwrap_or_default().to_string(),
        relay["error"].as_str().unwrap_or_default().to_string(),
    )
}

fn wait_refused_on_deny_list(shim: &Shim) -> String {
    wait_for(
        "the relay to refuse the node: on the deny list",
        Duration::from_secs(10),
        || {
            let (state, error) = relay_state(shim);
            (state == "refused" && error.contains("deny list")).then_some(error)
        },
    )
}

/// An exposing shim that allows anyone, and a shim forwarding to it; returns once an
/// echo went through the overlay (so each has the other as a peer).
fn overlay_pair(dir: &Path, relay: &Relay) -> (Shim, Shim) {
    let server = Shim::expose_echo(dir, "server", &relay.url, &["--public", "--allow-any"]);
    server.wait_connected();
    let client = Shim::connect(dir, "client", &server.node_id, &relay.url);
    let forward = client.forward_addr();
    wait_for("an echo over the overlay", Duration::from_secs(20), || {
        echo_once(forward, b"hello").ok().filter(|r| r == b"hello")
    });
    (server, client)
}

#[test]
fn panels_show_nodes_and_peers_and_their_buttons_work() {
    let dir = TempDir::new("panels-http");
    let relay = Relay::start(dir.path(), "22700-22709");
    let (server, client) = overlay_pair(dir.path(), &relay);
    let public = server.public_addr("echo");

    // The relay's page: both nodes, the public port, buttons, and it reloads itself.
    let page = get_page(&relay.admin);
    assert!(
        page.contains("<meta http-equiv=\"refresh\" content=\"5\">"),
        "{page}"
    );
    assert!(page.contains(&relay.url), "relay URL missing: {page}");
    assert!(page.contains("id=\"policy-mode\">open<"), "{page}");
    for node in [&server.node_id, &client.node_id] {
        assert!(
            page.contains(&format!("<tr data-node=\"{node}\">")),
            "node {node} missing from the table: {page}"
        );
        for action in ["allow", "deny", "revoke", "clear"] {
            assert!(
                page.contains(&format!("data-action=\"{action}\" data-node=\"{node}\"")),
                "no {action} button for {node}"
            );
        }
    }
    assert!(
        page.contains(&public.to_string()),
        "public port missing: {page}"
    );
    assert!(!page.contains("<script"), "the panel needs no scripts");
    let reply = http(&relay.admin, "GET", "/panel", &[], "");
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .header("content-security-policy")
            .is_some_and(|c| c.contains("frame-ancestors 'none'")),
        "{}",
        reply.head
    );

    // The shims' pages: the peer and its path, with allow/deny buttons.
    for (shim, peer) in [(&server, &client), (&client, &server)] {
        let page = get_page(&shim.admin);
        assert!(page.contains(&shim.node_id), "{page}");
        assert!(
            page.contains(&format!("<code>{}</code>", peer.node_id)),
            "peer {} missing: {page}",
            peer.node_id
        );
        assert!(
            page.contains("<b class=\"path\">direct</b>")
                || page.contains("<b class=\"path\">relayed</b>"),
            "no peer path: {page}"
        );
        assert!(page.contains("id=\"relays\""), "{page}");
        assert!(page.contains("last until the shim restarts"), "{page}");
    }
    let page = get_page(&server.admin);
    assert!(page.contains("echo"), "service missing: {page}");
    assert!(page.contains(&public.to_string()), "{page}");
    let page = get_page(&client.admin);
    assert!(
        page.contains(&format!("{}</code>", client.forward_addr())),
        "forward missing: {page}"
    );

    // A cross-site form post is refused and changes nothing.
    let form = format!("action=deny&node={}", server.node_id);
    for (header, value) in [
        ("Origin", "http://evil.example"),
        ("Origin", "null"),
        ("Referer", "http://evil.example/page"),
    ] {
        let reply = http(
            &relay.admin,
            "POST",
            "/panel/policy",
            &[(header, value)],
            &form,
        );
        assert_eq!(reply.status, 403, "{header}: {value}: {}", reply.body);
        assert!(reply.body.contains("cross-site"), "{}", reply.body);
    }
    let reply = http(
        &server.admin,
        "POST",
        "/panel/peer",
        &[("Origin", "http://evil.example")],
        &format!("action=deny&node={}", client.node_id),
    );
    assert_eq!(reply.status, 403, "{}", reply.body);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(relay_state(&server).0, "connected");
    assert_eq!(
        echo_once(client.forward_addr(), b"still").unwrap(),
        b"still"
    );

    // Bad input gets a page that says why.
    let reply = http(
        &relay.admin,
        "POST",
        "/panel/policy",
        &[("Origin", &origin_of(&relay.admin))],
        "action=deny&node=%3Cscript%3E",
    );
    assert_eq!(reply.status, 400);
    assert!(reply.body.contains("&lt;script&gt;"), "{}", reply.body);
    assert!(!reply.body.contains("<script>"), "{}", reply.body);

    // The shim's deny button: the client's live connection is closed at once, though
    // the server runs with --allow-any, and it cannot come back.
    let reply = http(
        &server.admin,
        "POST",
        "/panel/peer",
        &[("Origin", &origin_of(&server.admin))],
        &format!("action=deny&node={}", client.node_id),
    );
    assert_eq!(reply.status, 303, "{}", reply.body);
    assert_eq!(reply.header("location"), Some("/"));
    wait_for(
        "the denied peer's connection to close",
        Duration::from_secs(5),
        || {
            let peers = server.status()["peers"].clone();
            (!peers
                .as_array()?
                .iter()
                .any(|p| p["node_id"] == client.node_id.as_str()))
            .then_some(())
        },
    );
    let refused = echo_once(client.forward_addr(), b"denied");
    assert!(
        !matches!(refused, Ok(ref r) if !r.is_empty()),
        "a denied peer still reached the service: {refused:?}"
    );
    wait_for(
        "the client to log why it was refused",
        Duration::from_secs(5),
        || client.proc.log().contains("not allowed").then_some(()),
    );
    let page = get_page(&server.admin);
    assert!(
        page.contains(&format!(
            "data-action=\"allow\" data-node=\"{}\"",
            client.node_id
        )),
        "the denied node has no allow button: {page}"
    );
    // Allow undoes it.
    let reply = http(
        &server.admin,
        "POST",
        "/panel/peer",
        &[("Origin", &origin_of(&server.admin))],
        &format!("action=allow&node={}", client.node_id),
    );
    assert_eq!(reply.status, 303, "{}", reply.body);
    wait_for(
        "the allowed peer to reach the service",
        Duration::from_secs(20),
        || {
            echo_once(client.forward_addr(), b"again")
                .ok()
                .filter(|r| r == b"again")
        },
    );

    // The relay's deny button: 303 back to the panel, and the node is refused.
    let reply = http(
        &relay.admin,
        "POST",
        "/panel/policy",
        &[("Origin", &origin_of(&relay.admin))],
        &form,
    );
    assert_eq!(reply.status, 303, "{}", reply.body);
    assert_eq!(reply.header("location"), Some("/"));
    let why = wait_refused_on_deny_list(&server);
    eprintln!("denied from the panel: {why}");
    let after = echo_once(public, b"x");
    assert!(
        !matches!(after, Ok(ref r) if !r.is_empty()),
        "the denied node's public port still answers: {after:?}"
    );
    let page = get_page(&relay.admin);
    assert!(
        page.contains(&format!(
            "<tr data-node=\"{}\"><td><code>{}</code></td><td>deny</td><td>no</td>",
            server.node_id, server.node_id
        )),
        "the denied node is not listed as denied and disconnected: {page}"
    );
    let policy = std::fs::read_to_string(relay.data_dir.join("policy.toml")).unwrap();
    assert!(policy.contains(&server.node_id), "{policy}");

    // Same logic as the JSON API: clear it there, and the panel shows the lists empty.
    let reply = http(
        &relay.admin,
        "POST",
        "/panel/policy",
        &[("Origin", &origin_of(&relay.admin))],
        &format!("action=clear&node={}", server.node_id),
    );
    assert_eq!(reply.status, 303, "{}", reply.body);
    assert!(get_page(&relay.admin).contains("lists are empty"));
}

/// Just what the token test needs of a relay.
struct HostileRelay {
    admin: String,
}

#[test]
fn token_cookie_login_and_escaping() {
    let dir = TempDir::new("panels-token");
    let token_file = dir.path().join("admin-token");
    // Characters a cookie value cannot hold as they are.
    let token = "p@nel token;with,odd\"chars%";
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    // The relay accepts this as a host name, so it reaches the page: it must come out
    // escaped.
    let hostile = "<script>alert(1)<\\script>\"&'";
    // `Relay::start_args` sets --public-host itself, so start this one by hand.
    let data = dir.path().join("relay");
    let args: Vec<String> = [
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--stun",
        "127.0.0.1:0",
        "--ports",
        "22720-22729",
        "--admin",
        "127.0.0.1:0",
        "--admin-token-file",
        token_file.to_str().unwrap(),
        "--public-host",
        hostile,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let proc = Proc::start(&bin("ferry-relay"), &args, dir.path().join("relay.log"));
    let admin = proc.ready_field("admin");
    let relay = HostileRelay { admin };
    let reply = http(&relay.admin, "GET", "/", &[], "");
    assert_eq!(reply.status, 401);
    assert!(reply.body.contains("/login?token="), "{}", reply.body);
    let reply = http(&relay.admin, "GET", "/login?token=wrong", &[], "");
    assert_eq!(reply.status, 401);
    assert!(reply.header("set-cookie").is_none());

    let query: String = token
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' => char::from(b).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let reply = http(
        &relay.admin,
        "GET",
        &format!("/login?token={query}"),
        &[],
        "",
    );
    assert_eq!(reply.status, 303, "{}", reply.body);
    assert_eq!(reply.header("location"), Some("/"));
    let set_cookie = reply.header("set-cookie").expect("a cookie").to_string();
    let attributes = set_cookie.to_ascii_lowercase();
    assert!(attributes.contains("; httponly"), "{set_cookie}");
    assert!(attributes.contains("; samesite=strict"), "{set_cookie}");
    assert!(set_cookie.starts_with("ferry_admin_token="), "{set_cookie}");
    // What a browser sends back: the name=value part.
    let cookie_value = set_cookie.split(';').next().unwrap().to_string();
    let cookie = [("Cookie", cookie_value.as_str())];
    let reply = http(&relay.admin, "GET", "/", &cookie, "");
    assert_eq!(reply.status, 200, "{}", reply.body);
    let page = reply.body;
    // The bearer header still works, and the API takes the cookie too.
    let bearer = format!("Bearer {token}");
    let reply = http(
        &relay.admin,
        "GET",
        "/api/info",
        &[("Authorization", &bearer)],
        "",
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        http(&relay.admin, "GET", "/api/info", &cookie, "").status,
        200
    );
    let wrong = [("Cookie", "ferry_admin_token=nope")];
    assert_eq!(http(&relay.admin, "GET", "/", &wrong, "").status, 401);

    assert!(!page.contains("<script>"), "unescaped host: {page}");
    // `'` stays as it is: the templates quote every attribute with `"`, so it can
    // end none.
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;\\script&gt;&quot;&amp;'"),
        "the host is not escaped as expected: {page}"
    );

    // A form post needs the token too (the cookie), and a same-origin Origin.
    let stranger = ferry_proto::SecretKey::generate().node_id();
    let form = format!("action=deny&node={stranger}");
    let origin = origin_of(&relay.admin);
    let reply = http(
        &relay.admin,
        "POST",
        "/panel/policy",
        &[("Origin", &origin)],
        &form,
    );
    assert_eq!(reply.status, 401, "{}", reply.body);
    let reply = http(
        &relay.admin,
        "POST",
        "/panel/policy",
        &[("Origin", &origin), cookie[0]],
        &form,
    );
    assert_eq!(reply.status, 303, "{}", reply.body);
    let page = http(&relay.admin, "GET", "/", &cookie, "").body;
    assert!(
        page.contains(&format!(
            "<tr data-node=\"{stranger}\"><td><code>{stranger}</code></td><td>deny</td>"
        )),
        "{page}"
    );
}

#[test]
fn grid_panel_issues_invites() {
    let dir = TempDir::new("panels-grid");
    let relay = Relay::start_args(dir.path(), "22710-22719", &["--policy", "grid"]);
    let page = get_page(&relay.admin);
    assert!(page.contains("Invite a friend"), "{page}");
    assert!(page.contains("action=\"/panel/invite\""), "{page}");
    let reply = http(&relay.admin, "GET", "/panel/invite", &[], "");
    assert_eq!(reply.status, 200);
    assert!(
        !reply.body.contains("http-equiv=\"refresh\""),
        "the invite page must not reload while one types"
    );

    let origin = origin_of(&relay.admin);
    let reply = http(
        &relay.admin,
        "POST",
        "/panel/invite",
        &[("Origin", &origin)],
        "expires=soon&uses=1",
    );
    assert_eq!(reply.status, 400);
    assert!(reply.body.contains("invalid duration"), "{}", reply.body);
    let reply = http(
        &relay.admin,
        "POST",
        "/panel/invite",
        &[("Origin", &origin)],
        "expires=1h&uses=2",
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let start = reply
        .body
        .find("<code id=\"invite-code\">")
        .expect("a code")
        + 23;
    let code = &reply.body[start..];
    let code = &code[..code.find("</code>").unwrap()];
    assert!(
        code.starts_with(&relay.url) && code.contains("?invite="),
        "{code}"
    );

    // The code works: a node joins with it and is admitted.
    let data = dir.path().join("friend");
    let out = Command::new(bin("ferry-shim"))
        .args(["join", code, "--data-dir", data.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let service = format!("echo={}", echo_server());
    let friend = Shim::start(dir.path(), "friend", &["expose", "--service", &service]);
    friend.wait_connected();
    assert!(get_page(&relay.admin).contains(&friend.node_id));
}

// ---------------------------------------------------------------------------------
// Headless Chromium

fn find_chromium() -> Option<PathBuf> {
    // FERRY_CHROMIUM names the browser explicitly (a missing file means none).
    if let Some(path) = std::env::var_os("FERRY_CHROMIUM") {
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser", "google-chrome"].map(|n| dir.join(n)))
        .find(|p| p.is_file())
}

fn skip(test: &str, reason: &str) {
    if std::env::var("FERRY_REQUIRE_NETLAB").is_ok_and(|v| !v.is_empty() && v != "0") {
        panic!(
            "{test} must run (FERRY_REQUIRE_NETLAB=1) but cannot: {reason}; install Debian's chromium package"
        );
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {reason}");
}

/// A headless Chromium and one page in it, driven over the DevTools protocol.
struct Browser {
    child: Child,
    ws: tungstenite::WebSocket<TcpStream>,
    session: String,
    next_id: u64,
    _profile: TempDir,
}

impl Browser {
    fn launch(program: &Path, log: PathBuf) -> Browser {
        let profile = TempDir::new("chromium-profile");
        let log = std::fs::File::create(log).unwrap();
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new(program)
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--no-default-browser-check",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-dev-shm-usage",
                    "--no-proxy-server",
                    "--window-size=1400,1000",
                    "--remote-debugging-port=0",
                    &format!("--user-data-dir={}", profile.path().display()),
                    "about:blank",
                ])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                // Its own process group, so that the renderer processes go with it.
                .process_group(0)
                .spawn_tied()
                .unwrap_or_else(|e| panic!("start {}: {e}", program.display()))
        };
        // Chromium writes the port it picked and the browser's WebSocket path here.
        let active = profile.path().join("DevToolsActivePort");
        let (port, path) = wait_for("Chromium's DevTools port", Duration::from_secs(30), || {
            let text = std::fs::read_to_string(&active).ok()?;
            let mut lines = text.lines();
            let port: u16 = lines.next()?.trim().parse().ok()?;
            let path = lines.next()?.trim().to_string();
            Some((port, path))
        });
        let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let (ws, _) = tungstenite::client(format!("ws://127.0.0.1:{port}{path}"), tcp)
            .unwrap_or_else(|e| panic!("DevTools WebSocket: {e}"));
        let mut browser = Browser {
            child,
            ws,
            session: String::new(),
            next_id: 1,
            _profile: profile,
        };
        let target = browser.call("Target.createTarget", json!({"url": "about:blank"}));
        let target_id = target["targetId"].as_str().unwrap().to_string();
        let attached = browser.call(
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        );
        browser.session = attached["sessionId"].as_str().unwrap().to_string();
        browser.call("Page.enable", json!({}));
        browser
    }

    /// Sends one command (to the page once attached) and waits for its answer;
    /// events in between are skipped.
    fn try_call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        self.ws
            .send(tungstenite::Message::text(message.to_string()))
            .map_err(|e| format!("send {method}: {e}"))?;
        loop {
            let reply = self.ws.read().map_err(|e| format!("read {method}: {e}"))?;
            let Ok(text) = reply.to_text() else { continue };
            let Ok(value) = serde_json::from_str::<Value>(text) else {
                continue;
            };
            if value["id"] != json!(id) {
                continue;
            }
            if let Some(error) = value.get("error") {
                return Err(format!("{method}: {error}"));
            }
            return Ok(value["result"].clone());
        }
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        self.try_call(method, params)
            .unwrap_or_else(|e| panic!("DevTools: {e}"))
    }

    /// Evaluates `expression` in the page; `None` while the page is navigating.
    fn eval(&mut self, expression: &str) -> Option<Value> {
        let result = self
            .try_call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .ok()?;
        if result.get("exceptionDetails").is_some() {
            return None;
        }
        Some(result["result"]["value"].clone())
    }

    fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
        wait_for(&format!("{url} to load"), Duration::from_secs(15), || {
            let ready = self.eval("document.readyState + ' ' + location.href")?;
            let ready = ready.as_str()?.to_string();
            (ready.starts_with("complete ") && !ready.ends_with("about:blank")).then_some(())
        });
    }

    /// The rendered DOM, as `--dump-dom` would print it.
    fn dom(&mut self) -> String {
        wait_for("the page's DOM", Duration::from_secs(10), || {
            self.eval(
                "document.readyState === 'complete' ? document.documentElement.outerHTML : null",
            )?
            .as_str()
            .map(str::to_string)
        })
    }

    /// Clicks the element `selector` picks with the mouse, as a person would: scroll
    /// it into view, move there, press and release the left button.
    fn click(&mut self, selector: &str) -> bool {
        let script = format!(
            "(() => {{ const e = document.querySelector({sel}); if (!e) return null; \
             e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); \
             return [r.left + r.width / 2, r.top + r.height / 2]; }})()",
            sel = json!(selector)
        );
        let Some(point) = self.eval(&script) else {
            return false;
        };
        let (Some(x), Some(y)) = (point[0].as_f64(), point[1].as_f64()) else {
            return false;
        };
        for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
            let result = self.try_call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
            );
            if result.is_err() {
                return false;
            }
        }
        true
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.try_call("Browser.close", json!({}));
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Still running: end its process group (the browser and its renderers).
        let pgid = self.child.id() as i32;
        // SAFETY: kill(2) on the process group this test created; no memory involved.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

#[test]
fn headless_chromium_shows_the_panels_and_clicks_deny() {
    const TEST: &str = "headless_chromium_shows_the_panels_and_clicks_deny";
    let Some(chromium) = find_chromium() else {
        skip(
            TEST,
            "no chromium on PATH or at FERRY_CHROMIUM (Debian package chromium)",
        );
        return;
    };
    let dir = TempDir::new("panels-chromium");
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "chromium-test-token\n").unwrap();
    let relay = Relay::start_args(
        dir.path(),
        "22730-22739",
        &["--admin-token-file", token_file.to_str().unwrap()],
    );
    let (server, client) = overlay_pair(dir.path(), &relay);
    let mut browser = Browser::launch(&chromium, dir.path().join("chromium.log"));

    // The relay's panel needs the token: log in once, and the cookie does the rest.
    browser.goto(&format!("{}/login?token=chromium-test-token", relay.admin));
    let dom = browser.dom();
    assert!(dom.contains("id=\"nodes\""), "no node table: {dom}");
    for node in [&server.node_id, &client.node_id] {
        assert!(
            dom.contains(&format!("<tr data-node=\"{node}\">")),
            "node {node} missing from the rendered node list: {dom}"
        );
    }
    let url = browser.eval("location.href").unwrap();
    assert_eq!(url, json!(format!("{}/", relay.admin)));

    // The shims' panels: each shows the other as a peer with its path.
    for (shim, peer) in [(&server, &client), (&client, &server)] {
        browser.goto(&format!("{}/", shim.admin));
        let dom = browser.dom();
        assert!(dom.contains(&peer.node_id), "peer missing: {dom}");
        let path = browser
            .eval("[...document.querySelectorAll('#peers b.path')].map(e => e.textContent).join()")
            .unwrap();
        assert!(
            path == json!("direct") || path == json!("relayed"),
            "peer path shown as {path}: {dom}"
        );
    }

    // Deny on the server's panel: a mouse click on the peer's deny button.
    browser.goto(&format!("{}/", server.admin));
    let peer_deny = format!(
        "#peers button[data-action='deny'][data-node='{}']",
        client.node_id
    );
    wait_for(
        "the click on the shim's deny button to take",
        Duration::from_secs(15),
        || {
            browser.click(&peer_deny);
            wait_until(Duration::from_secs(2), || {
                server.status()["peers"]
                    .as_array()
                    .is_some_and(|p| !p.iter().any(|p| p["node_id"] == client.node_id.as_str()))
            })
            .then_some(())
        },
    );
    wait_for(
        "the panel to show the peer denied",
        Duration::from_secs(10),
        || {
            browser
                .dom()
                .contains(&format!(
                    "data-action=\"allow\" data-node=\"{}\"",
                    client.node_id
                ))
                .then_some(())
        },
    );

    // Deny on the relay's panel: the server node is refused afterwards.
    browser.goto(&format!("{}/", relay.admin));
    let relay_deny = format!(
        "#nodes button[data-action='deny'][data-node='{}']",
        server.node_id
    );
    wait_for(
        "the click on the relay's deny button to take",
        Duration::from_secs(15),
        || {
            browser.click(&relay_deny);
            wait_until(Duration::from_secs(3), || {
                relay_state(&server).1.contains("deny list")
            })
            .then_some(())
        },
    );
    let why = wait_refused_on_deny_list(&server);
    eprintln!("Chromium's click denied the node: {why}");
    wait_for(
        "the panel to list the node as denied",
        Duration::from_secs(10),
        || {
            let dom = browser.dom();
            dom.contains(&format!(
                "<tr data-node=\"{}\"><td><code>{}</code></td><td>deny</td>",
                server.node_id, server.node_id
            ))
            .then_some(())
        },
    );
}

/// Polls `check` every 100 ms for up to `limit`.
fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}
