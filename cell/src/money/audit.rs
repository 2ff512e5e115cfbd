//! The ledger audit: proves from the datastores themselves that no money was
//! created or lost.
//!
//! Per cell, inside one read snapshot: debits equal credits (posted and
//! pending), every account's stored balance equals the sum of its
//! transfers, no wallet is negative, and no finished operation left a hold
//! open. Across the cells given: each pair of clearing accounts nets to the
//! money in flight between them, and the money in wallets plus in flight
//! equals deposits minus withdrawals plus operator adjustments.
//!
//! The cross-cell checks read the cells one after another, so they are
//! exact when no cross-cell transfer is moving (after a drain, or in a
//! test); the per-cell checks are exact at any moment.

use super::ledger::LedgerResult;
use crate::db::Datastore;
use crate::db::stmt;
use std::collections::{BTreeMap, HashMap};

/// The four balance columns of an account.
type Cols = [i64; 4];
const DPEND: usize = 0;
const DPOST: usize = 1;
const CPEND: usize = 2;
const CPOST: usize = 3;

struct AccountRow {
    id: String,
    kind: String,
    owner: Option<String>,
    currency: String,
    cols: Cols,
}

struct CellLedger {
    region: String,
    accounts: Vec<AccountRow>,
    recomputed: HashMap<String, Cols>,
    open_holds_of_finished_ops: Vec<String>,
    /// Coordinator transfers past the commit point whose receiver has not
    /// been confirmed: (id, peer, currency, amount).
    unconfirmed: Vec<(String, String, String, i64)>,
}

/// What the audit checked, line by line.
#[derive(Debug, Default)]
pub struct Report {
    pub lines: Vec<(bool, String)>,
}

impl Report {
    fn check(&mut self, ok: bool, line: String) {
        self.lines.push((ok, line));
    }

    pub fn passed(&self) -> bool {
        self.lines.iter().all(|(ok, _)| *ok)
    }

    pub fn render(&self) -> String {
        self.lines
            .iter()
            .map(|(ok, l)| format!("{}  {l}\n", if *ok { "ok  " } else { "FAIL" }))
            .collect()
    }
}

async fn snapshot(db: &Datastore) -> LedgerResult<CellLedger> {
    let accounts_sql = "SELECT id, kind, owner, currency, debits_pending, debits_posted, credits_pending, credits_posted FROM ledger_accounts ORDER BY id";
    let sums_sql = "SELECT debit_account, credit_account, phase, CAST(SUM(amount) AS BIGINT) FROM ledger_transfers GROUP BY debit_account, credit_account, phase";
    let open_sql = "SELECT t.id FROM ledger_transfers t JOIN money_operations o ON o.id = t.operation_id \
                    WHERE t.phase = 'pending' AND (o.saga_step = 'done' OR (o.saga_step IS NULL AND o.state IN ('posted', 'voided'))) \
                    AND NOT EXISTS (SELECT 1 FROM ledger_transfers r WHERE r.pending_id = t.id)";
    let unconfirmed_sql = "SELECT id, peer_region, currency, amount FROM money_operations WHERE saga_role = 'coordinator' AND saga_step = 'post_peer'";
    type AccountTuple = (String, String, Option<String>, String, i64, i64, i64, i64);
    type Quad = (String, String, String, i64);
    type Snapshot = (String, Vec<AccountTuple>, Vec<Quad>, Vec<String>, Vec<Quad>);
    let (region, accounts, sums, open, unconfirmed): Snapshot = {
        let mut tx = db.begin_snapshot().await?;
        let region = stmt("SELECT value FROM cell_info WHERE key = 'region'")
            .scalar(&mut tx)
            .await?;
        let a = stmt(accounts_sql).fetch_all(&mut tx).await?;
        let s = stmt(sums_sql).fetch_all(&mut tx).await?;
        let o = stmt(open_sql).scalars(&mut tx).await?;
        let u = stmt(unconfirmed_sql).fetch_all(&mut tx).await?;
        (region, a, s, o, u)
    };
    let mut recomputed: HashMap<String, Cols> = HashMap::new();
    for (debit, credit, phase, sum) in sums {
        let (d, c) = match phase.as_str() {
            "single" => ([0, sum, 0, 0], [0, 0, 0, sum]),
            "pending" => ([sum, 0, 0, 0], [0, 0, sum, 0]),
            "post" => ([-sum, sum, 0, 0], [0, 0, -sum, sum]),
            _ => ([-sum, 0, 0, 0], [0, 0, -sum, 0]),
        };
        for (account, delta) in [(debit, d), (credit, c)] {
            let e = recomputed.entry(account).or_default();
            for i in 0..4 {
                e[i] += delta[i];
            }
        }
    }
    Ok(CellLedger {
        region,
        accounts: accounts
            .into_iter()
            .map(|(id, kind, owner, currency, a, b, c, d)| AccountRow {
                id,
                kind,
                owner,
                currency,
                cols: [a, b, c, d],
            })
            .collect(),
        recomputed,
        open_holds_of_finished_ops: open,
        unconfirmed,
    })
}

fn check_cell(r: &mut Report, c: &CellLedger) {
    let sum = |i: usize| -> i128 { c.accounts.iter().map(|a| i128::from(a.cols[i])).sum() };
    let (dpost, cpost, dpend, cpend) = (sum(DPOST), sum(CPOST), sum(DPEND), sum(CPEND));
    r.check(
        dpost == cpost && dpend == cpend,
        format!(
            "{}: ledger sums to zero over {} accounts (posted {dpost} = {cpost}, pending {dpend} = {cpend})",
            c.region,
            c.accounts.len()
        ),
    );
    let mismatched: Vec<&str> = c
        .accounts
        .iter()
        .filter(|a| c.recomputed.get(&a.id).copied().unwrap_or_default() != a.cols)
        .map(|a| a.id.as_str())
        .collect();
    let known: std::collections::HashSet<&str> = c.accounts.iter().map(|a| a.id.as_str()).collect();
    let unknown = c
        .recomputed
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .count();
    r.check(
        mismatched.is_empty() && unknown == 0,
        format!(
            "{}: every balance equals the sum of its transfers{}",
            c.region,
            if mismatched.is_empty() {
                String::new()
            } else {
                format!(" — differs: {}", mismatched.join(", "))
            }
        ),
    );
    let negative: Vec<&str> = c
        .accounts
        .iter()
        .filter(|a| a.kind == "wallet" && a.cols[CPOST] - a.cols[DPOST] - a.cols[DPEND] < 0)
        .map(|a| a.id.as_str())
        .collect();
    r.check(
        negative.is_empty(),
        format!(
            "{}: no wallet below zero{}",
            c.region,
            if negative.is_empty() {
                String::new()
            } else {
                format!(" — negative: {}", negative.join(", "))
            }
        ),
    );
    r.check(
        c.open_holds_of_finished_ops.is_empty(),
        format!(
            "{}: no finished operation left a hold open{}",
            c.region,
            if c.open_holds_of_finished_ops.is_empty() {
                String::new()
            } else {
                format!(" — open: {}", c.open_holds_of_finished_ops.join(", "))
            }
        ),
    );
}

/// Net posted balance (credits − debits) of `region`'s clearing account
/// for `peer` in `currency`.
fn clearing_net(c: &CellLedger, peer: &str, currency: &str) -> i128 {
    c.accounts
        .iter()
        .filter(|a| {
            a.kind == "clearing" && a.owner.as_deref() == Some(peer) && a.currency == currency
        })
        .map(|a| i128::from(a.cols[CPOST]) - i128::from(a.cols[DPOST]))
        .sum()
}

/// Audits the given cells' datastores; the cross-cell checks cover the
/// pairs whose both cells are given.
pub async fn audit(stores: &[Datastore]) -> LedgerResult<Report> {
    let mut cells = Vec::new();
    for db in stores {
        cells.push((snapshot(db).await?, db));
    }
    let mut r = Report::default();
    for (c, _) in &cells {
        check_cell(&mut r, c);
    }
    // Money past the sender's commit point, not yet posted at the receiver:
    // (from, to, currency) → amount.
    let mut in_flight: BTreeMap<(String, String, String), i128> = BTreeMap::new();
    for (c, _) in &cells {
        for (id, peer, currency, amount) in &c.unconfirmed {
            let Some((_, peer_db)) = cells.iter().find(|(p, _)| &p.region == peer) else {
                continue;
            };
            let posted_there = super::ledger::Ledger::per_statement((*peer_db).clone())
                .operation(id)
                .await?
                .is_some_and(|o| o.state == "posted");
            if !posted_there {
                *in_flight
                    .entry((c.region.clone(), peer.clone(), currency.clone()))
                    .or_default() += i128::from(*amount);
            }
        }
    }
    for (i, (a, _)) in cells.iter().enumerate() {
        for (b, _) in &cells[i + 1..] {
            let currencies: std::collections::BTreeSet<&str> = a
                .accounts
                .iter()
                .chain(&b.accounts)
                .filter(|x| x.kind == "clearing")
                .map(|x| x.currency.as_str())
                .collect();
            for cur in currencies {
                let net = clearing_net(a, &b.region, cur) + clearing_net(b, &a.region, cur);
                let flying = |from: &str, to: &str| {
                    in_flight
                        .get(&(from.to_string(), to.to_string(), cur.to_string()))
                        .copied()
                        .unwrap_or(0)
                };
                let expected = flying(&a.region, &b.region) + flying(&b.region, &a.region);
                r.check(
                    net == expected,
                    format!(
                        "{}↔{} {cur}: clearing accounts net {net}, in flight {expected}",
                        a.region, b.region
                    ),
                );
            }
        }
    }
    let mut totals: BTreeMap<&str, [i128; 5]> = BTreeMap::new();
    for (c, _) in &cells {
        for a in &c.accounts {
            let t = totals.entry(a.currency.as_str()).or_default();
            let net_out = i128::from(a.cols[DPOST]) - i128::from(a.cols[CPOST]);
            match a.kind.as_str() {
                "wallet" => t[0] -= net_out,
                "deposits" => t[1] += net_out,
                "withdrawals" => t[2] -= net_out,
                "adjustments" => t[3] += net_out,
                "fees" => t[2] -= net_out,
                // Money owed to a cell outside this audit is outside it too.
                "clearing"
                    if !cells
                        .iter()
                        .any(|(p, _)| Some(p.region.as_str()) == a.owner.as_deref()) =>
                {
                    t[4] -= net_out
                }
                _ => {}
            }
        }
    }
    for ((_, _, cur), amount) in &in_flight {
        totals.entry(cur.as_str()).or_default()[4] += amount;
    }
    for (cur, [wallets, deposits, withdrawals, adjustments, flying]) in totals {
        r.check(
            wallets + flying == deposits - withdrawals + adjustments,
            format!(
                "{cur}: wallets {wallets} + in flight or with cells not audited {flying} = deposits {deposits} − withdrawals and fees {withdrawals} + adjustments {adjustments}"
            ),
        );
    }
    Ok(r)
}
