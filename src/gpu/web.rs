//! The GPU backend in a browser (wgpu's WebGPU backend on wasm32): the adapter and device are
//! requested asynchronously, and results are read back by awaiting `mapAsync` instead of
//! blocking on `device.poll`, which cannot wait on the web. A step is recorded and submitted
//! exactly as on native ([`crate::engine::forward::layers`] then one of the `*_async` reads).

use std::sync::Mutex;

use wasm_bindgen::JsValue;

use super::context::{AdapterDesc, GpuContext};
use super::GpuBackend;
use crate::backend::Backend;
use crate::error::{Error, Result};

/// The first uncaptured device error (validation, out of memory, device lost), reported by
/// the next read instead of the default handler's panic.
static DEVICE_ERROR: Mutex<Option<String>> = Mutex::new(None);

fn take_device_error() -> Option<String> {
    DEVICE_ERROR.lock().ok()?.take()
}

impl GpuContext {
    /// Requests the browser's WebGPU adapter and a device with the adapter's own limits
    /// (wgpu's defaults would cap storage bindings at 128 MiB) and, with `subgroups`, the
    /// `SUBGROUP` feature where the adapter reports a fixed subgroup size.
    pub async fn new_web(subgroups: bool) -> Result<Self> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: wgpu::Backends::BROWSER_WEBGPU,
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Backend(format!("WebGPU: no adapter ({e})")))?;
        let info = adapter.get_info();
        let (lo, hi) = (info.subgroup_min_size, info.subgroup_max_size);
        let subgroup_size = (subgroups
            && adapter.features().contains(wgpu::Features::SUBGROUP)
            && lo == hi
            && lo.is_power_of_two()
            && (4..=128).contains(&lo))
        .then_some(lo);
        // The browser hides most adapter details (the name may be empty or a number); the JS
        // wrapper adds GPUAdapterInfo's vendor/architecture.
        let name = if info.name.is_empty() || info.name.parse::<u64>().is_ok() {
            "WebGPU adapter".to_string()
        } else {
            info.name.clone()
        };
        let lname = format!("{name} {}", info.driver).to_lowercase();
        let desc = AdapterDesc {
            is_cpu: info.device_type == wgpu::DeviceType::Cpu || lname.contains("swiftshader"),
            name,
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            subgroup_size,
            max_binding_bytes: adapter.limits().max_storage_buffer_binding_size,
            tensor_cores: false,
            device_memory: None,
        };
        let features = if subgroup_size.is_some() {
            wgpu::Features::SUBGROUP
        } else {
            wgpu::Features::empty()
        };
        let limits = adapter.limits();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("bitnet"),
                required_features: features,
                required_limits: limits.clone(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::Backend(format!("WebGPU request_device on {}: {e}", desc.name)))?;
        device.on_uncaptured_error(std::sync::Arc::new(|e: wgpu::Error| {
            if let Ok(mut g) = DEVICE_ERROR.lock() {
                g.get_or_insert_with(|| e.to_string());
            }
        }));
        Ok(GpuContext {
            device,
            queue,
            limits,
            desc,
        })
    }
}

/// Awaits `mapAsync` of `buf` and copies out `bytes` bytes.
async fn read_buffer(buf: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
    let mut resolve: Option<js_sys::Function> = None;
    let promise = js_sys::Promise::new(&mut |res, _rej| resolve = Some(res));
    let resolve = resolve.ok_or_else(|| Error::Backend("promise without resolver".into()))?;
    buf.map_async(wgpu::MapMode::Read, 0..bytes, move |r| {
        let _ = resolve.call1(&JsValue::NULL, &JsValue::from_bool(r.is_ok()));
    });
    let ok = wasm_bindgen_futures::JsFuture::from(promise)
        .await
        .ok()
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    if let Some(e) = take_device_error() {
        return Err(Error::Backend(format!("WebGPU: {e}")));
    }
    if !ok {
        return Err(Error::Backend(
            "WebGPU: mapping the readback buffer failed".into(),
        ));
    }
    let data = buf
        .get_mapped_range(0..bytes)
        .map_err(|e| Error::Backend(format!("map: {e}")))?
        .to_vec();
    buf.unmap();
    Ok(data)
}

impl GpuBackend {
    /// Loads weights on a context from [`GpuContext::new_web`], reporting validation errors of
    /// the load (shader compilation, buffer limits) as an error instead of a later failure.
    pub async fn load_web(
        ctx: GpuContext,
        w: &crate::format::Weights,
        opts: &super::GpuOptions,
    ) -> Result<Self> {
        let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let oom = ctx.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let b = GpuBackend::with_context(ctx, w, opts);
        let oom = oom.pop().await;
        let val = scope.pop().await;
        if let Some(e) = oom {
            return Err(Error::Backend(format!(
                "WebGPU: the device cannot hold the model ({e})"
            )));
        }
        if let Some(e) = val {
            return Err(Error::Backend(format!("WebGPU: {e}")));
        }
        b
    }

    /// [`Backend::argmax_last`] for the web: records the final norm, head and argmax of the
    /// step's last position, submits, and awaits the 4-byte result.
    pub async fn argmax_last_async(&mut self) -> Result<u32> {
        let rb = self.record_argmax_last();
        self.flush();
        Ok(super::device::first_word(&read_buffer(&rb, 4).await?))
    }

    /// [`crate::backend::DeviceSteps::read_queued_argmax`] for the web: awaits the argmax of
    /// the oldest queued step's last row while the steps queued after it run.
    pub async fn read_queued_argmax_async(&mut self) -> Result<u32> {
        let q = self
            .queued
            .pop_front()
            .ok_or_else(|| Error::Request("no queued decode step to read".into()))?;
        let data = read_buffer(&q.readback, q.rows as u64 * 4).await?;
        Ok(super::device::first_word(&data[data.len() - 4..]))
    }

    /// [`Backend::logits`] of the step's last position for the web (into `out`, cleared).
    pub async fn logits_last_async(&mut self, out: &mut Vec<f32>) -> Result<()> {
        self.record_head_last();
        let vocab = self.config().vocab_size;
        let bytes = (vocab * 4) as u64;
        let (logits, readback) = (self.bufs.logits.clone(), self.bufs.readback.clone());
        self.rec
            .encoder()
            .copy_buffer_to_buffer(&logits, 0, &readback, 0, bytes);
        self.flush();
        let data = read_buffer(&readback, bytes).await?;
        out.clear();
        out.extend_from_slice(bytemuck::cast_slice(&data));
        Ok(())
    }

    /// Submits the recorded work of a step whose logits are not needed (a prefill chunk).
    pub fn submit_web(&mut self) -> Result<()> {
        self.flush();
        match take_device_error() {
            Some(e) => Err(Error::Backend(format!("WebGPU: {e}"))),
            None => Ok(()),
        }
    }
}
