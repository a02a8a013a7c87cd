//! The web dashboard in a real browser: Debian's `chromium`, driven over WebDriver by its
//! `chromium-driver` (both installed by `.ci/run`), against a real coordinator and nodes.
//! Screenshots go to `target/screenshots/`.

use std::path::PathBuf;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use mesh_agent_sdk::{GoalClient, RunId, RunState};
use mesh_tests::{Mesh, Timings, free_port, wait_for, workflow_goal};
use serde_json::{Value, json};

const AGENTS: &str = r#"
[[agents]]
kind = "echo"
max_concurrency = 16
[[agents]]
kind = "sleep"
max_concurrency = 16
"#;

/// A headless chromium session and the driver that runs it, in a process group of their own
/// that is killed when this is dropped (the browser too, if a test failed before closing it).
struct Browser {
    client: Client,
    driver: std::process::Child,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let group = format!("-{}", self.driver.id());
        let _ = std::process::Command::new("kill")
            .args(["-9", "--", &group])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = self.driver.wait();
    }
}

fn executable(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([
            PathBuf::from("/usr/bin"),
            PathBuf::from("/usr/lib/chromium"),
        ])
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

async fn browser(dir: &std::path::Path) -> Browser {
    let driver = executable(&["chromedriver"]).expect(
        "chromedriver is not installed: the dashboard's tests need Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does it)",
    );
    let port = free_port();
    use std::os::unix::process::CommandExt;
    let log = std::fs::File::create(dir.join("chromedriver.log")).unwrap();
    let proc = std::process::Command::new(&driver)
        .arg(format!("--port={port}"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("start chromedriver");
    wait_for(
        "chromedriver to listen",
        Duration::from_secs(15),
        || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
        },
    )
    .await;
    let mut options = json!({
        "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,800", "--hide-scrollbars"],
    });
    if let Some(chromium) = executable(&["chromium", "chromium-browser"]) {
        options["binary"] = json!(chromium);
    }
    let mut caps = serde_json::Map::new();
    caps.insert("browserName".into(), json!("chrome"));
    caps.insert("goog:chromeOptions".into(), options);
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let client = tokio::time::timeout(
        Duration::from_secs(60),
        ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}")),
    )
    .await
    .expect("a browser session within 60 s")
    .unwrap_or_else(|e| panic!("a browser session: {e}"));
    Browser {
        client,
        driver: proc,
    }
}

fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shot(b: &Client, name: &str) {
    let png = b.screenshot().await.unwrap();
    std::fs::write(screenshots().join(format!("{name}.png")), png).unwrap();
}

fn ui(mesh: &Mesh, path: &str) -> String {
    format!("http://127.0.0.1:{}{path}", mesh.http_port)
}

async fn text(b: &Client, css: &str) -> Option<String> {
    b.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

/// Waits (20 s at most) until the element `css` reads `want`, the page never reloaded.
async fn wait_text(b: &Client, css: &str, want: &str) {
    wait_for(
        &format!("{css} to read {want}"),
        Duration::from_secs(20),
        || async { (text(b, css).await.as_deref() == Some(want)).then_some(()) },
    )
    .await;
}

/// Waits (20 s at most) until `css` is on a run's page and the page has caught up with the
/// run's events (no redraw under way: `run.js` marks it), so that what a test finds next
/// stays on the page while the run does not move.
async fn settled_on(b: &Client, css: &str) -> fantoccini::elements::Element {
    wait_for(
        &format!("{css} on a settled page"),
        Duration::from_secs(20),
        || async {
            b.find(Locator::Css("#run[data-busy='0']")).await.ok()?;
            b.find(Locator::Css(css)).await.ok()
        },
    )
    .await
}

async fn submit(client: &GoalClient, flow: &str) -> RunId {
    client
        .submit(workflow_goal(flow, json!({})))
        .await
        .unwrap()
        .run_id
}

/// Whether the page is as wide as the window: nothing to scroll sideways.
async fn fits(b: &Client) -> bool {
    b.execute(
        "return document.documentElement.scrollWidth <= window.innerWidth",
        vec![],
    )
    .await
    .unwrap()
        == json!(true)
}

/// The overview lists both healthy nodes; a submitted goal goes from running to succeeded on
/// its page without a reload, its output shown; the pages fit 1280×800 and a phone's width.
#[tokio::test]
async fn the_overview_lists_the_nodes_and_a_run_goes_live_to_succeeded() {
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", AGENTS).await;
    mesh.start_node("n2", AGENTS).await;
    let b = browser(mesh.dir.path()).await;
    let c = &b.client;

    c.goto(&ui(&mesh, "/ui")).await.unwrap();
    let healthy = c
        .find_all(Locator::Css("#nodes tr.node[data-health=healthy]"))
        .await
        .unwrap();
    assert_eq!(healthy.len(), 2);
    assert!(fits(c).await, "the overview fits 1280 px");
    shot(c, "overview").await;

    let client = mesh.client().await;
    let run = submit(
        &client,
        "steps:\n  - {id: think, uses: sleep, with: {ms: 1500}}\n  - {id: answer, uses: echo, needs: [think], with: {text: hello from the page}}\n",
    )
    .await;
    c.goto(&ui(&mesh, &format!("/ui/runs/{run}")))
        .await
        .unwrap();
    // (The page redraws itself as events come: what it reads is waited for, not read once.)
    wait_text(c, "#run-state", "running").await;
    c.execute("window.__kept = 42", vec![]).await.unwrap();
    wait_text(c, "#run-state", "succeeded").await;
    let kept = c.execute("return window.__kept", vec![]).await.unwrap();
    assert_eq!(
        kept,
        json!(42),
        "the page was updated in place, not reloaded"
    );
    let output = text(c, "#run-output").await.unwrap_or_default();
    assert!(output.contains("hello from the page"), "{output}");
    // Each step has its timeline from the trace.
    let bars = c.find_all(Locator::Css("#steps .bar .seg")).await.unwrap();
    assert!(bars.len() >= 2, "{} segments", bars.len());
    shot(c, "run").await;

    c.set_window_size(390, 844).await.unwrap();
    c.refresh().await.unwrap();
    assert!(fits(c).await, "the run page fits a phone's width");
    shot(c, "run-phone").await;
    c.goto(&ui(&mesh, "/ui")).await.unwrap();
    assert!(fits(c).await, "the overview fits a phone's width");
    shot(c, "overview-phone").await;
    b.client.clone().close().await.unwrap();
}

/// An approval step is approved from the page and the run completes; another run is
/// cancelled from its page; the runs list filters by state and finds a run by id.
#[tokio::test]
async fn approvals_and_cancellations_are_done_from_the_page() {
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", AGENTS).await;
    let b = browser(mesh.dir.path()).await;
    let c = &b.client;
    let client = mesh.client().await;

    let gated = submit(
        &client,
        "steps:\n  - {id: draft, uses: echo, with: {t: x}}\n  - id: sign-off\n    needs: [draft]\n    approval: {message: Publish?}\n  - {id: publish, uses: echo, needs: [sign-off], with: {by: \"${{ steps['sign-off'].output.by }}\"}}\n",
    )
    .await;
    c.goto(&ui(&mesh, &format!("/ui/runs/{gated}")))
        .await
        .unwrap();
    let approve = settled_on(c, "button.approve").await;
    c.find(Locator::Css("form.action input[name=comment]"))
        .await
        .unwrap()
        .send_keys("looks good")
        .await
        .unwrap();
    shot(c, "approval").await;
    approve.click().await.unwrap();
    wait_text(c, "#run-state", "succeeded").await;
    let view = client.get_run(&gated).await.unwrap();
    assert_eq!(view.state, RunState::Succeeded);

    let long = submit(
        &client,
        "steps:\n  - {id: wait, uses: sleep, with: {ms: 60000}}\n",
    )
    .await;
    c.goto(&ui(&mesh, &format!("/ui/runs/{long}")))
        .await
        .unwrap();
    settled_on(c, "button.cancel").await.click().await.unwrap();
    wait_text(c, "#run-state", "cancelled").await;
    assert_eq!(
        client.get_run(&long).await.unwrap().state,
        RunState::Cancelled
    );

    // The list: cancelled runs only, and a run found by its id.
    c.goto(&ui(&mesh, "/ui/runs?state=cancelled"))
        .await
        .unwrap();
    let listed = c
        .find_all(Locator::Css("table.runs tbody tr"))
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    c.goto(&ui(&mesh, &format!("/ui/runs?q={gated}")))
        .await
        .unwrap();
    let url = c.current_url().await.unwrap();
    assert!(url.path().ends_with(gated.as_str()), "{url}");
    b.client.clone().close().await.unwrap();
}

/// With authentication on the dashboard asks for a token; a read-only token sees runs but no
/// action buttons, and an action it sends anyway is refused (403) and changes nothing.
#[tokio::test]
async fn a_read_only_token_sees_no_buttons_and_its_actions_are_refused() {
    let mut mesh = Mesh::start(Timings {
        coordinator_extra: "[auth]\nenabled = true\n".into(),
        ..Timings::default()
    })
    .await;
    let admin = mesh.client().await;
    let worker = admin
        .create_token("n1", "default", "worker", None)
        .await
        .unwrap()
        .secret;
    mesh.worker_token = Some(worker);
    mesh.start_node("n1", AGENTS).await;
    let viewer = admin
        .create_token("viewer", "default", "read", None)
        .await
        .unwrap()
        .secret;
    let run = submit(
        &admin,
        "steps:\n  - {id: wait, uses: sleep, with: {ms: 60000}}\n",
    )
    .await;

    let b = browser(mesh.dir.path()).await;
    let c = &b.client;
    c.goto(&ui(&mesh, "/ui")).await.unwrap();
    assert!(c.current_url().await.unwrap().path().ends_with("/ui/login"));
    let field = c.find(Locator::Css("input[name=token]")).await.unwrap();
    field.send_keys("mesh_not-a-token").await.unwrap();
    c.find(Locator::Css("form.login button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(
        "the login page to name the unknown token",
        Duration::from_secs(20),
        || async {
            let error = text(c, "p.error").await?;
            error.contains("unknown token").then_some(())
        },
    )
    .await;

    let field = c.find(Locator::Css("input[name=token]")).await.unwrap();
    field.send_keys(&viewer).await.unwrap();
    c.find(Locator::Css("form.login button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    // The login answers with a cookie and a redirect: go on only once it has.
    wait_for("the login to succeed", Duration::from_secs(20), || async {
        let path = c.current_url().await.ok()?.path().to_owned();
        (!path.ends_with("/ui/login")).then_some(())
    })
    .await;
    c.goto(&ui(&mesh, &format!("/ui/runs/{run}")))
        .await
        .unwrap();
    wait_text(c, "#run-state", "running").await;
    let buttons = c
        .find_all(Locator::Css("form.action button"))
        .await
        .unwrap();
    assert!(buttons.is_empty(), "a reader sees no action");
    shot(c, "read-only").await;
    let answer: Value = c
        .execute_async(
            "const done = arguments[arguments.length - 1];
             fetch(location.pathname + '/cancel', { method: 'POST', body: new URLSearchParams({ step: '' }) })
               .then(r => r.text().then(t => done([r.status, t])));",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(answer[0], json!(403), "{answer}");
    assert!(
        answer[1]
            .as_str()
            .unwrap_or_default()
            .contains("needs the write role"),
        "{answer}"
    );
    assert_eq!(admin.get_run(&run).await.unwrap().state, RunState::Running);
    b.client.clone().close().await.unwrap();
}

/// A model step's text streams onto its page while the model writes it, from its beginning
/// even for a page opened in the middle; a step waiting for a signal is sent one with a JSON
/// payload from the page, and the run goes on with it.
#[tokio::test]
async fn a_model_steps_text_streams_in_and_a_signal_with_a_payload_is_sent_from_the_page() {
    use mesh_tests::fake_llm::{FakeLlm, Wire};
    const KEY: &str = "sk-test-dashboard-0123456789";
    let fake = FakeLlm::start(KEY).await;
    // Eleven chunks, 300 ms apart: the step streams for about three seconds.
    fake.knobs()
        .chunk_delay_ms
        .store(300, std::sync::atomic::Ordering::SeqCst);
    let mut mesh = Mesh::start(Timings::default()).await;
    let agents = format!(
        "{AGENTS}\n[[agents]]\nkind = \"llm\"\nmax_concurrency = 4\n\n[llm.openai]\nbase_url = \"{}\"\napi_key = \"{KEY}\"\n",
        fake.base_url(Wire::OpenAi)
    );
    mesh.start_node("n1", &agents).await;
    let b = browser(mesh.dir.path()).await;
    let c = &b.client;
    let client = mesh.client().await;

    let prompt = "one two three four five six seven eight nine ten";
    let answer = FakeLlm::answer_to(prompt);
    let run = submit(
        &client,
        &format!(
            "steps:\n  - {{id: ask, uses: llm, with: {{model: openai/writer, prompt: \"{prompt}\"}}}}\n  - id: gate\n    needs: [ask]\n    wait_for: {{signal: go, timeout: 5m}}\n  - {{id: after, uses: echo, needs: [gate], with: {{ticket: \"${{{{ steps.gate.output.ticket }}}}\"}}}}\n"
        ),
    )
    .await;
    // The page is opened once the model has begun to answer.
    wait_for("the model to begin", Duration::from_secs(20), || async {
        (fake.seen().iter().any(|s| s.stream)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    c.goto(&ui(&mesh, &format!("/ui/runs/{run}")))
        .await
        .unwrap();
    // Part of the answer, from its beginning, while the step still runs.
    let partial = wait_for(
        "part of the answer on the page",
        Duration::from_secs(20),
        || async {
            let shown = text(c, "#delta-ask").await?;
            (!shown.is_empty() && shown.len() < answer.trim_end().len()).then_some(shown)
        },
    )
    .await;
    assert!(
        answer.starts_with(partial.trim_end()),
        "the page shows the answer from its beginning: {partial:?} of {answer:?}"
    );
    let running = c
        .find_all(Locator::Css("tr.step[data-step=ask][data-state=running]"))
        .await
        .unwrap();
    assert_eq!(running.len(), 1, "the text came while the step ran");
    shot(c, "streaming").await;

    // Then the step ends and its output holds the whole answer; the run waits for `go`.
    settled_on(c, "button.signal").await;
    let output = c
        .execute(
            "const o = document.querySelector('tr.detail[data-step=ask] details.output pre');
             return o ? o.textContent : '';",
            vec![],
        )
        .await
        .unwrap();
    let output = output.as_str().unwrap_or_default();
    assert!(output.contains(answer.trim()), "{output}");
    c.find(Locator::Css("form.action input[name=name]"))
        .await
        .unwrap()
        .send_keys("go")
        .await
        .unwrap();
    c.find(Locator::Css("form.action input[name=payload]"))
        .await
        .unwrap()
        .send_keys(r#"{"ticket": 7}"#)
        .await
        .unwrap();
    shot(c, "signal").await;
    // A live update may have redrawn the page since the button was found (typed input is
    // kept across redraws): click the button the page has now.
    settled_on(c, "button.signal").await.click().await.unwrap();
    wait_text(c, "#run-state", "succeeded").await;
    let view = client.get_run(&run).await.unwrap();
    assert_eq!(view.state, RunState::Succeeded);
    let gate = view.steps.iter().find(|s| s.id.as_str() == "gate").unwrap();
    assert_eq!(gate.output, Some(json!({ "ticket": 7 })));
    let after = view
        .steps
        .iter()
        .find(|s| s.id.as_str() == "after")
        .unwrap();
    assert_eq!(after.output.as_ref().unwrap()["with"]["ticket"], json!(7));
    b.client.clone().close().await.unwrap();
}
