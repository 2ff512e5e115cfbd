//! Moves under crashes: the source cell, the target cell and the control
//! plane are killed (abort, as `kill -9`: no cleanup) at each step of a
//! move, then restarted. Every move must end done: the user lives at the
//! new home with their money, signed in, and the audit over both
//! datastores passes. A move undone before its cut-over leaves the user as
//! they were. The operator's CLI, the fourth participant, only watches: a
//! batch outlives it.

use anyhow::Context;
use homecell_harness::api::Api;
use homecell_harness::{Cluster, standard};
use reqwest::StatusCode;
use std::time::{Duration, Instant};

type Result<T = ()> = anyhow::Result<T>;

const PW: &str = "correct horse battery";
const SECRET: &str = "testpay-shared-secret-0123456789";

fn env(failpoint: Option<&str>) -> Vec<(String, String)> {
    failpoint
        .map(|f| vec![("HOMECELL_FAILPOINTS".to_string(), f.to_string())])
        .unwrap_or_default()
}

/// Restarts `region`'s cell with the given failpoint armed (or none).
async fn restart_cell(c: &mut Cluster, region: &str, failpoint: Option<&str>) -> Result {
    c.restart_cell_with_failpoints(region, failpoint.unwrap_or(""))
        .await
}

async fn restart_control_plane(c: &mut Cluster, failpoint: Option<&str>) -> Result {
    c.kill_control_plane();
    c.control_plane_node(0).env = env(failpoint);
    c.start_control_plane().await
}

/// Waits for the process that armed a failpoint to reach it and die.
async fn wait_exit(c: &mut Cluster, who: &str) -> Result {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let p = match who {
            "control-plane" => c.control_plane_node(0).process.as_mut(),
            region => c.cell_mut(region).and_then(|n| n.process.as_mut()),
        }
        .context("not running")?;
        if !p.is_running() {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the failpoint was never reached:\n{}",
            p.log_tail(10)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The move's journal entry, as `move status -o json` shows it.
fn status(c: &Cluster, id: &str) -> Result<serde_json::Value> {
    let out = c.cli_ok(&["-o", "json", "move", "status", id])?;
    Ok(serde_json::from_str(&out.stdout)?)
}

async fn until_state(c: &Cluster, id: &str, want: &str) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // A cancelled move is over once the source has undone it.
        if let Ok(m) = status(c, id)
            && m["state"] == want
            && (want != "cancelled" || m["undone"] == true)
        {
            return Ok(m);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "move {id} never became {want}: {:?}",
            status(c, id).ok()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A user of cn-east with 500 CNY, signed in. Retried while the router
/// still counts a just-restarted cell as down (gossip may report the killed
/// process's death after the new one is up).
async fn rich_user(api: &Api, email: &str) -> Result<(Api, String)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = async {
            let (me, login) = api.signed_in(email, PW).await?;
            let user = login["user_id"].as_str().context("user")?.to_string();
            let r = api
                .provider_deposit("testpay", SECRET, &format!("evt-{email}"), &user, 500)
                .await?;
            anyhow::ensure!(r.status.is_success(), "{r:?}");
            Ok::<_, anyhow::Error>((me, user))
        };
        match attempt.await {
            Ok(done) => return Ok(done),
            Err(e)
                if Instant::now() < deadline && format!("{e:#}").contains("cell_unavailable") =>
            {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn start_move(c: &Cluster, user: &str, to: &str) -> Result<String> {
    let out = c.cli_ok(&["-o", "json", "move", "user", user, "--to", to, "--no-wait"])?;
    let m: serde_json::Value = serde_json::from_str(&out.stdout)?;
    Ok(m["id"].as_str().context("move id")?.to_string())
}

/// The user lives at `home`, signed in with their old token, with 500 CNY.
async fn lives_at(me: &Api, home: &str, what: &str) -> Result {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = me.get("/v1/users/me").await?;
        if r.status == StatusCode::OK && r.header("x-home-region") == Some(home) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "{what}: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(me.available("CNY").await?, 500, "{what}");
    Ok(())
}

#[tokio::test]
async fn moves_finish_after_kill_9_of_any_participant_at_every_step() -> Result {
    let mut c = standard()
        .cell_config(&format!("[payments.testpay]\nsecret = {SECRET:?}\n"))
        .start()
        .await?;
    let east = Api::new(&c.router_url(0), "cn-east");
    // (who dies, at which failpoint)
    let steps = [
        ("cn-east", "move.source.after_freeze"),
        ("cn-east", "move.source.after_import"),
        ("eu-west", "move.target.after_import"),
        ("cn-east", "move.source.after_money_hold"),
        ("eu-west", "saga.participant.after_hold"),
        ("control-plane", "move.cp.after_copied"),
        ("cn-east", "move.source.before_switch"),
        ("control-plane", "move.cp.after_switched"),
        ("cn-east", "move.source.after_post"),
        ("eu-west", "saga.participant.after_post"),
        ("cn-east", "move.source.after_erase"),
        ("control-plane", "move.cp.after_done"),
    ];
    for (i, (who, failpoint)) in steps.into_iter().enumerate() {
        let (me, user) = rich_user(&east, &format!("crash{i}@example.com")).await?;
        match who {
            "control-plane" => restart_control_plane(&mut c, Some(failpoint)).await?,
            region => restart_cell(&mut c, region, Some(failpoint)).await?,
        }
        let id = start_move(&c, &user, "eu-west")?;
        wait_exit(&mut c, who).await.context(failpoint)?;
        match who {
            "control-plane" => restart_control_plane(&mut c, None).await?,
            region => restart_cell(&mut c, region, None).await?,
        }
        until_state(&c, &id, "done").await.context(failpoint)?;
        lives_at(&me, "eu-west", failpoint).await?;
        let report = c.audit(&["cn-east", "eu-west"]).context(failpoint)?;
        assert!(
            report.contains("cn-east↔eu-west CNY: clearing accounts net 0, in flight 0"),
            "{failpoint}: {report}"
        );
    }
    Ok(())
}

/// Undone before the cut-over (an operator's cancel, with the source killed
/// half-way through the undo): the user is where they were, as they were,
/// and signed in; the new home keeps nothing of them.
#[tokio::test]
async fn a_cancelled_move_leaves_the_user_as_they_were() -> Result {
    let mut c = standard()
        .cell_config(&format!("[payments.testpay]\nsecret = {SECRET:?}\n"))
        .start()
        .await?;
    let east = Api::new(&c.router_url(0), "cn-east");
    let (me, user) = rich_user(&east, "stay@example.com").await?;
    restart_cell(&mut c, "cn-east", Some("move.source.before_switch")).await?;
    let id = start_move(&c, &user, "eu-west")?;
    wait_exit(&mut c, "cn-east").await?;
    assert_eq!(status(&c, &id)?["state"], "copied");
    // Before the cut-over a cancel is taken at once: no cut-over can follow.
    let out = c.cli_ok(&["-o", "json", "move", "cancel", &id])?;
    assert!(
        out.stdout.contains("\"state\": \"cancelled\""),
        "{}",
        out.stdout
    );
    restart_cell(&mut c, "cn-east", None).await?;
    let m = until_state(&c, &id, "cancelled").await?;
    assert_eq!(m["error"], "cancelled by an operator");
    lives_at(&me, "cn-east", "after the cancel").await?;
    let report = c.audit(&["cn-east", "eu-west"])?;
    assert!(
        report.contains("cn-east↔eu-west CNY: clearing accounts net 0, in flight 0"),
        "{report}"
    );
    // Nothing of the user stayed at eu-west.
    let pool = sqlx::SqlitePool::connect(&format!(
        "sqlite:{}",
        c.cell_sqlite_path("eu-west").display()
    ))
    .await?;
    let (status,): (String,) = sqlx::query_as("SELECT status FROM users WHERE id = ?")
        .bind(&user)
        .fetch_one(&pool)
        .await?;
    assert_eq!(status, "deleted");
    let (ops,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM money_operations WHERE imported_by IS NOT NULL")
            .fetch_one(&pool)
            .await?;
    assert_eq!(ops, 0);
    // Cancelling a finished or cancelled move changes nothing.
    assert!(c.cli(&["move", "cancel", &id])?.success);
    // The user can move again.
    let again = start_move(&c, &user, "eu-west")?;
    until_state(&c, &again, "done").await?;
    lives_at(&me, "eu-west", "the second move").await?;
    Ok(())
}

/// The CLI only watches a batch: on a terminal it draws a progress bar
/// (users done, failed, rate, ETA), and killed (-9) half-way it leaves the
/// batch to run to its end.
#[tokio::test]
async fn a_batch_outlives_its_cli_which_draws_a_bar_on_a_terminal() -> Result {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let c = standard().start().await?;
    let east = Api::new(&c.router_url(0), "cn-east");
    let mut emails = Vec::new();
    for i in 0..12 {
        let email = format!("walker{i}@example.com");
        east.signed_in(&email, PW).await?;
        emails.push(email);
    }
    // `script` gives the CLI a terminal (a pty) and copies out what it draws.
    let cli = format!(
        "{} move batch --from cn-east --to eu-west --rate 1",
        c.cli_path().display()
    );
    let mut child = c
        .cli_command(std::path::Path::new("script"))
        .args(["-qefc", &cli, "/dev/null"])
        .stdout(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .context("script")?;
    let mut out = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    // A frame of the bar with a user done: "…  1/12 moved, 0 failed, 1.9/s …".
    let done_in = |screen: &str| {
        screen
            .split(" moved, ")
            .filter_map(|before| before.rsplit(' ').next()?.split('/').next()?.parse().ok())
            .max()
            .unwrap_or(0u32)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut screen = String::new();
    while done_in(&screen) == 0 {
        anyhow::ensure!(Instant::now() < deadline, "no bar drawn: {screen:?}");
        if let Ok(bytes) = rx.recv_timeout(Duration::from_millis(200)) {
            screen.push_str(&String::from_utf8_lossy(&bytes));
        }
    }
    assert!(
        screen.contains(" failed, ") && screen.contains("/s, eta "),
        "{screen:?}"
    );
    let killed = std::process::Command::new("kill")
        .args(["-9", "--", &format!("-{}", child.id())])
        .status()?;
    assert!(killed.success());
    child.wait()?;
    let pool = sqlx::SqlitePool::connect(&format!(
        "sqlite:{}",
        c.cell_sqlite_path("cn-east").display()
    ))
    .await?;
    let (left,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM users WHERE status = 'active'")
        .fetch_one(&pool)
        .await?;
    assert!(left > 0, "the batch had finished before its CLI was killed");
    // Without its CLI the batch still moves everyone.
    let deadline = Instant::now() + Duration::from_secs(90);
    for email in &emails {
        while home_of(&east, email).await? != "eu-west" {
            anyhow::ensure!(Instant::now() < deadline, "{email} was left behind");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    Ok(())
}

/// Where a user lives now, by a fresh sign-in through the router.
async fn home_of(api: &Api, email: &str) -> Result<String> {
    let l = api.login(email, PW).await?;
    anyhow::ensure!(l.status == StatusCode::OK, "{email}: {l:?}");
    Ok(l.body["home_region"].as_str().unwrap_or("").to_string())
}

/// A new home that does not answer while the user is frozen: past
/// `move.freeze_limit` the move undoes itself and the user writes again
/// at once; the undo finishes (the copy dropped) once that region is back.
#[tokio::test]
async fn a_move_to_a_region_that_does_not_answer_gives_its_user_back() -> Result {
    use reqwest::Method;
    let mut c = standard()
        .cell_config(&format!("[payments.testpay]\nsecret = {SECRET:?}\n"))
        .start()
        .await?;
    c.cli_ok(&["config", "set", "move.freeze_limit", "3s"])?;
    let east = Api::new(&c.router_url(0), "cn-east");
    let (me, user) = rich_user(&east, "stranded@example.com").await?;
    c.kill_cell("eu-west");
    let id = start_move(&c, &user, "eu-west")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let m = loop {
        let m = status(&c, &id)?;
        if m["state"] == "cancelled" {
            break m;
        }
        anyhow::ensure!(Instant::now() < deadline, "never given up: {m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        m["error"]
            .as_str()
            .is_some_and(|why| why.contains("frozen too long")),
        "{m}"
    );
    // Thawed before the new home is back: a write goes through at once.
    let started = Instant::now();
    let prefs = serde_json::json!({"preferences": [{"category": "message", "channel": "inbox", "enabled": false}]});
    let r = me
        .call(Method::PUT, "/v1/notices/preferences", Some(prefs), &[])
        .await?;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    assert!(started.elapsed() < Duration::from_secs(1), "still frozen");
    c.start_cell("eu-west").await?;
    until_state(&c, &id, "cancelled").await?;
    lives_at(&me, "cn-east", "after the undo").await?;
    assert_eq!(me.available("CNY").await?, 500);
    Ok(())
}
