//! `cuGetErrorName` / `cuGetErrorString` (the texts of the CUDA 13.0 `cuda.h` documentation) and
//! the cuBLAS status names.

/// `(code, name, description)` as static C strings.
const ERRORS: &[(i32, &str, &str)] = &[
    (0, "CUDA_SUCCESS\0", "no error\0"),
    (1, "CUDA_ERROR_INVALID_VALUE\0", "invalid argument\0"),
    (2, "CUDA_ERROR_OUT_OF_MEMORY\0", "out of memory\0"),
    (3, "CUDA_ERROR_NOT_INITIALIZED\0", "initialization error\0"),
    (4, "CUDA_ERROR_DEINITIALIZED\0", "driver shutting down\0"),
    (
        5,
        "CUDA_ERROR_PROFILER_DISABLED\0",
        "profiler disabled while using external profiling tool\0",
    ),
    (
        6,
        "CUDA_ERROR_PROFILER_NOT_INITIALIZED\0",
        "profiler not initialized: call cudaProfilerInitialize()\0",
    ),
    (
        7,
        "CUDA_ERROR_PROFILER_ALREADY_STARTED\0",
        "profiler already started\0",
    ),
    (
        8,
        "CUDA_ERROR_PROFILER_ALREADY_STOPPED\0",
        "profiler already stopped\0",
    ),
    (
        34,
        "CUDA_ERROR_STUB_LIBRARY\0",
        "CUDA driver is a stub library\0",
    ),
    (
        46,
        "CUDA_ERROR_DEVICE_UNAVAILABLE\0",
        "CUDA-capable device(s) is/are busy or unavailable\0",
    ),
    (
        100,
        "CUDA_ERROR_NO_DEVICE\0",
        "no CUDA-capable device is detected\0",
    ),
    (
        101,
        "CUDA_ERROR_INVALID_DEVICE\0",
        "invalid device ordinal\0",
    ),
    (
        200,
        "CUDA_ERROR_INVALID_IMAGE\0",
        "device kernel image is invalid\0",
    ),
    (
        201,
        "CUDA_ERROR_INVALID_CONTEXT\0",
        "invalid device context\0",
    ),
    (
        202,
        "CUDA_ERROR_CONTEXT_ALREADY_CURRENT\0",
        "context already current\0",
    ),
    (
        209,
        "CUDA_ERROR_NO_BINARY_FOR_GPU\0",
        "no kernel image is available for execution on the device\0",
    ),
    (
        218,
        "CUDA_ERROR_INVALID_PTX\0",
        "a PTX JIT compilation failed\0",
    ),
    (
        222,
        "CUDA_ERROR_UNSUPPORTED_PTX_VERSION\0",
        "the provided PTX was compiled with an unsupported toolchain.\0",
    ),
    (
        300,
        "CUDA_ERROR_INVALID_SOURCE\0",
        "device kernel image is invalid\0",
    ),
    (301, "CUDA_ERROR_FILE_NOT_FOUND\0", "file not found\0"),
    (
        304,
        "CUDA_ERROR_OPERATING_SYSTEM\0",
        "OS call failed or operation not supported on this OS\0",
    ),
    (
        400,
        "CUDA_ERROR_INVALID_HANDLE\0",
        "invalid resource handle\0",
    ),
    (
        401,
        "CUDA_ERROR_ILLEGAL_STATE\0",
        "the operation cannot be performed in the present state\0",
    ),
    (500, "CUDA_ERROR_NOT_FOUND\0", "named symbol not found\0"),
    (600, "CUDA_ERROR_NOT_READY\0", "device not ready\0"),
    (
        700,
        "CUDA_ERROR_ILLEGAL_ADDRESS\0",
        "an illegal memory access was encountered\0",
    ),
    (
        701,
        "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES\0",
        "too many resources requested for launch\0",
    ),
    (
        702,
        "CUDA_ERROR_LAUNCH_TIMEOUT\0",
        "the launch timed out and was terminated\0",
    ),
    (
        708,
        "CUDA_ERROR_PRIMARY_CONTEXT_ACTIVE\0",
        "primary context active\0",
    ),
    (
        709,
        "CUDA_ERROR_CONTEXT_IS_DESTROYED\0",
        "context is destroyed\0",
    ),
    (710, "CUDA_ERROR_ASSERT\0", "device-side assert triggered\0"),
    (
        714,
        "CUDA_ERROR_HARDWARE_STACK_ERROR\0",
        "hardware stack error\0",
    ),
    (
        715,
        "CUDA_ERROR_ILLEGAL_INSTRUCTION\0",
        "an illegal instruction was encountered\0",
    ),
    (
        716,
        "CUDA_ERROR_MISALIGNED_ADDRESS\0",
        "misaligned address\0",
    ),
    (
        717,
        "CUDA_ERROR_INVALID_ADDRESS_SPACE\0",
        "operation not supported on global/shared address space\0",
    ),
    (718, "CUDA_ERROR_INVALID_PC\0", "invalid program counter\0"),
    (
        719,
        "CUDA_ERROR_LAUNCH_FAILED\0",
        "unspecified launch failure\0",
    ),
    (
        720,
        "CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE\0",
        "too many blocks in cooperative launch\0",
    ),
    (
        800,
        "CUDA_ERROR_NOT_PERMITTED\0",
        "operation not permitted\0",
    ),
    (
        801,
        "CUDA_ERROR_NOT_SUPPORTED\0",
        "operation not supported\0",
    ),
    (
        900,
        "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED\0",
        "operation not permitted when stream is capturing\0",
    ),
    (
        907,
        "CUDA_ERROR_CAPTURED_EVENT\0",
        "operation not permitted on an event last recorded in a capturing stream\0",
    ),
    (909, "CUDA_ERROR_TIMEOUT\0", "wait operation timed out\0"),
    (999, "CUDA_ERROR_UNKNOWN\0", "unknown error\0"),
];

/// The name and description of a driver result code, if it is one this driver knows.
pub(crate) fn lookup(code: i32) -> Option<(&'static str, &'static str)> {
    ERRORS
        .iter()
        .find(|(c, _, _)| *c == code)
        .map(|&(_, n, d)| (n, d))
}

/// The name of a result code without its NUL, for messages.
pub(crate) fn name(code: i32) -> &'static str {
    lookup(code).map_or("CUDA_ERROR_?", |(n, _)| n.trim_end_matches('\0'))
}

/// `(code, name, description)` of the cuBLAS statuses.
const BLAS: &[(i32, &str, &str)] = &[
    (
        0,
        "CUBLAS_STATUS_SUCCESS\0",
        "the operation completed successfully\0",
    ),
    (
        1,
        "CUBLAS_STATUS_NOT_INITIALIZED\0",
        "the library was not initialized\0",
    ),
    (
        3,
        "CUBLAS_STATUS_ALLOC_FAILED\0",
        "the resource allocation failed\0",
    ),
    (
        7,
        "CUBLAS_STATUS_INVALID_VALUE\0",
        "an invalid numeric value was used as an argument\0",
    ),
    (
        8,
        "CUBLAS_STATUS_ARCH_MISMATCH\0",
        "an absent device architectural feature is required\0",
    ),
    (
        11,
        "CUBLAS_STATUS_MAPPING_ERROR\0",
        "an access to GPU memory space failed\0",
    ),
    (
        13,
        "CUBLAS_STATUS_EXECUTION_FAILED\0",
        "the GPU program failed to execute\0",
    ),
    (
        14,
        "CUBLAS_STATUS_INTERNAL_ERROR\0",
        "an internal operation failed\0",
    ),
    (
        15,
        "CUBLAS_STATUS_NOT_SUPPORTED\0",
        "the functionality requested is not supported\0",
    ),
    (
        16,
        "CUBLAS_STATUS_LICENSE_ERROR\0",
        "error detected trying to check the license\0",
    ),
];

/// Name and description of a cuBLAS status.
pub(crate) fn blas_lookup(code: i32) -> (&'static str, &'static str) {
    BLAS.iter().find(|(c, _, _)| *c == code).map_or(
        ("CUBLAS_STATUS_UNKNOWN\0", "unknown cuBLAS status\0"),
        |&(_, n, d)| (n, d),
    )
}
