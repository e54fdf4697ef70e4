//! What names an object and its alarm: plain data, shared by the storage, the alarms and the
//! cluster (which all sit above this module; it depends on nothing of the crate).

/// Which object: its namespace (the binding) and its id (64 hex digits).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectName {
    pub namespace: Box<str>,
    pub object_id: Box<str>,
}

impl ObjectName {
    #[must_use]
    pub fn new(namespace: &str, object_id: &str) -> Self {
        Self { namespace: namespace.into(), object_id: object_id.into() }
    }
}

/// An object's alarm, as its database keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Alarm {
    /// Seconds since the epoch.
    pub at: f64,
    /// The account billed for it (the one whose event set it).
    pub account: String,
    /// The name the object's id was made from, if known (so that `ctx.id.name` is there when
    /// the alarm wakes a hibernated object).
    pub id_name: Option<String>,
}
