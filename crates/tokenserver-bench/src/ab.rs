//! Two builds side by side (`--against`): build B's tokenserver is started beside build A's on
//! the same store, and each scenario is measured on A and on B in turn, `--rounds` pairs in the
//! order A B, B A, A B, … Harness runs of two builds are minutes apart, and this machine's speed
//! drifts between them by more than most changes are worth (four A/B pairs in a row read one
//! build 8-13% ahead on host s, all of it the host: `bench/results/host-2026-12-07-s.md`);
//! seconds apart on one filled store, the drift lands on neither side.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use crate::load::ReqGen;
use crate::{measure_at, procs, Ctx, Row, Sample};

/// Makes a scenario's request generators, afresh for each run of it.
pub type Gens = Box<dyn Fn() -> Vec<ReqGen>>;

/// Which build a row was measured on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::A => "A",
            Side::B => "B",
        }
    }
}

/// The order of the two sides in pair `pair` (from 0): A first in even pairs, B first in odd
/// ones, so neither always runs just after the other.
pub fn order(pair: usize) -> [Side; 2] {
    if pair.is_multiple_of(2) {
        [Side::A, Side::B]
    } else {
        [Side::B, Side::A]
    }
}

/// Processes measured as one server, and the listeners the load goes to.
struct Target {
    /// Kept to stop the processes when the sides are dropped.
    _procs: procs::Heads,
    pids: Vec<u32>,
    addrs: Vec<SocketAddr>,
}

impl Target {
    /// tokenservers, loaded on their internal listeners (where the access and session APIs are).
    fn internal(heads: procs::Heads) -> Result<Self, String> {
        Ok(Self { pids: heads.pids(), addrs: heads.internals()?, _procs: heads })
    }
}

/// The processes a backend's scenarios are measured on: build A's, and with `--against` build
/// B's on the same store.
pub struct Sides {
    a: Target,
    b: Option<Target>,
}

impl Sides {
    /// Starts A (`--heads` processes of the harness's tokenserver with `env`), then, with
    /// `--against`, as many of B's with the same settings, logging beside `log` with `.b`.
    pub fn start(ctx: &Ctx, env: &[(String, String)], log: &Path) -> Result<Self, String> {
        let a = Target::internal(ctx.servers(env, log)?)?;
        let b = match &ctx.common.against {
            Some(bin) => {
                Some(Target::internal(procs::tokenservers(bin, env, &log.with_extension("b.log"), ctx.common.heads)?)?)
            }
            None => None,
        };
        Ok(Self { a, b })
    }

    /// Another server measured alone on its public listener (HaKr's, for comparison).
    pub fn alone(server: procs::Server) -> Self {
        let (pids, addrs) = (vec![server.child.id()], vec![server.addr]);
        Self { a: Target { _procs: procs::Heads(vec![server]), pids, addrs }, b: None }
    }

    /// A's listeners: where a store is filled before the measurements.
    pub fn a_addrs(&self) -> &[SocketAddr] {
        &self.a.addrs
    }

    fn side(&self, side: Side) -> Option<&Target> {
        match side {
            Side::A => Some(&self.a),
            Side::B => self.b.as_ref(),
        }
    }

    /// Measures one scenario: once on A, or with B `ctx.common.rounds` pairs of runs, one row
    /// each (`backend` and `scenario` label them; `hello` is the hello req/s beside them). Each
    /// run has its own request generators from `gens`. Returns the requests made in all.
    pub fn measure(
        &self,
        ctx: &Ctx,
        backend: &str,
        scenario: &str,
        hello: f64,
        gens: impl Fn() -> Vec<ReqGen>,
        rows: &mut Vec<Row>,
    ) -> Result<u64, String> {
        let runs: Vec<(Option<usize>, Side)> = match self.b {
            None => vec![(None, Side::A)],
            Some(_) => (0..ctx.common.rounds.max(1)).flat_map(|p| order(p).map(|s| (Some(p), s))).collect(),
        };
        let mut requests = 0;
        for (pair, side) in runs {
            let target = self.side(side).ok_or("no B build to measure")?;
            let (o, sample) = measure_at(&target.pids, &target.addrs, gens(), ctx)?;
            let sample = Sample { hello_rps: Some(hello), ..sample };
            let on = pair.map_or_else(String::new, |p| format!(" ({}, pair {})", side.name(), p + 1));
            eprintln!("{backend}: {scenario}{on}: {:.0} req/s", o.rps);
            requests += o.requests;
            rows.push(Row {
                backend: backend.to_string(),
                scenario: scenario.to_string(),
                outcome: o,
                sample,
                ab: pair.map(|p| (p, side)),
            });
        }
        Ok(requests)
    }
}

/// One scenario's pairs, as the summary reads them.
#[derive(Default)]
struct Pairs {
    a: Vec<(f64, Sample, f64)>,
    b: Vec<(f64, Sample, f64)>,
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// The median of sorted `v` (not empty).
fn median(v: &[f64]) -> f64 {
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// The summary of the A/B rows in `rows` (none when there are none): per backend and scenario,
/// each side's mean req/s, B's as a share of A's, in how many pairs B was ahead, and each
/// side's mean p99 and CPU per request (server, database).
pub fn summary(rows: &[Row]) -> Option<String> {
    let mut groups: Vec<((String, String), Pairs)> = Vec::new();
    for r in rows {
        let Some((pair, side)) = r.ab else { continue };
        let key = (r.backend.clone(), r.scenario.clone());
        let at = match groups.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                groups.push((key, Pairs::default()));
                groups.len() - 1
            }
        };
        let list = match side {
            Side::A => &mut groups[at].1.a,
            Side::B => &mut groups[at].1.b,
        };
        if list.len() <= pair {
            list.resize(pair + 1, (f64::NAN, r.sample, f64::NAN));
        }
        list[pair] = (r.outcome.rps, r.sample, r.outcome.p99_ms);
    }
    if groups.is_empty() {
        return None;
    }
    let mut md = String::new();
    let _ = writeln!(md, "### A against B\n");
    let _ = writeln!(
        md,
        "A is this harness's tokenserver, B the `--against` build, both up on one store and measured \
         in turn (pairs A B, B A, …). Means over the pairs; *B ahead* counts the pairs in which B \
         served more requests a second. On this shared host two runs of one build seconds apart can \
         differ by a quarter or more: read a difference against the pairs' spread.\n"
    );
    let _ = writeln!(
        md,
        "| Backend | Scenario | A req/s | B req/s | B / A | B / A by pair: median (range) | B ahead | A p99 ms | B p99 ms | A server µs/req | B server µs/req | A database µs/req | B database µs/req |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for ((backend, scenario), p) in &groups {
        let pairs = p.a.len().min(p.b.len());
        let ahead = p.a.iter().zip(&p.b).filter(|(a, b)| b.0 > a.0).count();
        let mut ratios: Vec<f64> = p.a.iter().zip(&p.b).filter(|(a, _)| a.0 > 0.0).map(|(a, b)| b.0 / a.0).collect();
        ratios.sort_by(f64::total_cmp);
        let by_pair = match (ratios.first(), ratios.last()) {
            (Some(low), Some(high)) => format!("{:.3} ({low:.2}-{high:.2})", median(&ratios)),
            _ => "-".to_string(),
        };
        let a_rps = mean(p.a.iter().map(|x| x.0));
        let b_rps = mean(p.b.iter().map(|x| x.0));
        let _ = writeln!(
            md,
            "| {backend} | {scenario} | {a_rps:.0} | {b_rps:.0} | {:.3} | {by_pair} | {ahead} of {pairs} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} |",
            if a_rps > 0.0 { b_rps / a_rps } else { f64::NAN },
            mean(p.a.iter().map(|x| x.2)),
            mean(p.b.iter().map(|x| x.2)),
            mean(p.a.iter().map(|x| x.1.cpu_us_per_req)),
            mean(p.b.iter().map(|x| x.1.cpu_us_per_req)),
            mean(p.a.iter().map(|x| x.1.db_cpu_us_per_req)),
            mean(p.b.iter().map(|x| x.1.db_cpu_us_per_req)),
        );
    }
    Some(md)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::Outcome;

    fn row(scenario: &str, pair: usize, side: Side, rps: f64, server_us: f64) -> Row {
        Row {
            backend: "sqlite".into(),
            scenario: scenario.into(),
            outcome: Outcome { rps, p99_ms: rps / 1000.0, ..Outcome::default() },
            sample: Sample {
                rss_kib: 0,
                cpu_us_per_req: server_us,
                db_cpu_us_per_req: 0.0,
                load_cpu_us_per_req: 0.0,
                hello_rps: Some(1.0),
            },
            ab: Some((pair, side)),
        }
    }

    #[test]
    fn the_median_is_the_middle_value_or_the_mean_of_the_two_middle_ones() {
        assert_eq!(median(&[1.0, 2.0, 9.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 4.0, 9.0]), 3.0);
        assert_eq!(median(&[5.0]), 5.0);
    }

    #[test]
    fn pairs_alternate_which_side_goes_first() {
        assert_eq!(order(0), [Side::A, Side::B]);
        assert_eq!(order(1), [Side::B, Side::A]);
        assert_eq!(order(2), [Side::A, Side::B]);
    }

    #[test]
    fn the_summary_compares_the_sides_pair_by_pair() {
        let rows = vec![
            row("create", 0, Side::A, 100.0, 40.0),
            row("create", 0, Side::B, 110.0, 36.0),
            row("create", 1, Side::B, 90.0, 38.0),
            row("create", 1, Side::A, 95.0, 42.0),
            row("authorize", 0, Side::A, 200.0, 20.0),
            row("authorize", 0, Side::B, 190.0, 21.0),
        ];
        let md = summary(&rows).expect("a summary");
        assert!(
            md.contains(
                "| sqlite | create | 98 | 100 | 1.026 | 1.024 (0.95-1.10) | 1 of 2 | 0.10 | 0.10 | 41.0 | 37.0 | 0.0 | 0.0 |"
            ),
            "{md}"
        );
        assert!(md.contains("| sqlite | authorize | 200 | 190 | 0.950 | 0.950 (0.95-0.95) | 0 of 1 |"), "{md}");
        // Rows measured without `--against` make no summary.
        let plain = Row { ab: None, ..row("create", 0, Side::A, 1.0, 1.0) };
        assert!(summary(&[plain]).is_none());
    }
}
