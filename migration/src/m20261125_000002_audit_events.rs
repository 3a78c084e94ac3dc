//! The audit trail: who called which mutating RPC on what, when, and how it
//! ended.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum AuditEvents {
    Table,
    Id,
    Time,
    Caller,
    Role,
    Method,
    Target,
    RequestId,
    Code,
    Message,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(AuditEvents::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(AuditEvents::Id)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(AuditEvents::Time)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(ColumnDef::new(AuditEvents::Caller).string().not_null())
                    .col(ColumnDef::new(AuditEvents::Role).string().not_null())
                    .col(ColumnDef::new(AuditEvents::Method).string().not_null())
                    .col(ColumnDef::new(AuditEvents::Target).text().not_null())
                    .col(ColumnDef::new(AuditEvents::RequestId).string().not_null())
                    .col(ColumnDef::new(AuditEvents::Code).string().not_null())
                    .col(ColumnDef::new(AuditEvents::Message).text().not_null())
                    .to_owned(),
            )
            .await?;
        for (name, column) in [
            ("audit_events_caller", AuditEvents::Caller),
            ("audit_events_target", AuditEvents::Target),
        ] {
            manager
                .create_index(
                    Index::create()
                        .name(name)
                        .table(AuditEvents::Table)
                        .col(column)
                        .col(AuditEvents::Id)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table(AuditEvents::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}
