//! Device names and backend selection. Needs a GPU adapter (lavapipe is enough) and fails without one.

use qwenlens_kernels::gpu::{GpuBackend, GpuOptions, adapter_is_hardware};
use qwenlens_kernels::{Device, KernelError, create_backend};

fn adapters() -> Vec<wgpu::AdapterInfo> {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
        .iter()
        .map(|adapter| adapter.get_info())
        .collect()
}

#[test]
fn device_parses_and_displays() {
    for (text, device) in [
        ("auto", Device::Auto),
        ("gpu", Device::Gpu),
        ("cpu", Device::Cpu),
    ] {
        assert_eq!(text.parse::<Device>().unwrap(), device);
        assert_eq!(device.to_string(), text);
    }
    assert_eq!("GPU".parse::<Device>().unwrap(), Device::Gpu);
}

#[test]
fn device_error_names_value_and_choices() {
    let message = "tpu".parse::<Device>().unwrap_err().to_string();
    assert!(message.contains("\"tpu\""), "{message}");
    assert!(message.contains("auto, gpu, cpu"), "{message}");
}

#[test]
fn cpu_device_opens_cpu_backend() {
    let backend = create_backend(Device::Cpu).unwrap();
    assert!(backend.name().starts_with("cpu"), "{}", backend.name());
}

#[test]
fn gpu_device_opens_any_adapter() {
    let backend = create_backend(Device::Gpu).expect("a GPU adapter (install mesa-vulkan-drivers)");
    assert!(backend.name().starts_with("wgpu: "), "{}", backend.name());
}

#[test]
fn auto_device_skips_software_adapters() {
    let has_hardware = adapters()
        .iter()
        .any(|info| adapter_is_hardware(info.device_type));
    let backend = create_backend(Device::Auto).unwrap();
    let expected = if has_hardware { "wgpu: " } else { "cpu" };
    assert!(
        backend.name().starts_with(expected),
        "{} (hardware GPU present: {has_hardware})",
        backend.name()
    );
}

#[test]
fn unknown_adapter_name_is_no_adapter_error() {
    let options = GpuOptions {
        adapter_name: Some("no-such-adapter-xyz".to_owned()),
        warm_up: false,
        ..GpuOptions::default()
    };
    let err = GpuBackend::new(options).unwrap_err();
    assert!(matches!(err, KernelError::NoAdapter { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("no-such-adapter-xyz"), "{message}");
    assert!(message.contains("mesa-vulkan-drivers"), "{message}");
}

#[test]
fn device_gets_adapter_limits() {
    let options = GpuOptions {
        warm_up: false,
        ..GpuOptions::default()
    };
    let backend = GpuBackend::new(options).expect("a GPU adapter (install mesa-vulkan-drivers)");
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    let info = backend.adapter_info();
    let adapter = adapters
        .iter()
        .find(|adapter| {
            let other = adapter.get_info();
            other.name == info.name && other.backend == info.backend
        })
        .expect("the opened adapter is enumerated");

    let limits = adapter.limits();
    assert_eq!(
        backend.limits().max_storage_buffer_binding_size,
        limits.max_storage_buffer_binding_size
    );
    assert_eq!(backend.limits().max_buffer_size, limits.max_buffer_size);
    assert_eq!(
        backend.max_binding_bytes(),
        limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size)
    );
}

#[test]
fn named_adapter_is_opened() {
    let Some(info) = adapters().into_iter().next() else {
        panic!("no GPU adapter found (install mesa-vulkan-drivers)");
    };
    let options = GpuOptions {
        adapter_name: Some(info.name.to_uppercase()),
        backends: Some(info.backend.into()),
        warm_up: false,
        ..GpuOptions::default()
    };
    let backend = GpuBackend::new(options).unwrap();
    assert_eq!(backend.adapter_info().name, info.name);
    assert_eq!(backend.adapter_info().backend, info.backend);
}

#[test]
fn native_api_preferred_over_gl() {
    let found = adapters();
    let has_native = found.iter().any(|info| info.backend != wgpu::Backend::Gl);
    let options = GpuOptions {
        warm_up: false,
        ..GpuOptions::default()
    };
    let backend = GpuBackend::new(options).expect("a GPU adapter (install mesa-vulkan-drivers)");
    if has_native {
        assert_ne!(
            backend.adapter_info().backend,
            wgpu::Backend::Gl,
            "found adapters: {found:?}"
        );
    }
}

#[test]
fn tiny_binding_limit_is_rejected() {
    let options = GpuOptions {
        max_binding_bytes: Some(8),
        warm_up: false,
        ..GpuOptions::default()
    };
    let err = GpuBackend::new(options).unwrap_err();
    assert!(matches!(err, KernelError::Gpu(_)), "{err}");
    assert!(err.to_string().contains("max_binding_bytes 8"), "{err}");
}
