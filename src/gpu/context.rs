//! Adapter selection and device creation.

use crate::error::{Error, Result};
use crate::gpu::ops::matmul::COOP_WORKGROUP_BYTES;

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
    /// Cooperative 16×16×16 f16 matrices with f32 sums (tensor cores) run the batched matmuls.
    pub tensor_cores: bool,
    /// Bytes of the adapter's largest device-local memory heap, where the API tells (Vulkan).
    pub device_memory: Option<u64>,
}

impl std::fmt::Display for AdapterDesc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}, {}{}{})",
            self.name,
            self.backend,
            self.device_type,
            match self.subgroup_size {
                Some(s) => format!(", subgroups of {s}"),
                None => ", no subgroups".into(),
            },
            if self.tensor_cores {
                ", tensor cores"
            } else {
                ""
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

/// The compute-capable adapters, best first (a stable order: ties keep wgpu's order).
fn ranked(instance: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    let backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all());
    let mut adapters: Vec<wgpu::Adapter> =
        pollster::block_on(instance.enumerate_adapters(backends))
            .into_iter()
            .filter(|a| {
                a.get_downlevel_capabilities()
                    .flags
                    .contains(wgpu::DownlevelFlags::COMPUTE_SHADERS)
            })
            .collect();
    adapters.sort_by_key(|a| std::cmp::Reverse(rank(&a.get_info())));
    adapters
}

fn pick(instance: &wgpu::Instance) -> Option<wgpu::Adapter> {
    ranked(instance).into_iter().next()
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

/// What the tensor-core matmul needs: wgpu's experimental cooperative matrices with the
/// 16×16×16 f16 × f16 + f32 shape, `SHADER_F16`, subgroups of 32 (its tile assigns work per
/// 32 invocations) and its workgroup memory.
fn has_tensor_cores(adapter: &wgpu::Adapter) -> bool {
    use wgpu::CooperativeScalarType as S;
    let need = wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX | wgpu::Features::SHADER_F16;
    adapter.features().contains(need)
        && subgroup_size(adapter) == Some(32)
        && adapter.limits().max_compute_workgroup_storage_size >= COOP_WORKGROUP_BYTES
        && adapter.cooperative_matrix_properties().iter().any(|p| {
            (p.m_size, p.n_size, p.k_size) == (16, 16, 16)
                && p.ab_type == S::F16
                && p.cr_type == S::F32
        })
}

fn describe(adapter: &wgpu::Adapter, subgroups: bool, tensor_cores: bool) -> AdapterDesc {
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
        tensor_cores: subgroups && tensor_cores && has_tensor_cores(adapter),
        device_memory: device_memory(adapter),
    }
}

/// The largest device-local heap of a Vulkan adapter (its video memory; system memory for a
/// software one), read through wgpu's Vulkan layer.
#[cfg(any(target_os = "linux", target_os = "windows", target_os = "android"))]
fn device_memory(adapter: &wgpu::Adapter) -> Option<u64> {
    /// VK_MEMORY_HEAP_DEVICE_LOCAL_BIT.
    const DEVICE_LOCAL: u32 = 1;
    // SAFETY (both blocks): only reads the physical device's memory properties; nothing is
    // created or destroyed through the raw handles.
    let hal = unsafe { adapter.as_hal::<wgpu::hal::api::Vulkan>() }?;
    let props = unsafe {
        hal.shared_instance()
            .raw_instance()
            .get_physical_device_memory_properties(hal.raw_physical_device())
    };
    props.memory_heaps[..props.memory_heap_count as usize]
        .iter()
        .filter(|h| h.flags.as_raw() & DEVICE_LOCAL != 0)
        .map(|h| h.size)
        .max()
}

/// Other native APIs do not tell (their pools are sized by the largest binding alone).
#[cfg(not(any(target_os = "linux", target_os = "windows", target_os = "android")))]
fn device_memory(_: &wgpu::Adapter) -> Option<u64> {
    None
}

/// The adapter [`GpuContext::new`] would choose, without creating a device.
pub fn probe() -> Option<AdapterDesc> {
    pick(&instance()).map(|a| describe(&a, true, true))
}

impl GpuContext {
    /// Picks the best adapter (a real GPU before a software one, honouring `WGPU_BACKEND`) and
    /// requests a device with the adapter's own limits, `SUBGROUP` when it is present and
    /// `subgroups` is true, and cooperative matrices when `tensor_cores` is also true and the
    /// adapter has them.
    pub fn new(subgroups: bool, tensor_cores: bool) -> Result<Self> {
        Self::on_adapter(0, subgroups, tensor_cores)
    }

    /// [`GpuContext::new`] on the `index`-th adapter in that order (0: the best), for one
    /// worker per GPU.
    pub fn on_adapter(index: usize, subgroups: bool, tensor_cores: bool) -> Result<Self> {
        let instance = instance();
        let mut all = ranked(&instance);
        if all.is_empty() {
            return Err(Error::Backend(
                "no wgpu adapter with compute shaders found".into(),
            ));
        }
        let found = all.len();
        if index >= found {
            return Err(Error::Backend(format!(
                "GPU adapter {index} asked for, but wgpu finds {found}"
            )));
        }
        let adapter = all.swap_remove(index);
        let desc = describe(&adapter, subgroups, tensor_cores);
        let mut features = if desc.subgroup_size.is_some() {
            wgpu::Features::SUBGROUP
        } else {
            wgpu::Features::empty()
        };
        // Timestamps for `bench --profile` (per-kernel GPU time), where the adapter has them.
        features |= adapter.features() & wgpu::Features::TIMESTAMP_QUERY;
        let experimental_features = if desc.tensor_cores {
            features |=
                wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX | wgpu::Features::SHADER_F16;
            // SAFETY: wgpu marks cooperative matrices experimental; the only use is the
            // tensor-core matmul, whose results the device test suite checks exactly against
            // the scalar reference on every adapter that has them.
            unsafe { wgpu::ExperimentalFeatures::enabled() }
        } else {
            wgpu::ExperimentalFeatures::disabled()
        };
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("bitnet"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features,
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
