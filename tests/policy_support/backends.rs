//! Backends that wrap the one fake VM (`usbroute::backend::fake`) to inject what it
//! cannot do alone: holding a call until the test lets it go, and naming devices its own
//! way. Used by the engine tests in `tests/quick/policy_runtime.rs`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;
use usbroute::backend::fake::FakeVm;
use usbroute::backend::{AttachKey, AttachMode, BackendError, BoxFuture, VmBackend, VmUsbDevice};
use usbroute::inventory::Device;

/// A fault injector around a fake VM: holds its first list, or each attach, until the
/// test lets it go by adding a permit.
pub struct Gated {
    pub vm: Arc<FakeVm>,
    /// When set, the first list waits for one permit.
    pub first_list_gate: Option<Semaphore>,
    /// When set, every attach waits for one permit.
    pub attach_gate: Option<Semaphore>,
    pub attaches_started: AtomicU32,
    pub lists: AtomicU32,
}

impl Gated {
    pub fn first_list(vm: &Arc<FakeVm>) -> Arc<Gated> {
        Gated::new(vm, Some(Semaphore::new(0)), None)
    }

    pub fn attaches(vm: &Arc<FakeVm>) -> Arc<Gated> {
        Gated::new(vm, None, Some(Semaphore::new(0)))
    }

    pub fn new(
        vm: &Arc<FakeVm>,
        lists: Option<Semaphore>,
        attaches: Option<Semaphore>,
    ) -> Arc<Gated> {
        Arc::new(Gated {
            vm: Arc::clone(vm),
            first_list_gate: lists,
            attach_gate: attaches,
            attaches_started: AtomicU32::new(0),
            lists: AtomicU32::new(0),
        })
    }
}

impl VmBackend for Gated {
    fn name(&self) -> &str {
        self.vm.name()
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<VmUsbDevice>, BackendError>> {
        Box::pin(async move {
            let first = self.lists.fetch_add(1, Ordering::SeqCst) == 0;
            if let (true, Some(gate)) = (first, &self.first_list_gate) {
                let _permit = gate.acquire().await.expect("gate");
            }
            self.vm.list().await
        })
    }

    fn attach<'a>(
        &'a self,
        device: &'a Device,
        mode: AttachMode,
    ) -> BoxFuture<'a, Result<VmUsbDevice, BackendError>> {
        Box::pin(async move {
            self.attaches_started.fetch_add(1, Ordering::SeqCst);
            if let Some(gate) = &self.attach_gate {
                gate.acquire().await.expect("gate").forget();
            }
            self.vm.attach(device, mode).await
        })
    }

    fn detach<'a>(&'a self, key: &'a AttachKey) -> BoxFuture<'a, Result<(), BackendError>> {
        self.vm.detach(key)
    }

    fn device_id(&self, key: &AttachKey) -> String {
        self.vm.device_id(key)
    }
}

/// A backend naming our devices its own way (`ua-0`, `ua-1`, … in order of first sight,
/// as libvirt aliases might be), over a fake VM: the engine must go by keys alone.
pub struct Aliased {
    pub vm: Arc<FakeVm>,
    pub aliases: Mutex<Vec<AttachKey>>,
}

impl Aliased {
    fn alias(&self, key: &AttachKey) -> String {
        let mut aliases = self.aliases.lock().expect("aliases");
        let n = match aliases.iter().position(|k| k == key) {
            Some(n) => n,
            None => {
                aliases.push(key.clone());
                aliases.len() - 1
            }
        };
        format!("ua-{n}")
    }

    fn renamed(&self, mut device: VmUsbDevice) -> VmUsbDevice {
        if let Some(key) = &device.key {
            device.id = self.alias(key);
        }
        device
    }
}

impl VmBackend for Aliased {
    fn name(&self) -> &str {
        self.vm.name()
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<VmUsbDevice>, BackendError>> {
        Box::pin(async move {
            let listed = self.vm.list().await?;
            Ok(listed.into_iter().map(|d| self.renamed(d)).collect())
        })
    }

    fn attach<'a>(
        &'a self,
        device: &'a Device,
        mode: AttachMode,
    ) -> BoxFuture<'a, Result<VmUsbDevice, BackendError>> {
        Box::pin(async move { Ok(self.renamed(self.vm.attach(device, mode).await?)) })
    }

    fn detach<'a>(&'a self, key: &'a AttachKey) -> BoxFuture<'a, Result<(), BackendError>> {
        self.vm.detach(key)
    }

    fn device_id(&self, key: &AttachKey) -> String {
        self.alias(key)
    }
}
