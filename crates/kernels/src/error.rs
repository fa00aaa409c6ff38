/// Errors of the compute backends.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// An operation got operands whose shapes do not fit together.
    #[error("{op}: invalid shapes: {detail}")]
    Shape { op: &'static str, detail: String },

    /// An operand was created by another backend than the one asked to use it.
    #[error("{op}: operand belongs to another backend (expected {expected})")]
    WrongBackend {
        op: &'static str,
        expected: &'static str,
    },

    /// A host buffer does not hold the number of bytes its shape and dtype need.
    #[error("{op}: expected {expected} bytes for shape {shape:?}, found {found}")]
    ByteLength {
        op: &'static str,
        shape: Vec<usize>,
        expected: usize,
        found: usize,
    },

    /// An index (token id, row, head) is outside its valid range.
    #[error("{op}: {what} {value} is out of range (must be below {limit})")]
    OutOfRange {
        op: &'static str,
        what: &'static str,
        value: usize,
        limit: usize,
    },

    /// No GPU adapter could be found or opened.
    #[error(
        "no GPU adapter found ({detail}); on headless Linux install `mesa-vulkan-drivers` (software Vulkan), or use the CPU backend"
    )]
    NoAdapter { detail: String },

    /// The GPU device failed or reported an error.
    #[error("GPU error: {0}")]
    Gpu(String),

    /// A buffer would exceed what the device allows.
    #[error(
        "{op}: {bytes} bytes exceed the device limit of {limit} bytes; use a shorter input or the CPU backend"
    )]
    DeviceLimit {
        op: &'static str,
        bytes: u64,
        limit: u64,
    },
}

/// Result alias of this crate.
pub type Result<T, E = KernelError> = std::result::Result<T, E>;
