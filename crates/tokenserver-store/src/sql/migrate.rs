//! Migration bookkeeping shared by the backends, compatible with diesel's (and so with Mozilla's
//! server, which can run against a database we created and vice versa).
//!
//! * Empty database: create `__diesel_schema_migrations`, run every migration, record each version.
//! * Bookkeeping present (ours, Mozilla's, or syncstorage's rows in a shared database): run only
//!   the versions not recorded yet; rows we do not know are left alone.
//! * Mozilla's tables present but no bookkeeping (databases older than diesel): adopt them as they
//!   are and change nothing.

/// One migration: a diesel version string and its SQL (statements separated by `;`, none inside
/// literals).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Migration {
    pub version: &'static str,
    pub sql: &'static str,
}

impl Migration {
    /// The SQL statements, in order.
    pub fn statements(&self) -> impl Iterator<Item = &'static str> {
        self.sql.split(';').map(str::trim).filter(|s| !s.is_empty())
    }
}

/// What the database already holds.
#[derive(Debug, Clone, Default)]
pub(crate) struct Existing {
    /// How many of `services`, `nodes`, `users` exist.
    pub schema_tables: usize,
    /// `__diesel_schema_migrations` exists.
    pub has_bookkeeping: bool,
    /// Versions recorded in it.
    pub applied: Vec<String>,
}

/// diesel's bookkeeping table.
const BOOKKEEPING: &str = "__diesel_schema_migrations";

/// Whether `tables` (those of `services`, `nodes`, `users` and the bookkeeping present) include
/// the bookkeeping table, i.e. whether applied versions can be read.
pub(crate) fn has_bookkeeping(tables: &[String]) -> bool {
    tables.iter().any(|t| t == BOOKKEEPING)
}

impl Existing {
    /// What the tables present and the versions recorded (empty without bookkeeping) say.
    pub(crate) fn new(tables: &[String], applied: Vec<String>) -> Self {
        Self {
            schema_tables: tables.iter().filter(|t| !t.starts_with("__")).count(),
            has_bookkeeping: has_bookkeeping(tables),
            applied,
        }
    }
}

/// diesel's bookkeeping table, as diesel creates it.
pub(crate) const CREATE_BOOKKEEPING: &str = "CREATE TABLE IF NOT EXISTS __diesel_schema_migrations (\
    version VARCHAR(50) PRIMARY KEY NOT NULL, \
    run_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)";

/// The migrations to run, in order.
pub(crate) fn plan<'a>(all: &'a [Migration], existing: &Existing) -> Vec<&'a Migration> {
    if existing.schema_tables > 0 && !existing.has_bookkeeping {
        return Vec::new();
    }
    all.iter().filter(|m| !existing.applied.iter().any(|v| v == m.version)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: &[Migration] = &[Migration { version: "1", sql: "A; B" }, Migration { version: "2", sql: "C" }];

    fn versions(v: Vec<&Migration>) -> Vec<&str> {
        v.into_iter().map(|m| m.version).collect()
    }

    #[test]
    fn plans() {
        assert_eq!(versions(plan(ALL, &Existing::default())), ["1", "2"]);
        let adopted = Existing { schema_tables: 3, has_bookkeeping: false, applied: vec![] };
        assert!(plan(ALL, &adopted).is_empty());
        let partial = Existing { schema_tables: 3, has_bookkeeping: true, applied: vec!["1".into(), "x".into()] };
        assert_eq!(versions(plan(ALL, &partial)), ["2"]);
        let shared = Existing { schema_tables: 0, has_bookkeeping: true, applied: vec!["20200101".into()] };
        assert_eq!(versions(plan(ALL, &shared)), ["1", "2"]);
        assert_eq!(ALL[0].statements().collect::<Vec<_>>(), ["A", "B"]);
    }
}
