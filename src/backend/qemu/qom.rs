//! Small typed helpers over QMP's `qom-list` and `qom-get`.

use crate::backend::qemu::qmp::{Qmp, QmpError};
use serde_json::{json, Value};

/// One property of a QOM object, as `qom-list` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Property {
    /// Its name (`hostbus`, `xhci.0`, `device[3]`).
    pub name: String,
    /// Its type (`uint32`, `child<usb-host>`, `link<bus>`).
    pub type_name: String,
}

/// A child object (`child<T>` property) of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Child {
    /// Its name in the container (the device id in `/machine/peripheral`).
    pub name: String,
    /// Its full QOM path.
    pub path: String,
    /// Its type (`T` of `child<T>`).
    pub type_name: String,
}

/// Every property of the object at `path`.
pub async fn list(qmp: &Qmp, path: &str) -> Result<Vec<Property>, QmpError> {
    let reply = qmp.execute("qom-list", Some(list_arguments(path))).await?;
    Ok(properties(&reply))
}

/// The arguments of a `qom-list` of `path` (to send in a batch).
pub fn list_arguments(path: &str) -> Value {
    json!({ "path": path })
}

/// The properties in a `qom-list` reply.
pub fn properties(reply: &Value) -> Vec<Property> {
    reply
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|p| {
            Some(Property {
                name: p.get("name")?.as_str()?.to_string(),
                type_name: p.get("type")?.as_str()?.to_string(),
            })
        })
        .collect()
}

/// Every child object of the container at `path`.
pub async fn children(qmp: &Qmp, path: &str) -> Result<Vec<Child>, QmpError> {
    Ok(children_in(path, list(qmp, path).await?))
}

/// The child objects among `properties`, those of the container at `path`.
pub fn children_in(path: &str, properties: Vec<Property>) -> Vec<Child> {
    properties
        .into_iter()
        .filter_map(|p| {
            let type_name = p.type_name.strip_prefix("child<")?.strip_suffix('>')?;
            Some(Child {
                path: format!("{path}/{}", p.name),
                type_name: type_name.to_string(),
                name: p.name,
            })
        })
        .collect()
}

/// One property's value.
pub async fn get(qmp: &Qmp, path: &str, property: &str) -> Result<Value, QmpError> {
    qmp.execute("qom-get", Some(get_arguments(path, property)))
        .await
}

/// The arguments of a `qom-get` of `property` of `path` (to send in a batch).
pub fn get_arguments(path: &str, property: &str) -> Value {
    json!({ "path": path, "property": property })
}

/// One string property's value (empty if it is not a string).
pub async fn get_string(qmp: &Qmp, path: &str, property: &str) -> Result<String, QmpError> {
    Ok(get(qmp, path, property)
        .await?
        .as_str()
        .unwrap_or_default()
        .to_string())
}
