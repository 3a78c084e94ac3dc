use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Pipelines {
    Table,
    Id,
    Name,
    Version,
    Description,
    Definition,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Executions {
    Table,
    Id,
    PipelineName,
    PipelineVersion,
    Definition,
    Status,
    TriggerType,
    TriggerData,
    CorrelationId,
    Labels,
    Input,
    ExecutionData,
    ErrorMessage,
    CreatedAt,
    StartedAt,
    FinishedAt,
    LastSequence,
}

#[derive(DeriveIden)]
enum ExecutionSteps {
    Table,
    ExecutionId,
    Name,
    Position,
    Status,
    Attempt,
    StartedAt,
    FinishedAt,
    Output,
    Error,
    Reason,
}

#[derive(DeriveIden)]
enum ExecutionEvents {
    Table,
    ExecutionId,
    Sequence,
    EventType,
    Payload,
    CreatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Pipelines::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(Pipelines::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Pipelines::Name).string().not_null())
                    .col(ColumnDef::new(Pipelines::Version).big_integer().not_null())
                    .col(ColumnDef::new(Pipelines::Description).text().not_null())
                    .col(
                        ColumnDef::new(Pipelines::Definition)
                            .json_binary()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Pipelines::CreatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("pipelines_name_version")
                    .table(Pipelines::Table)
                    .col(Pipelines::Name)
                    .col(Pipelines::Version)
                    .unique()
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Executions::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(Executions::Id)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Executions::PipelineName).string().not_null())
                    .col(
                        ColumnDef::new(Executions::PipelineVersion)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Executions::Definition)
                            .json_binary()
                            .not_null(),
                    )
                    .col(ColumnDef::new(Executions::Status).string().not_null())
                    .col(ColumnDef::new(Executions::TriggerType).string().not_null())
                    .col(
                        ColumnDef::new(Executions::TriggerData)
                            .json_binary()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Executions::CorrelationId)
                            .string()
                            .not_null(),
                    )
                    .col(ColumnDef::new(Executions::Labels).json_binary().not_null())
                    .col(ColumnDef::new(Executions::Input).json_binary().not_null())
                    .col(
                        ColumnDef::new(Executions::ExecutionData)
                            .json_binary()
                            .not_null(),
                    )
                    .col(ColumnDef::new(Executions::ErrorMessage).text().not_null())
                    .col(
                        ColumnDef::new(Executions::CreatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Executions::StartedAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .col(
                        ColumnDef::new(Executions::FinishedAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .col(
                        ColumnDef::new(Executions::LastSequence)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        for (name, cols) in [
            (
                "executions_pipeline",
                vec![Executions::PipelineName, Executions::Id],
            ),
            (
                "executions_status",
                vec![Executions::Status, Executions::Id],
            ),
            ("executions_correlation", vec![Executions::CorrelationId]),
        ] {
            let mut index = Index::create();
            index.name(name).table(Executions::Table);
            for col in cols {
                index.col(col);
            }
            manager.create_index(index.to_owned()).await?;
        }

        manager
            .create_table(
                Table::create()
                    .table(ExecutionSteps::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(ExecutionSteps::ExecutionId)
                            .string()
                            .not_null(),
                    )
                    .col(ColumnDef::new(ExecutionSteps::Name).string().not_null())
                    .col(
                        ColumnDef::new(ExecutionSteps::Position)
                            .integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(ExecutionSteps::Status).string().not_null())
                    .col(ColumnDef::new(ExecutionSteps::Attempt).integer().not_null())
                    .col(
                        ColumnDef::new(ExecutionSteps::StartedAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .col(
                        ColumnDef::new(ExecutionSteps::FinishedAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .col(ColumnDef::new(ExecutionSteps::Output).json_binary().null())
                    .col(ColumnDef::new(ExecutionSteps::Error).text().not_null())
                    .col(ColumnDef::new(ExecutionSteps::Reason).text().not_null())
                    .primary_key(
                        Index::create()
                            .col(ExecutionSteps::ExecutionId)
                            .col(ExecutionSteps::Name),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .from(ExecutionSteps::Table, ExecutionSteps::ExecutionId)
                            .to(Executions::Table, Executions::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(ExecutionEvents::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(ExecutionEvents::ExecutionId)
                            .string()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(ExecutionEvents::Sequence)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(ExecutionEvents::EventType)
                            .string()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(ExecutionEvents::Payload)
                            .json_binary()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(ExecutionEvents::CreatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .primary_key(
                        Index::create()
                            .col(ExecutionEvents::ExecutionId)
                            .col(ExecutionEvents::Sequence),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .from(ExecutionEvents::Table, ExecutionEvents::ExecutionId)
                            .to(Executions::Table, Executions::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            ExecutionEvents::Table.into_iden(),
            ExecutionSteps::Table.into_iden(),
            Executions::Table.into_iden(),
            Pipelines::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
