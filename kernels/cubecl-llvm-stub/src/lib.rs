//! API-only stand-in for `cubecl-llvm` 0.11.3 (see README.md): the items `cubecl-cuda` names,
//! with the LLVM compiler refusing to compile. Inference-PIO compiles through NVRTC.

use cubecl_core::prelude::KernelDefinition;
use cubecl_server::compiler::CompilationError;
use cubecl_server::kernel::BufferIOAttr;

pub mod target {
    /// LLVM compilation targets.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub enum LlvmTarget {
        #[default]
        Cpu,
        Nvptx,
    }
}
pub use target::LlvmTarget;

#[cfg(feature = "nvptx")]
pub mod nvptx {
    pub mod ptx_version {
        use core::fmt;

        /// A PTX ISA version, as the NVPTX target feature spells it: 8.7 is `87`.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub struct PtxVersion(u32);

        impl PtxVersion {
            /// The newest PTX version a driver of CUDA `driver` (`cuDriverGetVersion`) loads.
            pub fn for_driver(driver: i32) -> Option<Self> {
                DRIVER_PTX
                    .iter()
                    .find(|(first_driver, _)| driver >= *first_driver)
                    .map(|(_, ptx)| Self(*ptx))
            }
        }

        impl fmt::Display for PtxVersion {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "ptx{}", self.0)
            }
        }

        const DRIVER_PTX: &[(i32, u32)] = &[
            (13030, 93),
            (13020, 92),
            (13010, 91),
            (13000, 90),
            (12090, 88),
            (12080, 87),
            (12050, 85),
            (12040, 84),
            (12030, 83),
            (12020, 82),
            (12010, 81),
            (12000, 80),
            (11080, 78),
            (11000, 70),
            (10000, 63),
        ];
    }
}

pub mod shared {
    pub mod lowered_features {
        use cubecl_core::ir::DeviceProperties;

        /// The GPU target a device's features are narrowed for.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum GpuTarget {
            Nvptx,
        }

        /// Only called when the LLVM backend is selected, which this stand-in cannot compile
        /// for; the properties are left as the C++ backend advertised them.
        pub fn restrict_features(_props: &mut DeviceProperties, _target: GpuTarget) {}
    }
}

/// Options of the LLVM compiler (the fields `cubecl-cuda` sets).
#[derive(Clone, Debug, Default)]
pub struct PlironOptions {
    pub arch: Option<()>,
    #[cfg(feature = "nvptx")]
    pub sm_arch: Option<cubecl_core::ir::nvidia::SmArch>,
    #[cfg(feature = "nvptx")]
    pub ptx_version: Option<nvptx::ptx_version::PtxVersion>,
    pub grid_constants: bool,
}

/// Compiled NVPTX module. Never produced by this stand-in.
#[derive(Clone, Debug)]
pub struct NvptxModule {
    pub ptx: Vec<core::ffi::c_char>,
    pub entrypoint: String,
    pub ir: String,
    pub shared_memory_size: usize,
    pub io: Vec<BufferIOAttr>,
}

/// Compiled kernel artifact (non-exhaustive, as the real one has other targets: cubecl-cuda matches it with a fallback arm).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum PlironArtifact {
    NvptxCode(NvptxModule),
}

/// The LLVM compiler's shape; compiling always fails with a reason.
#[derive(Clone, Debug, Default)]
pub struct PlironCompiler {
    pub target: LlvmTarget,
}

impl PlironCompiler {
    pub fn lang_tag(&self) -> &'static str {
        "llvm"
    }

    pub fn compile(
        &mut self,
        _kernel: KernelDefinition,
        _options: &PlironOptions,
    ) -> Result<PlironArtifact, CompilationError> {
        Err(CompilationError::Generic {
            reason: "this build compiles CUDA kernels through NVRTC only (cubecl-cuda `cpp` feature); \
                     the LLVM backend is not available"
                .to_string(),
            backtrace: Default::default(),
        })
    }
}
