use sea_orm::entity::prelude::*;

/// One call in the audit trail.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "audit_events")]
pub struct Model {
    /// A UUIDv7, so ids sort by time.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub time: DateTimeUtc,
    pub caller: String,
    pub role: String,
    pub method: String,
    #[sea_orm(column_type = "Text")]
    pub target: String,
    pub request_id: String,
    pub code: String,
    #[sea_orm(column_type = "Text")]
    pub message: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
