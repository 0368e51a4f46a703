//! Adapter selection and device creation.

use crate::error::{Error, Result};

/// A description of a wgpu adapter.
#[derive(Debug, Clone)]
pub struct AdapterDesc {
    /// Adapter name (e.g. "NVIDIA H100" or "llvmpipe (LLVM 15.0.6, 256 bits)").
    pub name: String,
    /// Graphics API (Vulkan, Metal, Dx12, Gl, BrowserWebGpu).
    pub backend: String,
    /// Device type as wgpu reports it (DiscreteGpu, IntegratedGpu, Cpu, ...).
    pub device_type: String,
    /// True for software (CPU) adapters such as lavapipe or SwiftShader.
    pub is_cpu: bool,
    /// The subgroup size the kernels use, when the adapter has `SUBGROUP` with a fixed size.
    pub subgroup_size: Option<u32>,
    /// The adapter's `max_storage_buffer_binding_size`.
    pub max_binding_bytes: u64,
}

impl std::fmt::Display for AdapterDesc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}, {}{})",
            self.name,
            self.backend,
            self.device_type,
            match self.subgroup_size {
                Some(s) => format!(", subgroups of {s}"),
                None => ", no subgroups".into(),
            }
        )
    }
}

/// An adapter with its device and queue.
pub struct GpuContext {
    /// The device.
    pub device: wgpu::Device,
    /// Its queue.
    pub queue: wgpu::Queue,
    /// The device's limits (the adapter's own).
    pub limits: wgpu::Limits,
    /// What was chosen.
    pub desc: AdapterDesc,
}

fn instance() -> wgpu::Instance {
    // Honour WGPU_BACKEND (e.g. `gl`, `vulkan`) and the other WGPU_* variables.
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    if let Some(b) = wgpu::Backends::from_env() {
        desc.backends = b;
    }
    wgpu::Instance::new(desc)
}

fn is_cpu(info: &wgpu::AdapterInfo) -> bool {
    info.device_type == wgpu::DeviceType::Cpu
        || info.name.contains("llvmpipe")
        || info.name.to_lowercase().contains("swiftshader")
}

/// Ranks adapters: a real GPU first (discrete, integrated, virtual), software last; then a
/// native API (Vulkan, Metal, DX12) before GL.
fn rank(info: &wgpu::AdapterInfo) -> (u32, u32) {
    let kind = if is_cpu(info) {
        0
    } else {
        match info.device_type {
            wgpu::DeviceType::DiscreteGpu => 4,
            wgpu::DeviceType::IntegratedGpu => 3,
            wgpu::DeviceType::VirtualGpu => 2,
            _ => 1,
        }
    };
    let api = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 2,
        wgpu::Backend::Gl => 1,
        _ => 0,
    };
    (kind, api)
}

fn pick(instance: &wgpu::Instance) -> Option<wgpu::Adapter> {
    let backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all());
    let adapters = pollster::block_on(instance.enumerate_adapters(backends));
    adapters
        .into_iter()
        .filter(|a| {
            a.get_downlevel_capabilities()
                .flags
                .contains(wgpu::DownlevelFlags::COMPUTE_SHADERS)
        })
        .max_by_key(|a| rank(&a.get_info()))
}

fn subgroup_size(adapter: &wgpu::Adapter) -> Option<u32> {
    let info = adapter.get_info();
    let (lo, hi) = (info.subgroup_min_size, info.subgroup_max_size);
    (adapter.features().contains(wgpu::Features::SUBGROUP)
        && lo == hi
        && lo.is_power_of_two()
        && (4..=128).contains(&lo))
    .then_some(lo)
}

fn describe(adapter: &wgpu::Adapter, subgroups: bool) -> AdapterDesc {
    let info = adapter.get_info();
    AdapterDesc {
        is_cpu: is_cpu(&info),
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        subgroup_size: if subgroups {
            subgroup_size(adapter)
        } else {
            None
        },
        max_binding_bytes: adapter.limits().max_storage_buffer_binding_size,
    }
}

/// The adapter [`GpuContext::new`] would choose, without creating a device.
pub fn probe() -> Option<AdapterDesc> {
    pick(&instance()).map(|a| describe(&a, true))
}

impl GpuContext {
    /// Picks the best adapter (a real GPU before a software one, honouring `WGPU_BACKEND`) and
    /// requests a device with the adapter's own limits and `SUBGROUP` when it is present and
    /// `subgroups` is true.
    pub fn new(subgroups: bool) -> Result<Self> {
        let instance = instance();
        let adapter = pick(&instance)
            .ok_or_else(|| Error::Backend("no wgpu adapter with compute shaders found".into()))?;
        let desc = describe(&adapter, subgroups);
        let mut features = if desc.subgroup_size.is_some() {
            wgpu::Features::SUBGROUP
        } else {
            wgpu::Features::empty()
        };
        // Timestamps for `bench --profile` (per-kernel GPU time), where the adapter has them.
        features |= adapter.features() & wgpu::Features::TIMESTAMP_QUERY;
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("bitnet"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::Backend(format!("request_device on {}: {e}", desc.name)))?;
        Ok(GpuContext {
            device,
            queue,
            limits,
            desc,
        })
    }
}
