//! How many round trips to PostgreSQL a SubmitRun costs, counted on the
//! wire: vitals talks to the test database through a counting [`Proxy`], and
//! the test fails when a SubmitRun needs more round trips than it does today,
//! in all or before its reply.
//!
//! Requests are sent one at a time, and after each the test waits until
//! vitals is quiet (the system's lock released in PostgreSQL, every work
//! connection back from its release ping, nothing in flight), so each
//! request's round trips fall into its own window. Background work can
//! still land in a window: the lock session's heartbeat while a slow request
//! holds its lock, a new pooled connection preparing its statements. Such
//! noise only adds to some windows, while a round trip SubmitRun itself
//! gains adds to every one, so the smallest count of each kind is what is
//! compared with today's figure. Not counted at all: the transition feed's
//! reads (one per transition however many requests or watchers, not part of
//! a SubmitRun) and the pool's ping of a connection idle for a second or
//! more before it is used (a matter of the machine's speed). The readiness
//! probe and the listening connection have pools of their own.

use std::time::Instant;

use sqlx::PgConnection;
use vitals::{proto, store::postgres::sql::TRANSITIONS_AFTER};

use crate::{
    harness::{PATIENCE, TestApp, TestDb, eventually, until_count},
    proxy::{Proxy, Trip, Wire, url_addr, url_via_plain},
};

/// Round trips of a SubmitRun that changes nothing: the system's lock
/// granted and released on a lock session (2), and on a work connection the
/// load and the write, each committing on its own, and sqlx's ping when the
/// connection goes back to the pool (3). docs/PERFORMANCE.md, "Round trips
/// to PostgreSQL per request".
const ROUND_TRIPS: usize = 5;
/// Of those, before the reply: all but the lock's release and the ping.
const BEFORE_REPLY: usize = 3;
/// A SubmitRun that writes a transition writes it in the same statement.
const ROUND_TRIPS_WITH_TRANSITION: usize = 5;
const BEFORE_REPLY_WITH_TRANSITION: usize = 3;

/// Measured requests; half of them write a transition.
const REQUESTS: usize = 24;

/// What one SubmitRun cost.
#[derive(Debug)]
struct Window {
    transition: bool,
    /// The round trips counted: from the request to the quiet after it.
    trips: Vec<Counted>,
}

#[derive(Debug)]
struct Counted {
    trip: Trip,
    before_reply: bool,
}

impl Window {
    fn total(&self) -> usize {
        self.trips.len()
    }

    /// Round trips that ended before the reply arrived and ran a statement.
    /// A ping is never what a reply waits for: sqlx pings a connection
    /// after the request gave it back.
    fn before_reply(&self) -> usize {
        self.trips
            .iter()
            .filter(|c| c.before_reply && !c.trip.is_ping())
            .count()
    }

    fn describe(&self) -> String {
        let trips: Vec<String> = self
            .trips
            .iter()
            .map(|c| {
                let what = if c.trip.is_ping() {
                    "ping".to_owned()
                } else if c.trip.statements.is_empty() {
                    "prepare".to_owned()
                } else {
                    c.trip
                        .statements
                        .iter()
                        .map(|s| s.chars().take(60).collect::<String>())
                        .collect::<Vec<_>>()
                        .join(" + ")
                };
                let when = if c.before_reply { "before reply" } else { "after reply" };
                format!("    {} #{} {when}: {what}", c.trip.app, c.trip.conn)
            })
            .collect();
        format!(
            "  {} ({} round trips, {} before the reply):\n{}",
            if self.transition {
                "with a transition"
            } else {
                "no transition"
            },
            self.total(),
            self.before_reply(),
            trips.join("\n")
        )
    }
}

/// Waits until vitals has finished with the last request: no advisory lock
/// held in the database (the system's lock released), nothing in flight on
/// the wire, and every work connection pinged since its last statement
/// (sqlx pings each connection given back to the pool; until then the
/// request is not over). Fails after [`PATIENCE`].
async fn quiet(wire: &Wire, conn: &mut PgConnection) {
    until_count(
        conn,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        0,
        "the system's lock is released in PostgreSQL",
    )
    .await;
    eventually(PATIENCE, "vitals is quiet", async || {
        if wire.in_flight() == 0 && wire.all_pinged("vitals-work") {
            Ok(())
        } else {
            Err(format!(
                "the last round trips: {:#?}",
                wire.trips().iter().rev().take(20).collect::<Vec<_>>()
            ))
        }
    })
    .await;
}

/// The round trips of `trips[from..]` a SubmitRun answered at `replied`
/// caused (see the module's documentation for what is left out).
fn window(all: &[Trip], from: usize, replied: Instant, transition: bool) -> Window {
    let previous_on = |i: usize| all[..i].iter().rev().find(|t| t.conn == all[i].conn);
    let mut trips = Vec::new();
    for (i, trip) in all.iter().enumerate().skip(from) {
        if trip.app != "vitals-work" && trip.app != "vitals-lock" {
            continue;
        }
        // A ping belongs to what ran before it on its connection.
        let owner = if trip.is_ping() { previous_on(i) } else { Some(trip) };
        let Some(owner) = owner else { continue };
        let idle_check = trip.is_ping() && owner.is_ping();
        let feed = owner.statements.iter().any(|s| s == TRANSITIONS_AFTER);
        if idle_check || feed {
            continue;
        }
        trips.push(Counted {
            trip: trip.clone(),
            before_reply: trip.ended <= replied,
        });
    }
    Window { transition, trips }
}

/// A check that alternates: healthy, a blip (no change), a second failure
/// (degraded: a transition), healthy again (a transition), with the default
/// thresholds.
fn run(i: usize) -> proto::SubmitRunRequest {
    let failing = matches!(i % 4, 1 | 2);
    proto::SubmitRunRequest {
        run_id: format!("run-{i}"),
        system_id: "checkout".into(),
        check_id: "http".into(),
        status: if failing {
            proto::HealthStatus::Unhealthy
        } else {
            proto::HealthStatus::Healthy
        } as i32,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_submit_run_costs_no_more_round_trips_to_postgresql_than_today() {
    let db = TestDb::postgres().await;
    let proxy = Proxy::start_counting(url_addr(&db.url)).await;
    let wire = proxy.wire.clone().unwrap();
    let app = TestApp::start_unready(&url_via_plain(&db.url, proxy.addr), &[]).await;
    app.wait_serving("").await;
    let mut client = app.health_client().await;
    let mut direct = db.connect().await;

    // Warm-up: the system and its check exist, and the connections in use
    // have prepared every statement of both kinds of request.
    for i in 0..8 {
        client.submit_run(run(i)).await.unwrap();
        quiet(&wire, &mut direct).await;
    }

    let mut marks = Vec::new();
    for i in 8..8 + REQUESTS {
        let from = wire.trips().len();
        let reply = client.submit_run(run(i)).await.unwrap().into_inner();
        let replied = Instant::now();
        quiet(&wire, &mut direct).await;
        marks.push((from, wire.trips().len(), replied, reply.transition.is_some()));
    }
    let all = wire.trips();
    let windows: Vec<Window> = marks
        .iter()
        .map(|&(from, to, replied, transition)| window(&all[..to], from, replied, transition))
        .collect();
    let report = windows.iter().map(Window::describe).collect::<Vec<_>>().join("\n");

    for w in &windows {
        // The proxy is on vitals' path and reads both pools' statements.
        for app in ["vitals-lock", "vitals-work"] {
            assert!(
                w.trips
                    .iter()
                    .any(|c| c.before_reply && c.trip.app == app && !c.trip.is_ping()),
                "no {app} statement before the reply:\n{report}"
            );
        }
    }
    for (transition, total, before_reply) in [
        (false, ROUND_TRIPS, BEFORE_REPLY),
        (true, ROUND_TRIPS_WITH_TRANSITION, BEFORE_REPLY_WITH_TRANSITION),
    ] {
        let kind: Vec<&Window> = windows.iter().filter(|w| w.transition == transition).collect();
        assert_eq!(kind.len(), REQUESTS / 2, "transition {transition}:\n{report}");
        let least_total = kind.iter().map(|w| w.total()).min().unwrap();
        let least_before_reply = kind.iter().map(|w| w.before_reply()).min().unwrap();
        assert!(
            least_total <= total,
            "a SubmitRun (transition: {transition}) costs {least_total} round trips to PostgreSQL, \
             more than the {total} of docs/PERFORMANCE.md:\n{report}"
        );
        assert!(
            least_before_reply <= before_reply,
            "a SubmitRun (transition: {transition}) waits for {least_before_reply} round trips to PostgreSQL \
             before its reply, more than the {before_reply} of docs/PERFORMANCE.md:\n{report}"
        );
    }
    app.stop().await;
}
