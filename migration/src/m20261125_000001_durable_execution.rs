//! Idempotency keys, execution deadlines, step retry state, a label index,
//! and execution leases (which replica runs an execution, until when).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Executions {
    Table,
    Id,
    RequestId,
    RequestFingerprint,
    DeadlineAt,
    Owner,
    LeaseExpiresAt,
    RequestedAction,
    Status,
}

#[derive(DeriveIden)]
enum ExecutionSteps {
    Table,
    NextAttemptAt,
    ErrorKind,
    RetryBase,
}

#[derive(DeriveIden)]
enum ExecutionLabels {
    Table,
    ExecutionId,
    Key,
    Value,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // SQLite takes one column per ALTER TABLE.
        let columns = [
            (
                Executions::Table.into_iden(),
                ColumnDef::new(Executions::RequestId)
                    .string()
                    .null()
                    .to_owned(),
            ),
            (
                Executions::Table.into_iden(),
                ColumnDef::new(Executions::RequestFingerprint)
                    .text()
                    .not_null()
                    .default("")
                    .to_owned(),
            ),
            (
                Executions::Table.into_iden(),
                ColumnDef::new(Executions::DeadlineAt)
                    .timestamp_with_time_zone()
                    .null()
                    .to_owned(),
            ),
            (
                Executions::Table.into_iden(),
                ColumnDef::new(Executions::Owner).string().null().to_owned(),
            ),
            (
                Executions::Table.into_iden(),
                ColumnDef::new(Executions::LeaseExpiresAt)
                    .timestamp_with_time_zone()
                    .null()
                    .to_owned(),
            ),
            (
                Executions::Table.into_iden(),
                ColumnDef::new(Executions::RequestedAction)
                    .string()
                    .null()
                    .to_owned(),
            ),
            (
                ExecutionSteps::Table.into_iden(),
                ColumnDef::new(ExecutionSteps::NextAttemptAt)
                    .timestamp_with_time_zone()
                    .null()
                    .to_owned(),
            ),
            (
                ExecutionSteps::Table.into_iden(),
                ColumnDef::new(ExecutionSteps::ErrorKind)
                    .string()
                    .not_null()
                    .default("")
                    .to_owned(),
            ),
            (
                ExecutionSteps::Table.into_iden(),
                ColumnDef::new(ExecutionSteps::RetryBase)
                    .integer()
                    .not_null()
                    .default(0)
                    .to_owned(),
            ),
        ];
        for (table, mut column) in columns {
            manager
                .alter_table(
                    Table::alter()
                        .table(table)
                        .add_column(&mut column)
                        .to_owned(),
                )
                .await?;
        }
        manager
            .create_index(
                Index::create()
                    .name("executions_request_id")
                    .table(Executions::Table)
                    .col(Executions::RequestId)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("executions_status_lease")
                    .table(Executions::Table)
                    .col(Executions::Status)
                    .col(Executions::LeaseExpiresAt)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(ExecutionLabels::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(ExecutionLabels::ExecutionId)
                            .string()
                            .not_null(),
                    )
                    .col(ColumnDef::new(ExecutionLabels::Key).string().not_null())
                    .col(ColumnDef::new(ExecutionLabels::Value).text().not_null())
                    .primary_key(
                        Index::create()
                            .col(ExecutionLabels::ExecutionId)
                            .col(ExecutionLabels::Key),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .from(ExecutionLabels::Table, ExecutionLabels::ExecutionId)
                            .to(Executions::Table, Executions::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("execution_labels_key_value")
                    .table(ExecutionLabels::Table)
                    .col(ExecutionLabels::Key)
                    .col(ExecutionLabels::Value)
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table(ExecutionLabels::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .drop_index(
                Index::drop()
                    .name("executions_status_lease")
                    .table(Executions::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_index(
                Index::drop()
                    .name("executions_request_id")
                    .table(Executions::Table)
                    .to_owned(),
            )
            .await?;
        for (table, column) in [
            (
                Executions::Table.into_iden(),
                Executions::RequestId.into_iden(),
            ),
            (
                Executions::Table.into_iden(),
                Executions::RequestFingerprint.into_iden(),
            ),
            (
                Executions::Table.into_iden(),
                Executions::DeadlineAt.into_iden(),
            ),
            (Executions::Table.into_iden(), Executions::Owner.into_iden()),
            (
                Executions::Table.into_iden(),
                Executions::RequestedAction.into_iden(),
            ),
            (
                Executions::Table.into_iden(),
                Executions::LeaseExpiresAt.into_iden(),
            ),
            (
                ExecutionSteps::Table.into_iden(),
                ExecutionSteps::NextAttemptAt.into_iden(),
            ),
            (
                ExecutionSteps::Table.into_iden(),
                ExecutionSteps::ErrorKind.into_iden(),
            ),
            (
                ExecutionSteps::Table.into_iden(),
                ExecutionSteps::RetryBase.into_iden(),
            ),
        ] {
            manager
                .alter_table(Table::alter().table(table).drop_column(column).to_owned())
                .await?;
        }
        Ok(())
    }
}
