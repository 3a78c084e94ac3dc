use sea_orm::entity::prelude::*;

/// The state of one step of one execution.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "execution_steps")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub execution_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub name: String,
    /// Position in the definition.
    pub position: i32,
    pub status: String,
    pub attempt: i32,
    pub started_at: Option<DateTimeUtc>,
    pub finished_at: Option<DateTimeUtc>,
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub output: Option<Json>,
    pub error: String,
    pub reason: String,
    pub next_attempt_at: Option<DateTimeUtc>,
    pub error_kind: String,
    /// Attempts made before the latest RetryExecution.
    pub retry_base: i32,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
