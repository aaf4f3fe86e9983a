//! The statements of SubmitRun's work transaction, as [`PgStore`](super::PgStore)
//! sends them.
//!
//! They are public so that the benchmark's pgbench baseline (`bench/src/pgbench.rs`)
//! runs the very SQL the store runs, and the round-trip test can tell the
//! transition feed's reads from SubmitRun's work: a copy would drift.
//! Parameters are numbered `$n`; each constant says what they are.

// The column lists are macros so that `concat!` can splice them into the
// constants below.

// Columns of a check, as `check_from_row` reads them.
macro_rules! check_columns {
    () => {
        "check_id, thresholds, enabled, status, evaluation, runs_considered, last_run_at"
    };
}

// Columns of a transition, as `transition_from_row` reads them.
macro_rules! transition_columns {
    () => {
        "sequence, system_id, check_id, from_status, to_status, transitioned_at, evaluation"
    };
}

// The channel on which committed transitions are announced.
macro_rules! transitions_channel {
    () => {
        "vitals_transitions"
    };
}

pub(super) const CHECK_COLUMNS: &str = check_columns!();
pub(super) const TRANSITION_COLUMNS: &str = transition_columns!();

/// The channel on which committed transitions are announced (payload: sequence).
pub const TRANSITIONS_CHANNEL: &str = transitions_channel!();

/// Inserts a run (idempotent on its id) and locks its system's row, in one
/// statement: `$1` run id, `$2` system, `$3` check, `$4` status, `$5`
/// observed at, `$6` latency in µs, `$7` message. Returns `recorded_at`
/// (NULL for a run already stored) and the system's `previous` status
/// (NULL for a new system).
pub const INSERT_RUN: &str = "WITH inserted AS ( \
         INSERT INTO runs (run_id, system_id, check_id, status, observed_at, latency_us, message) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (run_id) DO NOTHING RETURNING recorded_at), \
     locked AS (SELECT status FROM systems WHERE system_id = $2 FOR UPDATE) \
     SELECT (SELECT recorded_at FROM inserted) AS recorded_at, (SELECT status FROM locked) AS previous";

/// Creates the check when it is new and reads what re-evaluating it needs:
/// `$1` system, `$2` check, `$3` default thresholds (encoded), `$4` runs
/// considered at most. One row per check of the system, ordered by check;
/// the target's row carries its newest statuses.
pub const REEVALUATE_READ: &str = concat!(
    "WITH created AS ( \
         INSERT INTO checks (system_id, check_id, thresholds) VALUES ($1, $2, $3) \
         ON CONFLICT (system_id, check_id) DO NOTHING RETURNING ",
    check_columns!(),
    "), \
     target AS ( \
         SELECT ",
    check_columns!(),
    " FROM created \
         UNION ALL SELECT ",
    check_columns!(),
    " FROM checks WHERE system_id = $1 AND check_id = $2 \
         LIMIT 1), \
     recent AS ( \
         SELECT status, observed_at, run_id FROM runs WHERE system_id = $1 AND check_id = $2 \
         ORDER BY observed_at DESC, run_id DESC LIMIT $4) \
     SELECT ",
    check_columns!(),
    ", true AS target, \
            (SELECT array_agg(status ORDER BY observed_at DESC, run_id DESC) FROM recent) AS recent_statuses, \
            (SELECT max(observed_at) FROM recent) AS recent_last \
     FROM target \
     UNION ALL \
     SELECT ",
    check_columns!(),
    ", false, NULL, NULL FROM checks WHERE system_id = $1 AND check_id <> $2 \
     ORDER BY check_id"
);

/// Writes the re-evaluated check and its system, and takes the
/// transition-sequence lock when the status changed: `$1` system, `$2`
/// check, `$3` check status, `$4` evaluation (encoded), `$5` runs
/// considered, `$6` last run at, `$7` system status, `$8` and `$10` the
/// lock's two keys, `$9` whether the status changed. Returns `evaluated_at`.
pub const REEVALUATE_WRITE: &str = "WITH updated AS ( \
         UPDATE checks SET status = $3, evaluation = $4, runs_considered = $5, last_run_at = $6, updated_at = now() \
         WHERE system_id = $1 AND check_id = $2), \
     upserted AS ( \
         INSERT INTO systems (system_id, status, evaluated_at) VALUES ($1, $7, now()) \
         ON CONFLICT (system_id) DO UPDATE SET status = excluded.status, evaluated_at = excluded.evaluated_at \
         RETURNING evaluated_at) \
     SELECT evaluated_at, \
            (SELECT count(*) FROM (SELECT pg_advisory_xact_lock($8, $10) WHERE $9) l) AS sequence_locked \
     FROM upserted";

/// Inserts a transition with the next sequence and announces it: `$1`
/// system, `$2` check, `$3` from, `$4` to, `$5` evaluation (encoded), `$6`
/// the run that caused it (or NULL).
pub const INSERT_TRANSITION: &str = concat!(
    "WITH t AS ( \
         INSERT INTO transitions (sequence, system_id, check_id, from_status, to_status, evaluation, run_id) \
         SELECT coalesce(max(sequence), 0) + 1, $1, $2, $3, $4, $5, $6 FROM transitions \
         RETURNING ",
    transition_columns!(),
    ") \
     SELECT t.*, pg_notify('",
    transitions_channel!(),
    "', t.sequence::text) FROM t"
);

/// The transitions after a sequence, of one system (`$1`) or of all (`$1`
/// NULL): `$2` the sequence, `$3` how many at most. The transition feed's
/// read and a watcher's replay.
pub const TRANSITIONS_AFTER: &str = concat!(
    "SELECT ",
    transition_columns!(),
    " FROM transitions \
     WHERE ($1::text IS NULL OR system_id = $1) AND sequence > $2 \
     ORDER BY sequence LIMIT $3"
);

#[cfg(test)]
mod tests {
    use super::*;

    /// The highest `$n` in `sql`.
    fn highest_parameter(sql: &str) -> u32 {
        sql.split('$')
            .skip(1)
            .filter_map(|rest| {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().ok()
            })
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn each_statement_numbers_the_parameters_its_documentation_lists() {
        assert_eq!(highest_parameter(INSERT_RUN), 7);
        assert_eq!(highest_parameter(REEVALUATE_READ), 4);
        assert_eq!(highest_parameter(REEVALUATE_WRITE), 10);
        assert_eq!(highest_parameter(INSERT_TRANSITION), 6);
        assert_eq!(highest_parameter(TRANSITIONS_AFTER), 3);
    }

    #[test]
    fn the_column_lists_are_spelled_out_in_the_statements_that_return_them() {
        assert_eq!(REEVALUATE_READ.matches(CHECK_COLUMNS).count(), 5);
        assert!(INSERT_TRANSITION.contains(&format!("RETURNING {TRANSITION_COLUMNS})")));
        assert!(INSERT_TRANSITION.contains(&format!("pg_notify('{TRANSITIONS_CHANNEL}'")));
        assert!(TRANSITIONS_AFTER.starts_with(&format!("SELECT {TRANSITION_COLUMNS} FROM transitions")));
    }
}
