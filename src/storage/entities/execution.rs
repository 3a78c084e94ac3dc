use sea_orm::entity::prelude::*;

/// One execution; its steps and events live in their own tables.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "executions")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub pipeline_name: String,
    pub pipeline_version: i64,
    /// The `PipelineSpec` this execution runs, as JSON.
    #[sea_orm(column_type = "JsonBinary")]
    pub definition: Json,
    pub status: String,
    pub trigger_type: String,
    #[sea_orm(column_type = "JsonBinary")]
    pub trigger_data: Json,
    pub correlation_id: String,
    #[sea_orm(column_type = "JsonBinary")]
    pub labels: Json,
    #[sea_orm(column_type = "JsonBinary")]
    pub input: Json,
    #[sea_orm(column_type = "JsonBinary")]
    pub execution_data: Json,
    pub error_message: String,
    pub created_at: DateTimeUtc,
    pub started_at: Option<DateTimeUtc>,
    pub finished_at: Option<DateTimeUtc>,
    pub last_sequence: i64,
    pub request_id: Option<String>,
    pub request_fingerprint: String,
    pub deadline_at: Option<DateTimeUtc>,
    /// The replica running this execution, while its lease lasts.
    pub owner: Option<String>,
    pub lease_expires_at: Option<DateTimeUtc>,
    /// A cancel, pause or resume another replica asked of the owner.
    pub requested_action: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
