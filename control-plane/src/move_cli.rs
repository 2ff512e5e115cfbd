//! `control-plane move …`: the operator's side of the move journal. Every
//! command is one call to start or change a move or batch; then, unless
//! `--no-wait`, the CLI follows it to its end. The move itself runs at the
//! control plane and the cells: stopping the CLI (even with kill -9) stops
//! only the watching, and `move status` picks it up again.
//!
//! Progress goes to a bar on a terminal, else (or with `-o json`) to one
//! JSON object per line.

use crate::cli::{Connection, Output, print_json, print_pairs, print_table};
use anyhow::{Result, anyhow};
use clap::Subcommand;
use homecell_proto::control::move_service_client::MoveServiceClient;
use homecell_proto::control::*;
use serde_json::{Value, json};
use std::io::IsTerminal;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

#[derive(Debug, Subcommand)]
pub enum MoveCmd {
    /// Move one user to another region.
    User {
        user_id: String,
        #[arg(long)]
        to: String,
        /// Return once the move is journaled.
        #[arg(long)]
        no_wait: bool,
    },
    /// Move many users from one region to another, at a bounded rate.
    Batch {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        /// Only users whose default address is in this country.
        #[arg(long)]
        country: Option<String>,
        /// At most this many users.
        #[arg(long)]
        limit: Option<u32>,
        /// Moves started per second (default 10).
        #[arg(long)]
        rate: Option<u32>,
        #[arg(long)]
        no_wait: bool,
    },
    /// Drain a region (no new users) and move every user out of it; then
    /// `region retire` takes it out.
    Evacuate {
        region: String,
        #[arg(long)]
        to: String,
        #[arg(long)]
        rate: Option<u32>,
        #[arg(long)]
        no_wait: bool,
    },
    /// A move or batch by id; without one, every open move.
    Status { id: Option<String> },
    /// Undo a move (or every move of a batch) not yet past its cut-over.
    Cancel { id: String },
    /// Bring a finished move's user back (or every finished move's of a
    /// batch, up to --limit).
    Reverse {
        id: String,
        #[arg(long)]
        limit: Option<u32>,
        #[arg(long)]
        no_wait: bool,
    },
}

pub async fn run(conn: &Connection, cmd: MoveCmd) -> Result<()> {
    let channel = conn.channel().await?;
    let mut client = MoveServiceClient::new(channel.clone());
    match cmd {
        MoveCmd::User {
            user_id,
            to,
            no_wait,
        } => {
            let m = client
                .start_move(StartMoveRequest {
                    user_id,
                    to_region: to,
                })
                .await?
                .into_inner()
                .r#move
                .ok_or_else(|| anyhow!("the control plane answered no move"))?;
            follow_move(conn, &mut client, m, no_wait).await
        }
        MoveCmd::Batch {
            from,
            to,
            country,
            limit,
            rate,
            no_wait,
        } => {
            let b = start_batch(&mut client, from, to, country, limit, rate).await?;
            follow_batch(conn, &mut client, b, no_wait).await
        }
        MoveCmd::Evacuate {
            region,
            to,
            rate,
            no_wait,
        } => {
            let mut regions = region_service_client::RegionServiceClient::new(channel);
            let r = regions
                .get_region(GetRegionRequest { id: region.clone() })
                .await?
                .into_inner()
                .region
                .unwrap_or_default();
            if r.status() == RegionStatus::Active {
                regions
                    .update_region(UpdateRegionRequest {
                        id: region.clone(),
                        status: RegionStatus::Draining as i32,
                        ..Default::default()
                    })
                    .await?;
            }
            let b = start_batch(&mut client, region, to, None, None, rate).await?;
            follow_batch(conn, &mut client, b, no_wait).await
        }
        MoveCmd::Status { id: None } => {
            let moves = client
                .list_moves(ListMovesRequest {
                    open_only: true,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .moves;
            print_moves(conn.output, &moves);
            Ok(())
        }
        MoveCmd::Status { id: Some(id) } => match get_move(&mut client, &id).await? {
            Some(m) => {
                print_move(conn.output, &m);
                Ok(())
            }
            None => {
                let b = get_batch(&mut client, &id).await?;
                print_progress(conn.output, &b, None);
                Ok(())
            }
        },
        MoveCmd::Cancel { id } => match get_move(&mut client, &id).await? {
            Some(_) => {
                let m = client
                    .cancel_move(CancelMoveRequest { id })
                    .await?
                    .into_inner()
                    .r#move
                    .unwrap_or_default();
                print_move(conn.output, &m);
                Ok(())
            }
            None => {
                client
                    .cancel_batch(CancelBatchRequest { id: id.clone() })
                    .await?;
                let b = get_batch(&mut client, &id).await?;
                print_progress(conn.output, &b, None);
                Ok(())
            }
        },
        MoveCmd::Reverse { id, limit, no_wait } => {
            if get_move(&mut client, &id).await?.is_some() {
                let m = client
                    .reverse_move(ReverseMoveRequest { id })
                    .await?
                    .into_inner()
                    .r#move
                    .unwrap_or_default();
                return follow_move(conn, &mut client, m, no_wait).await;
            }
            reverse_batch(conn, &mut client, &id, limit).await
        }
    }
}

async fn start_batch(
    client: &mut MoveServiceClient<Channel>,
    from: String,
    to: String,
    country: Option<String>,
    limit: Option<u32>,
    rate: Option<u32>,
) -> Result<MoveBatch> {
    client
        .start_batch(StartBatchRequest {
            from_region: from,
            to_region: to,
            country: country.unwrap_or_default(),
            limit: limit.unwrap_or(0),
            rate_per_sec: rate.unwrap_or(0),
        })
        .await?
        .into_inner()
        .batch
        .ok_or_else(|| anyhow!("the control plane answered no batch"))
}

/// The move with this id, or None when no move has it (it may be a batch).
async fn get_move(client: &mut MoveServiceClient<Channel>, id: &str) -> Result<Option<MoveRecord>> {
    match client.get_move(GetMoveRequest { id: id.into() }).await {
        Ok(r) => Ok(r.into_inner().r#move),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
        Err(s) => Err(s.into()),
    }
}

async fn get_batch(client: &mut MoveServiceClient<Channel>, id: &str) -> Result<Progress> {
    let r = client
        .get_batch(GetBatchRequest { id: id.into() })
        .await?
        .into_inner();
    Ok(Progress {
        batch: r.batch.unwrap_or_default(),
        states: r.states.into_iter().collect(),
    })
}

/// Reverses a batch's finished moves (the users still at the new home), as
/// one move each.
async fn reverse_batch(
    conn: &Connection,
    client: &mut MoveServiceClient<Channel>,
    batch: &str,
    limit: Option<u32>,
) -> Result<()> {
    get_batch(client, batch).await?;
    let mut after = String::new();
    let mut reversed = Vec::new();
    let want = limit.unwrap_or(u32::MAX) as usize;
    'pages: loop {
        let page = client
            .list_moves(ListMovesRequest {
                batch_id: batch.into(),
                after: after.clone(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .moves;
        let Some(last) = page.last() else { break };
        after = last.id.clone();
        for m in page {
            if reversed.len() >= want {
                break 'pages;
            }
            if m.state() != MoveState::Done || !m.reverse_of.is_empty() {
                continue;
            }
            match client
                .reverse_move(ReverseMoveRequest { id: m.id.clone() })
                .await
            {
                Ok(r) => reversed.push(r.into_inner().r#move.unwrap_or_default()),
                // Reversed already, or the user moved on since.
                Err(s) if s.code() == tonic::Code::FailedPrecondition => {}
                Err(s) => return Err(s.into()),
            }
        }
    }
    match conn.output {
        Output::Json => print_json(&json!({
            "batch": batch,
            "reversals": reversed.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        })),
        Output::Table => println!("{} reversals started for batch {batch}", reversed.len()),
    }
    Ok(())
}

fn move_json(m: &MoveRecord) -> Value {
    json!({
        "id": m.id,
        "user_id": m.user_id,
        "from": m.from_region,
        "to": m.to_region,
        "state": crate::moves::state_name(m.state()),
        "cancel_requested": m.cancel_requested,
        "undone": m.undone,
        "reverse_of": m.reverse_of,
        "batch_id": m.batch_id,
        "error": m.error,
        "attempts": m.attempts,
        "created_unix_ms": m.created_unix_ms,
        "updated_unix_ms": m.updated_unix_ms,
        "switched_revision": m.switched_revision,
    })
}

fn print_move(output: Output, m: &MoveRecord) {
    match output {
        Output::Json => print_json(&move_json(m)),
        Output::Table => print_pairs(&[
            ("move", m.id.clone()),
            ("user", m.user_id.clone()),
            ("from", m.from_region.clone()),
            ("to", m.to_region.clone()),
            ("state", crate::moves::state_name(m.state()).to_string()),
            ("cancel asked", m.cancel_requested.to_string()),
            ("undone", m.undone.to_string()),
            ("reverses", m.reverse_of.clone()),
            ("batch", m.batch_id.clone()),
            ("last error", m.error.clone()),
            ("cut-over revision", m.switched_revision.to_string()),
        ]),
    }
}

fn print_moves(output: Output, moves: &[MoveRecord]) {
    match output {
        Output::Json => {
            print_json(&json!({ "moves": moves.iter().map(move_json).collect::<Vec<_>>() }))
        }
        Output::Table => print_table(
            &["MOVE", "USER", "FROM", "TO", "STATE", "LAST ERROR"],
            moves
                .iter()
                .map(|m| {
                    vec![
                        m.id.clone(),
                        m.user_id.clone(),
                        m.from_region.clone(),
                        m.to_region.clone(),
                        crate::moves::state_name(m.state()).to_string(),
                        m.error.clone(),
                    ]
                })
                .collect(),
        ),
    }
}

/// How long the CLI follows a single move before it says where it is and
/// leaves it running.
const FOLLOW_MOVE: Duration = Duration::from_secs(120);

async fn follow_move(
    conn: &Connection,
    client: &mut MoveServiceClient<Channel>,
    mut m: MoveRecord,
    no_wait: bool,
) -> Result<()> {
    let deadline = Instant::now() + FOLLOW_MOVE;
    let mut last = None;
    while !no_wait && crate::store::move_is_open(&m) && Instant::now() < deadline {
        if conn.output == Output::Json && last != Some(m.state) {
            println!("{}", move_json(&m));
            last = Some(m.state);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        m = get_move(client, &m.id).await?.unwrap_or(m);
    }
    print_move(conn.output, &m);
    if m.state() == MoveState::Cancelled && !m.error.is_empty() {
        return Err(anyhow!("the move was undone: {}", m.error));
    }
    Ok(())
}

/// A batch and how many of its moves are in each state.
struct Progress {
    batch: MoveBatch,
    states: std::collections::BTreeMap<String, u32>,
}

impl Progress {
    fn count(&self, state: &str) -> u32 {
        self.states.get(state).copied().unwrap_or(0)
    }

    fn finished(&self) -> u32 {
        self.count("done") + self.count("cancelled")
    }

    /// Every move it will start has started and ended.
    fn over(&self) -> bool {
        (self.batch.exhausted || self.batch.cancel_requested)
            && self.finished() >= self.batch.started
    }
}

/// Users done per second and the seconds left, from what the watch saw.
fn rate_and_eta(p: &Progress, since: Option<(Instant, u32)>) -> (f64, Option<u64>) {
    let Some((at, done_then)) = since else {
        return (0.0, None);
    };
    let secs = at.elapsed().as_secs_f64().max(0.001);
    let rate = f64::from(p.count("done").saturating_sub(done_then)) / secs;
    let total = if p.batch.limit != 0 && !p.batch.exhausted {
        p.batch.limit
    } else {
        p.batch.started
    };
    let left = total.saturating_sub(p.finished());
    let known_total = p.batch.exhausted || p.batch.limit != 0;
    let eta = (rate > 0.0 && known_total).then(|| (f64::from(left) / rate) as u64);
    (rate, eta)
}

fn progress_json(p: &Progress, rate: f64, eta: Option<u64>) -> Value {
    json!({
        "batch": p.batch.id,
        "from": p.batch.from_region,
        "to": p.batch.to_region,
        "started": p.batch.started,
        "done": p.count("done"),
        "failed": p.count("cancelled"),
        "in_flight": p.batch.started.saturating_sub(p.finished()),
        "exhausted": p.batch.exhausted,
        "cancelled": p.batch.cancel_requested,
        "rate_per_sec": (rate * 10.0).round() / 10.0,
        "eta_secs": eta,
    })
}

fn print_progress(output: Output, p: &Progress, rate: Option<(f64, Option<u64>)>) {
    let (rate, eta) = rate.unwrap_or((0.0, None));
    match output {
        Output::Json => println!("{}", progress_json(p, rate, eta)),
        Output::Table => print_pairs(&[
            ("batch", p.batch.id.clone()),
            ("from", p.batch.from_region.clone()),
            ("to", p.batch.to_region.clone()),
            ("started", p.batch.started.to_string()),
            ("done", p.count("done").to_string()),
            ("failed", p.count("cancelled").to_string()),
            (
                "in flight",
                p.batch.started.saturating_sub(p.finished()).to_string(),
            ),
            ("all picked", p.batch.exhausted.to_string()),
            ("cancelled", p.batch.cancel_requested.to_string()),
        ]),
    }
}

async fn follow_batch(
    conn: &Connection,
    client: &mut MoveServiceClient<Channel>,
    b: MoveBatch,
    no_wait: bool,
) -> Result<()> {
    let mut p = get_batch(client, &b.id).await?;
    if no_wait {
        print_progress(conn.output, &p, None);
        return Ok(());
    }
    let bar = (conn.output == Output::Table && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(u64::from(p.batch.limit));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} moved, {msg} [{elapsed_precise}]",
            )
            .expect("a valid template"),
        );
        bar
    });
    let since = Some((Instant::now(), p.count("done")));
    let mut last_line = Instant::now() - Duration::from_secs(10);
    loop {
        let (rate, eta) = rate_and_eta(&p, since);
        match &bar {
            Some(bar) => {
                if p.batch.exhausted || p.batch.limit == 0 {
                    bar.set_length(u64::from(p.batch.started));
                }
                bar.set_position(u64::from(p.count("done")));
                // Our ETA, not the bar's: the bar's length grows while
                // the batch is still picking users, so its own guess is
                // wrong until then.
                let eta = eta.map_or("?".to_string(), |s| format!("{s}s"));
                bar.set_message(format!(
                    "{} failed, {rate:.1}/s, eta {eta}",
                    p.count("cancelled")
                ));
            }
            None if last_line.elapsed() >= Duration::from_secs(1) => {
                println!("{}", progress_json(&p, rate, eta));
                last_line = Instant::now();
            }
            None => {}
        }
        if p.over() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        p = get_batch(client, &b.id).await?;
    }
    let (rate, eta) = rate_and_eta(&p, since);
    match bar {
        Some(bar) => {
            bar.finish();
            print_progress(Output::Table, &p, None);
        }
        None => println!("{}", progress_json(&p, rate, eta)),
    }
    Ok(())
}
