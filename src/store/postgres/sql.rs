//! The statements of a write (SubmitRun, ConfigureCheck) and of the
//! transition feed, as [`PgStore`](super::PgStore) sends them.
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
        "check_id, thresholds, enabled, status, evaluation, runs_considered, last_run_at, flapping_settings, flapping"
    };
}

// Columns of a transition, as `transition_from_row` reads them.
macro_rules! transition_columns {
    () => {
        "sequence, system_id, check_id, from_status, to_status, transitioned_at, evaluation, in_maintenance, \
         flapping, caused_by, check_deleted"
    };
}

// The channel on which committed transitions are announced.
macro_rules! transitions_channel {
    () => {
        "vitals_transitions"
    };
}

// Whether a transition (written when `$when`) falls into an open
// maintenance window of system `$1`, unless it resolves (`$resolves`): read
// only for a transition.
macro_rules! maintenance_flag {
    ($when:literal, $resolves:literal) => {
        concat!(
            "CASE WHEN ",
            $when,
            "::boolean AND NOT ",
            $resolves,
            "::boolean THEN EXISTS (SELECT FROM maintenance_windows m \
             WHERE m.system_id = $1 AND m.starts_at <= now() AND m.ends_at > now()) ELSE false END"
        )
    };
}

// The non-healthy dependencies of system `$1`, joined by \x1f, when its
// status got worse (`$to` above `$from`); '' otherwise.
macro_rules! caused_by {
    ($to:literal, $from:literal) => {
        concat!(
            "CASE WHEN ",
            $to,
            "::smallint > ",
            $from,
            "::smallint THEN coalesce((SELECT string_agg(d.depends_on, E'\\x1f' ORDER BY d.depends_on COLLATE \"C\") \
             FROM system_dependencies d JOIN systems x ON x.system_id = d.depends_on \
             WHERE d.system_id = $1 AND x.status <> 1), '') ELSE '' END"
        )
    };
}

pub(super) const CHECK_COLUMNS: &str = check_columns!();
pub(super) const TRANSITION_COLUMNS: &str = transition_columns!();

/// The channel on which committed transitions are announced (payload: sequence).
pub const TRANSITIONS_CHANNEL: &str = transitions_channel!();

/// What a write reads of a system: its status and version, and every check
/// (in no order: the pipeline sorts them, which costs PostgreSQL less than a
/// sort that carries the run window along), the run window of check `$2`
/// only. No row: the system was never written; one row without a check: a
/// system without checks.
pub const LOAD_SYSTEM: &str = "SELECT s.status AS system_status, s.version, s.announced_status, \
        c.check_id, c.thresholds, c.enabled, c.status, c.evaluation, c.runs_considered, c.last_run_at, \
        c.flapping_settings, c.flapping, \
        CASE WHEN c.check_id = $2 THEN c.run_window END AS run_window \
    FROM systems s LEFT JOIN checks c ON c.system_id = s.system_id \
    WHERE s.system_id = $1";

/// Everything a write stores, in one statement that commits on its own: the
/// run (`$12`.., none when `$12` is `NULL`), the system (`$1`, status `$3`),
/// provided its version is still `$4` (`NULL`: it had no row), the check
/// (`$2`, with its flapping settings `$19` and state `$20`) and, when `$17`,
/// the transition from `$18`. Returns the time of the write, the
/// transition's sequence and the flags the statement decided for it. Fails,
/// undoing all of it, on `runs_pkey` when the run id is stored already, and
/// on `systems_stale_write` when another write of the system committed since
/// `$4` was read.
///
/// The transition's flags: `$22` flapping (decided by the caller);
/// `in_maintenance` when a maintenance window of the system is open at the
/// write's time, unless `$21` (the transition resolves an announced
/// problem); `caused_by`, when the status got worse, the system's
/// dependencies that are non-healthy. Both are read only when a transition
/// is written. A transition with neither flag is what a notifier that hides
/// flagged ones sees, so it becomes the system's `announced_status`.
///
/// The parts run in a fixed order, each reading the one before, so locks are
/// always taken in the same order: the run's key (a wait for a concurrent
/// insert of the same id holds nothing of the system yet), the system's row,
/// then the check's row and the transition counter. The transition's sequence
/// is drawn from `transition_sequence`, whose row lock the statement holds
/// until it commits: the next sequence is drawn only after this one is
/// visible, so sequences are gap-free and commit in order.
pub const WRITE_SYSTEM: &str = concat!(
    "WITH run AS ( \
        INSERT INTO runs (run_id, system_id, check_id, status, observed_at, latency_us, message, recorded_at) \
        SELECT $12::text, $1, $2, $13::smallint, $14::timestamptz, $15::bigint, $16::text, now() \
        WHERE $12::text IS NOT NULL \
        RETURNING run_id), \
    flag AS (SELECT ",
    maintenance_flag!("$17", "$21"),
    " AS in_maintenance), \
    sys AS ( \
        INSERT INTO systems AS s (system_id, status, evaluated_at, version, announced_status) \
        SELECT $1, $3, now(), 1, \
               CASE WHEN $17::boolean AND NOT $22::boolean AND NOT flag.in_maintenance THEN $3 ELSE 1 END \
        FROM flag WHERE $12::text IS NULL OR EXISTS (SELECT FROM run) \
        ON CONFLICT (system_id) DO UPDATE \
            SET status = excluded.status, evaluated_at = excluded.evaluated_at, \
                version = CASE WHEN s.version = $4 THEN s.version + 1 ELSE 0 END, \
                announced_status = CASE WHEN $17::boolean AND NOT $22::boolean \
                                             AND NOT (SELECT in_maintenance FROM flag) \
                                        THEN excluded.status ELSE s.announced_status END \
        RETURNING s.evaluated_at), \
    chk AS ( \
        INSERT INTO checks AS c \
            (system_id, check_id, thresholds, enabled, status, evaluation, runs_considered, last_run_at, \
             run_window, updated_at, flapping_settings, flapping) \
        SELECT $1, $2, $5::text, $6::boolean, $7::smallint, $8::text, $9::integer, $10::timestamptz, $11::text, \
               evaluated_at, $19::text, $20::boolean FROM sys \
        ON CONFLICT (system_id, check_id) DO UPDATE \
            SET thresholds = excluded.thresholds, enabled = excluded.enabled, status = excluded.status, \
                evaluation = excluded.evaluation, runs_considered = excluded.runs_considered, \
                last_run_at = excluded.last_run_at, run_window = excluded.run_window, \
                updated_at = excluded.updated_at, flapping_settings = excluded.flapping_settings, \
                flapping = excluded.flapping), \
    seq AS ( \
        UPDATE transition_sequence SET last = last + 1 \
        WHERE $17::boolean AND EXISTS (SELECT FROM sys) RETURNING last), \
    tr AS ( \
        INSERT INTO transitions \
            (sequence, system_id, check_id, from_status, to_status, transitioned_at, evaluation, run_id, \
             in_maintenance, flapping, caused_by) \
        SELECT seq.last, $1, $2, $18::smallint, $3, sys.evaluated_at, $8::text, $12::text, \
               flag.in_maintenance, $22::boolean, ",
    caused_by!("$3", "$18"),
    " FROM seq, sys, flag \
        RETURNING sequence, in_maintenance, caused_by), \
    notified AS (SELECT pg_notify('vitals_transitions', sequence::text) FROM tr) \
    SELECT sys.evaluated_at, tr.sequence, tr.in_maintenance, tr.caused_by, \
           (SELECT count(*) FROM notified) AS notified \
    FROM sys LEFT JOIN tr ON true"
);

/// DeleteCheck's write, in one statement that commits on its own: deletes
/// check `$2` of system `$1` and its runs, stores the system's status `$3`
/// provided its version is still `$4`, and, when `$5`, records the
/// transition from `$6` with the deleted check's evaluation `$7`
/// (`check_deleted`). `$8`: the transition resolves an announced problem
/// (see [`WRITE_SYSTEM`] for the flags). Returns what [`WRITE_SYSTEM`]
/// returns. Locks in [`WRITE_SYSTEM`]'s order: the system's row, the check's,
/// then the transition counter.
pub const REMOVE_CHECK: &str = concat!(
    "WITH flag AS (SELECT ",
    maintenance_flag!("$5", "$8"),
    " AS in_maintenance), \
    sys AS ( \
        UPDATE systems s SET status = $3, evaluated_at = now(), \
            version = CASE WHEN s.version = $4 THEN s.version + 1 ELSE 0 END, \
            announced_status = CASE WHEN $5::boolean AND NOT (SELECT in_maintenance FROM flag) \
                                    THEN $3 ELSE s.announced_status END \
        WHERE s.system_id = $1 RETURNING s.evaluated_at), \
    chk AS (DELETE FROM checks c WHERE c.system_id = $1 AND c.check_id = $2 AND EXISTS (SELECT FROM sys)), \
    gone AS (DELETE FROM runs r WHERE r.system_id = $1 AND r.check_id = $2 AND EXISTS (SELECT FROM sys)), \
    seq AS ( \
        UPDATE transition_sequence SET last = last + 1 \
        WHERE $5::boolean AND EXISTS (SELECT FROM sys) RETURNING last), \
    tr AS ( \
        INSERT INTO transitions \
            (sequence, system_id, check_id, from_status, to_status, transitioned_at, evaluation, \
             in_maintenance, caused_by, check_deleted) \
        SELECT seq.last, $1, $2, $6::smallint, $3, sys.evaluated_at, $7::text, flag.in_maintenance, ",
    caused_by!("$3", "$6"),
    ", true FROM seq, sys, flag \
        RETURNING sequence, in_maintenance, caused_by), \
    notified AS (SELECT pg_notify('vitals_transitions', sequence::text) FROM tr) \
    SELECT sys.evaluated_at, tr.sequence, tr.in_maintenance, tr.caused_by, \
           (SELECT count(*) FROM notified) AS notified \
    FROM sys LEFT JOIN tr ON true"
);

/// [`WRITE_SYSTEM`] for several systems at once, each at most once, in one
/// statement that commits on its own (see the `batch` module). Each
/// parameter is an array with an element per system, in the order of
/// [`WRITE_SYSTEM`]'s parameters (`$1` system ids .. `$11` run windows, `$12`
/// run ids .. `$16` messages; every element has a run), then `$17` the
/// status before for a system whose status changes, `NULL` for one whose
/// status does not, `$18` whether that transition resolves an announced
/// problem, `$19` whether it carries `flapping`, `$20` and `$21` the check's
/// flapping settings and state. Returns a row per system: its id, the time
/// of the write, its transition's sequence and the flags decided for it as
/// [`WRITE_SYSTEM`] decides them (read only for members with a transition).
/// Fails as a whole, writing nothing, where [`WRITE_SYSTEM`] fails for any
/// one system.
///
/// A row another session holds is waited for at most 100 ms (or the
/// session's `lock_timeout`, when shorter), not the session's
/// `lock_timeout`: the other members must not wait that long for it. Each
/// part ends before the next starts (each waits for a count of the one
/// before), so locks are taken in a fixed order: every run's key, every
/// system's row and every check's row, in system order by bytes, then the
/// counter row, held to the commit. Transitions draw their sequences from
/// one increment of the counter, in system order.
pub const WRITE_SYSTEMS: &str = "WITH input AS MATERIALIZED ( \
        SELECT * FROM unnest($1::text[], $2::text[], $3::int2[], $4::int8[], $5::text[], $6::bool[], \
            $7::int2[], $8::text[], $9::int4[], $10::timestamptz[], $11::text[], $12::text[], $13::int2[], \
            $14::timestamptz[], $15::int8[], $16::text[], $17::int2[], $18::bool[], $19::bool[], $20::text[], \
            $21::bool[]) \
        AS i(system_id, check_id, status, version, thresholds, enabled, check_status, evaluation, \
             runs_considered, last_run_at, run_window, run_id, run_status, observed_at, latency_us, message, \
             from_status, resolves, transition_flapping, flapping_settings, flapping) \
        WHERE set_config('lock_timeout', \
            CASE WHEN current_setting('lock_timeout')::interval < interval '100 ms' \
                 THEN current_setting('lock_timeout') ELSE '100ms' END, true) IS NOT NULL), \
    flag AS MATERIALIZED ( \
        SELECT f.system_id, f.in_maintenance, \
               f.from_status IS NOT NULL AND NOT f.transition_flapping AND NOT f.in_maintenance AS announced, \
               CASE WHEN f.status > f.from_status THEN coalesce(( \
                   SELECT string_agg(d.depends_on, E'\\x1f' ORDER BY d.depends_on COLLATE \"C\") \
                   FROM system_dependencies d JOIN systems x ON x.system_id = d.depends_on \
                   WHERE d.system_id = f.system_id AND x.status <> 1), '') ELSE '' END AS caused_by \
        FROM (SELECT i.system_id, i.status, i.from_status, i.transition_flapping, \
                     CASE WHEN i.from_status IS NOT NULL AND NOT i.resolves THEN EXISTS ( \
                         SELECT FROM maintenance_windows m WHERE m.system_id = i.system_id \
                         AND m.starts_at <= now() AND m.ends_at > now()) ELSE false END AS in_maintenance \
              FROM input i) f), \
    run AS ( \
        INSERT INTO runs (run_id, system_id, check_id, status, observed_at, latency_us, message, recorded_at) \
        SELECT run_id, system_id, check_id, run_status, observed_at, latency_us, message, now() \
        FROM input ORDER BY system_id COLLATE \"C\" \
        RETURNING run_id), \
    sys AS ( \
        INSERT INTO systems AS s (system_id, status, evaluated_at, version, announced_status) \
        SELECT i.system_id, i.status, now(), 1, CASE WHEN f.announced THEN i.status ELSE 1 END \
        FROM input i JOIN flag f ON f.system_id = i.system_id \
        WHERE (SELECT count(*) FROM run) = (SELECT count(*) FROM input) ORDER BY i.system_id COLLATE \"C\" \
        ON CONFLICT (system_id) DO UPDATE \
            SET status = excluded.status, evaluated_at = excluded.evaluated_at, \
                version = CASE WHEN s.version = \
                    (SELECT i.version FROM input i WHERE i.system_id = s.system_id) \
                    THEN s.version + 1 ELSE 0 END, \
                announced_status = CASE WHEN (SELECT f.announced FROM flag f WHERE f.system_id = s.system_id) \
                    THEN excluded.status ELSE s.announced_status END \
        RETURNING s.system_id, s.evaluated_at), \
    chk AS ( \
        INSERT INTO checks AS c \
            (system_id, check_id, thresholds, enabled, status, evaluation, runs_considered, last_run_at, \
             run_window, updated_at, flapping_settings, flapping) \
        SELECT i.system_id, i.check_id, i.thresholds, i.enabled, i.check_status, i.evaluation, \
               i.runs_considered, i.last_run_at, i.run_window, w.evaluated_at, i.flapping_settings, i.flapping \
        FROM input i JOIN (SELECT max(evaluated_at) AS evaluated_at, count(*) AS written FROM sys) w \
            ON w.written = (SELECT count(*) FROM input) \
        ORDER BY i.system_id COLLATE \"C\" \
        ON CONFLICT (system_id, check_id) DO UPDATE \
            SET thresholds = excluded.thresholds, enabled = excluded.enabled, status = excluded.status, \
                evaluation = excluded.evaluation, runs_considered = excluded.runs_considered, \
                last_run_at = excluded.last_run_at, run_window = excluded.run_window, \
                updated_at = excluded.updated_at, flapping_settings = excluded.flapping_settings, \
                flapping = excluded.flapping \
        RETURNING c.system_id), \
    changed AS ( \
        SELECT i.system_id, i.check_id, i.from_status, i.status, i.evaluation, i.run_id, \
               f.in_maintenance, i.transition_flapping, f.caused_by, \
               row_number() OVER (ORDER BY i.system_id COLLATE \"C\") AS n, count(*) OVER () AS how_many \
        FROM input i JOIN flag f ON f.system_id = i.system_id WHERE i.from_status IS NOT NULL), \
    seq AS ( \
        UPDATE transition_sequence SET last = last + (SELECT count(*) FROM changed) \
        WHERE EXISTS (SELECT FROM changed) AND (SELECT count(*) FROM chk) = (SELECT count(*) FROM input) \
        RETURNING last), \
    tr AS ( \
        INSERT INTO transitions \
            (sequence, system_id, check_id, from_status, to_status, transitioned_at, evaluation, run_id, \
             in_maintenance, flapping, caused_by) \
        SELECT seq.last - t.how_many + t.n, t.system_id, t.check_id, t.from_status, t.status, \
               sys.evaluated_at, t.evaluation, t.run_id, t.in_maintenance, t.transition_flapping, t.caused_by \
        FROM changed t JOIN sys ON sys.system_id = t.system_id CROSS JOIN seq \
        ORDER BY t.n \
        RETURNING system_id, sequence, in_maintenance, caused_by), \
    notified AS (SELECT pg_notify('vitals_transitions', sequence::text) FROM tr) \
    SELECT sys.system_id, sys.evaluated_at, tr.sequence, tr.in_maintenance, tr.caused_by, \
           (SELECT count(*) FROM notified) AS notified \
    FROM sys LEFT JOIN tr ON tr.system_id = sys.system_id";

/// The transitions of all systems after a sequence: `$1` NULL, `$2` the
/// sequence, `$3` how many at most. The transition feed's read (and a
/// watcher's replay of all systems).
pub const TRANSITIONS_AFTER: &str = concat!(
    "SELECT ",
    transition_columns!(),
    " FROM transitions \
     WHERE $1::text IS NULL AND sequence > $2 \
     ORDER BY sequence LIMIT $3"
);

/// The transitions of system `$1` after sequence `$2`, `$3` at most: a
/// watcher's replay of one system, through the system's index.
pub const TRANSITIONS_AFTER_OF_SYSTEM: &str = concat!(
    "SELECT ",
    transition_columns!(),
    " FROM transitions \
     WHERE system_id = $1 AND sequence > $2 \
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
        assert_eq!(highest_parameter(LOAD_SYSTEM), 2);
        assert_eq!(highest_parameter(WRITE_SYSTEM), 22);
        assert_eq!(highest_parameter(WRITE_SYSTEMS), 21);
        assert_eq!(highest_parameter(REMOVE_CHECK), 8);
        assert_eq!(highest_parameter(TRANSITIONS_AFTER), 3);
        assert_eq!(highest_parameter(TRANSITIONS_AFTER_OF_SYSTEM), 3);
    }

    /// The text of `sql` from `start` to the next `end` after it.
    fn clause<'a>(sql: &'a str, start: &str, end: &str) -> &'a str {
        let from = sql.find(start).unwrap_or_else(|| panic!("{start:?} missing"));
        let rest = &sql[from..];
        let to = rest
            .find(end)
            .unwrap_or_else(|| panic!("{end:?} missing after {start:?}"));
        &rest[..to]
    }

    #[test]
    fn a_group_write_stores_the_same_columns_the_same_way_as_a_write_alone() {
        for (start, end) in [
            ("INSERT INTO runs (", ")"),
            ("INSERT INTO systems AS s (", ")"),
            ("INSERT INTO checks AS c", ")"),
            (
                "ON CONFLICT (system_id, check_id) DO UPDATE",
                "updated_at = excluded.updated_at",
            ),
            ("INSERT INTO transitions", ")"),
            ("notified AS (", ")"),
        ] {
            assert_eq!(
                clause(WRITE_SYSTEMS, start, end),
                clause(WRITE_SYSTEM, start, end),
                "{start}"
            );
        }
    }

    #[test]
    fn the_column_lists_are_spelled_out_in_the_statements_that_return_them() {
        for column in CHECK_COLUMNS.split(", ") {
            assert!(LOAD_SYSTEM.contains(&format!("c.{column}")), "{column}");
        }
        assert!(WRITE_SYSTEM.contains(&format!("pg_notify('{TRANSITIONS_CHANNEL}'")));
        assert!(WRITE_SYSTEMS.contains(&format!("pg_notify('{TRANSITIONS_CHANNEL}'")));
        for statement in [TRANSITIONS_AFTER, TRANSITIONS_AFTER_OF_SYSTEM] {
            assert!(statement.starts_with(&format!("SELECT {TRANSITION_COLUMNS} FROM transitions")));
        }
    }
}
