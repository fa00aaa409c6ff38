//! Adapter selection and device creation.

use crate::{KernelError, Result};

use super::GpuOptions;

/// An opened device with the adapter it came from.
pub(super) struct Opened {
    pub info: wgpu::AdapterInfo,
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
}

/// Returns whether an adapter of this type is real GPU hardware. lavapipe and other software rasterizers
/// report [`wgpu::DeviceType::Cpu`] and are slower than the CPU backend.
pub fn adapter_is_hardware(device_type: wgpu::DeviceType) -> bool {
    matches!(
        device_type,
        wgpu::DeviceType::DiscreteGpu
            | wgpu::DeviceType::IntegratedGpu
            | wgpu::DeviceType::VirtualGpu
    )
}

/// Preference order among adapter types: discrete first, software last.
fn rank(device_type: wgpu::DeviceType) -> u8 {
    match device_type {
        wgpu::DeviceType::DiscreteGpu => 4,
        wgpu::DeviceType::IntegratedGpu => 3,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 1,
        wgpu::DeviceType::Cpu => 0,
    }
}

fn describe(info: &wgpu::AdapterInfo) -> String {
    format!("{} ({:?}, {:?})", info.name, info.backend, info.device_type)
}

/// Picks the best adapter allowed by `options` and opens a device with the adapter's own limits.
pub(super) fn open(options: &GpuOptions) -> Result<Opened> {
    // `new_without_display_handle_from_env` honours WGPU_BACKEND and the other wgpu variables.
    let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    if let Some(backends) = options.backends {
        descriptor.backends = backends;
    }
    let instance = wgpu::Instance::new(descriptor);
    let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    let found: Vec<String> = adapters.iter().map(|a| describe(&a.get_info())).collect();
    tracing::debug!(?found, "enumerated GPU adapters");

    // Read here rather than through `wgpu::util::initialize_adapter_from_env`, which panics when the
    // name matches nothing.
    let wanted_name = options
        .adapter_name
        .clone()
        .or_else(|| std::env::var("WGPU_ADAPTER_NAME").ok())
        .map(|name| name.to_lowercase());

    // Among equal ranks the first enumerated adapter wins, and GL loses to the native APIs because it
    // lacks f16 and subgroups and compiles shaders slowly.
    let best = adapters
        .into_iter()
        .enumerate()
        .filter(|(_, adapter)| {
            let info = adapter.get_info();
            let name_matches = wanted_name
                .as_ref()
                .is_none_or(|name| info.name.to_lowercase().contains(name));
            name_matches && (!options.hardware_only || adapter_is_hardware(info.device_type))
        })
        .max_by_key(|(index, adapter)| {
            let info = adapter.get_info();
            let native = info.backend != wgpu::Backend::Gl;
            (rank(info.device_type), native, std::cmp::Reverse(*index))
        })
        .map(|(_, adapter)| adapter);

    let Some(adapter) = best else {
        let mut wanted = Vec::new();
        if let Some(name) = &wanted_name {
            wanted.push(format!("name containing {name:?}"));
        }
        if options.hardware_only {
            wanted.push("hardware (not a software renderer)".to_owned());
        }
        let wanted = if wanted.is_empty() {
            "any adapter".to_owned()
        } else {
            wanted.join(", ")
        };
        let found = if found.is_empty() {
            "none".to_owned()
        } else {
            found.join("; ")
        };
        return Err(KernelError::NoAdapter {
            detail: format!("wanted {wanted}; found {found}"),
        });
    };

    let info = adapter.get_info();
    let limits = adapter.limits();
    let descriptor = wgpu::DeviceDescriptor {
        label: Some("qwenlens"),
        // The kernels need no optional feature: f16 weights are unpacked with the core
        // `unpack2x16float` and no kernel uses subgroups, so they also run on GL.
        required_features: wgpu::Features::empty(),
        // The adapter's own limits, because wgpu's defaults cap storage bindings at 128 MiB and
        // buffers at 256 MiB even on GPUs that allow far more.
        required_limits: limits.clone(),
        experimental_features: wgpu::ExperimentalFeatures::disabled(),
        memory_hints: wgpu::MemoryHints::Performance,
        trace: wgpu::Trace::Off,
    };
    let (device, queue) = pollster::block_on(adapter.request_device(&descriptor))
        .map_err(|err| KernelError::Gpu(format!("failed to open {}: {err}", describe(&info))))?;

    tracing::info!(
        adapter = %info.name,
        backend = ?info.backend,
        device_type = ?info.device_type,
        driver = %info.driver,
        driver_info = %info.driver_info,
        max_storage_buffer_binding_size = limits.max_storage_buffer_binding_size,
        max_buffer_size = limits.max_buffer_size,
        "opened GPU device"
    );
    Ok(Opened {
        info,
        device,
        queue,
    })
}
