//! The daemon's links to the rest of usbroute: the QEMU backend as a [`VmConnector`], and
//! the config file as a [`PolicyView`]. Thin on purpose: all logic lives on either side.

use super::decide::PolicyView;
use super::runtime::PolicyLoader;
use super::vm_link::{VmConnector, VmLink};
use crate::backend::{BackendError, BoxFuture};
use crate::sysfs::SysfsRoot;
use std::path::Path;
use std::sync::Arc;

/// Reaches VMs through QEMU's QMP.
#[derive(Debug, Clone)]
pub struct QemuConnector {
    root: SysfsRoot,
}

/// The QEMU connector, opening device nodes under `root`.
pub fn qemu(root: SysfsRoot) -> Arc<dyn VmConnector> {
    Arc::new(QemuConnector { root })
}

impl VmConnector for QemuConnector {
    fn connect<'a>(
        &'a self,
        name: &'a str,
        _qmp: &'a Path,
    ) -> BoxFuture<'a, Result<VmLink, BackendError>> {
        let _ = &self.root;
        Box::pin(async move {
            Err(BackendError::Unreachable {
                vm: name.to_string(),
                reason: "the QEMU backend is not in this build yet".into(),
            })
        })
    }
}

/// Loads config files into a policy.
pub fn config_loader() -> PolicyLoader {
    Arc::new(|path: &Path| -> Result<Arc<dyn PolicyView>, String> {
        Err(format!(
            "{}: rules are not in this build yet",
            path.display()
        ))
    })
}
