//! Schema migrations for pipelined. They run at server start, on SQLite and
//! PostgreSQL alike (JSON columns become `jsonb` on PostgreSQL).

pub use sea_orm_migration::prelude::*;

mod m20261123_000001_create_tables;
mod m20261125_000001_durable_execution;
mod m20261125_000002_audit_events;

/// Every migration, oldest first.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261123_000001_create_tables::Migration),
            Box::new(m20261125_000001_durable_execution::Migration),
            Box::new(m20261125_000002_audit_events::Migration),
        ]
    }
}
