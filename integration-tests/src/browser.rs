//! A real browser for page tests: headless Chromium (Debian's `chromium`), driven over the Chrome
//! DevTools Protocol on a WebSocket. Only what the tests need: load a page, run script in it,
//! type, click, take a screenshot, and collect every console message, uncaught exception and
//! browser log entry (failed loads, CSP violations) along the way.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Longest wait for the browser to start, and for any one command.
const PATIENCE: Duration = Duration::from_secs(30);

/// One headless Chromium with one page; killed when dropped.
#[derive(Debug)]
pub struct Browser {
    _child: Child,
    _profile: tempfile::TempDir,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    events: Vec<Value>,
    stderr: Arc<Mutex<Vec<String>>>,
}

/// Something the page reported that a clean page never does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Complaint {
    /// `exception`, `console.error`, `console.warning`, `log.error`, `log.warning`...
    pub kind: String,
    /// What it said.
    pub text: String,
}

impl Browser {
    /// Starts Chromium with a fresh profile and attaches to its page, with console, log and
    /// page events enabled. Fails with a clear error if `chromium` is not installed.
    pub async fn launch() -> anyhow::Result<Self> {
        let profile = tempfile::tempdir()?;
        let mut child = Command::new("chromium")
            .args([
                "--headless",
                // Root in a container has no user namespaces for the sandbox.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                // No traffic of its own (updates, sync, safe browsing): tests stay on loopback.
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--window-size=1280,900",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting chromium (Debian package `chromium`; .ci/run installs it)")?;
        let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let browser_ws = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    return Ok(url.to_owned());
                }
                stderr.lock().unwrap().push(line);
            }
            bail!(
                "chromium exited before listening: {}",
                stderr.lock().unwrap().join("\n")
            )
        })
        .await
        .context("chromium did not start")??;
        // Keep reading, so a chatty browser never blocks on a full pipe.
        let sink = stderr.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        let (ws, _) = tokio::time::timeout(PATIENCE, async {
            let ws_url = page_ws_url(&browser_ws).await?;
            anyhow::Ok(tokio_tungstenite::connect_async(ws_url.as_str()).await?)
        })
        .await
        .context("attaching to the page: no answer")?
        .context("attaching to the page")?;
        let mut browser = Self {
            _child: child,
            _profile: profile,
            ws,
            next_id: 0,
            events: Vec::new(),
            stderr,
        };
        for domain in ["Page", "Runtime", "Log"] {
            browser.call(&format!("{domain}.enable"), json!({})).await?;
        }
        Ok(browser)
    }

    /// Sends a DevTools command and returns its result; events that arrive meanwhile are kept.
    pub async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws.send(Message::text(msg)).await?;
        let reply = tokio::time::timeout(PATIENCE, async {
            loop {
                let msg = self.next_message().await?;
                if msg["id"].as_u64() == Some(id) {
                    return anyhow::Ok(msg);
                }
                self.events.push(msg);
            }
        })
        .await
        .with_context(|| format!("{method}: no answer within {PATIENCE:?}"))??;
        if let Some(error) = reply.get("error") {
            bail!("{method}: {error}");
        }
        Ok(reply["result"].clone())
    }

    async fn next_message(&mut self) -> anyhow::Result<Value> {
        loop {
            match self
                .ws
                .next()
                .await
                .context("browser connection closed")??
            {
                Message::Text(text) => return Ok(serde_json::from_str(&text)?),
                Message::Close(_) => bail!("browser closed the connection"),
                _ => {}
            }
        }
    }

    /// Waits for the event `method` (one that arrived earlier counts), removing it.
    pub async fn event(&mut self, method: &str) -> anyhow::Result<Value> {
        if let Some(i) = self.events.iter().position(|e| e["method"] == method) {
            return Ok(self.events.remove(i));
        }
        tokio::time::timeout(PATIENCE, async {
            loop {
                let msg = self.next_message().await?;
                if msg["method"] == method {
                    return anyhow::Ok(msg);
                }
                self.events.push(msg);
            }
        })
        .await
        .with_context(|| format!("no {method} within {PATIENCE:?}"))?
    }

    /// Loads `url` and waits for its `load` event (scripts run, `defer` ones included).
    pub async fn navigate(&mut self, url: &str) -> anyhow::Result<()> {
        self.events.retain(|e| e["method"] != "Page.loadEventFired");
        let result = self.call("Page.navigate", json!({"url": url})).await?;
        if let Some(error) = result.get("errorText") {
            bail!("loading {url}: {error}");
        }
        self.event("Page.loadEventFired").await?;
        Ok(())
    }

    /// Reloads the page (same address, fragment included) and waits for its `load` event.
    pub async fn reload(&mut self) -> anyhow::Result<()> {
        self.events.retain(|e| e["method"] != "Page.loadEventFired");
        self.call("Page.reload", json!({})).await?;
        self.event("Page.loadEventFired").await?;
        Ok(())
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns its value as JSON.
    pub async fn eval(&mut self, expression: &str) -> anyhow::Result<Value> {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await?;
        if let Some(details) = result.get("exceptionDetails") {
            bail!("{expression}: {details}");
        }
        Ok(result["result"]["value"].clone())
    }

    /// Types `text` into the focused element, as a keyboard would (`input` events fire).
    pub async fn type_text(&mut self, text: &str) -> anyhow::Result<()> {
        self.call("Input.insertText", json!({"text": text})).await?;
        Ok(())
    }

    /// Presses and releases the key that types `text` (one character, e.g. `/`).
    pub async fn press(&mut self, text: &str) -> anyhow::Result<()> {
        for kind in ["keyDown", "keyUp"] {
            self.call(
                "Input.dispatchKeyEvent",
                json!({"type": kind, "key": text, "text": text}),
            )
            .await?;
        }
        Ok(())
    }

    /// Clicks with the mouse in the middle of the first element matching `selector`, scrolled
    /// into view first.
    pub async fn click(&mut self, selector: &str) -> anyhow::Result<()> {
        let selector_js = serde_json::to_string(selector)?;
        let at = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({selector_js}); \
                 e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); \
                 return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
            ))
            .await?;
        let (x, y) = (at[0].as_f64(), at[1].as_f64());
        let (Some(x), Some(y)) = (x, y) else {
            bail!("{selector}: no position ({at})");
        };
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
            )
            .await?;
        }
        Ok(())
    }

    /// Saves a PNG of the viewport to `path`.
    pub async fn screenshot(&mut self, path: &Path) -> anyhow::Result<()> {
        let shot = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().context("no screenshot data")?)?;
        std::fs::write(path, png)?;
        Ok(())
    }

    /// Every exception, console error or warning, and browser log error or warning so far.
    pub fn complaints(&self) -> Vec<Complaint> {
        self.events.iter().filter_map(complaint).collect()
    }

    /// What the browser printed on its stderr (for failure messages).
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }
}

/// The event as a complaint, if it is one.
fn complaint(event: &Value) -> Option<Complaint> {
    let params = &event["params"];
    let (kind, text) = match event["method"].as_str()? {
        "Runtime.exceptionThrown" => {
            let details = &params["exceptionDetails"];
            let text = details["exception"]["description"]
                .as_str()
                .or(details["text"].as_str())
                .unwrap_or_default();
            ("exception".to_owned(), text.to_owned())
        }
        "Runtime.consoleAPICalled" => {
            let level = params["type"].as_str()?;
            if !matches!(level, "error" | "warning" | "assert") {
                return None;
            }
            let text = params["args"]
                .as_array()?
                .iter()
                .map(|a| {
                    a["value"]
                        .as_str()
                        .map_or_else(|| a.to_string(), str::to_owned)
                })
                .collect::<Vec<_>>()
                .join(" ");
            (format!("console.{level}"), text)
        }
        "Log.entryAdded" => {
            let entry = &params["entry"];
            let level = entry["level"].as_str()?;
            if !matches!(level, "error" | "warning") {
                return None;
            }
            let text = format!(
                "{} ({})",
                entry["text"].as_str().unwrap_or_default(),
                entry["url"].as_str().unwrap_or_default()
            );
            (format!("log.{level}"), text)
        }
        _ => return None,
    };
    Some(Complaint { kind, text })
}

/// The WebSocket address of the browser's first page, from its `/json/list`.
async fn page_ws_url(browser_ws: &str) -> anyhow::Result<String> {
    let host = browser_ws
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .with_context(|| format!("unexpected DevTools address {browser_ws}"))?;
    let mut stream = TcpStream::connect(host).await?;
    stream
        .write_all(format!("GET /json/list HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    // The DevTools server keeps the connection open whatever the request says: read the head,
    // then exactly Content-Length bytes.
    let mut reader = BufReader::new(stream);
    let mut length = None;
    loop {
        let mut line = String::new();
        anyhow::ensure!(
            reader.read_line(&mut line).await? > 0,
            "/json/list: no response"
        );
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = Some(value.trim().parse::<usize>()?);
        }
    }
    let mut body = vec![0; length.context("/json/list: no Content-Length")?];
    reader.read_exact(&mut body).await?;
    let body = String::from_utf8(body)?;
    let targets: Vec<Value> = serde_json::from_str(&body)?;
    targets
        .iter()
        .find(|t| t["type"] == "page")
        .and_then(|t| t["webSocketDebuggerUrl"].as_str())
        .map(str::to_owned)
        .with_context(|| format!("no page among {targets:?}"))
}
