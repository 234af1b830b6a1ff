//! Test plugin: a well-formed root module that declares the next ABI major version. The host
//! must refuse it before calling anything else.

use inference_pio_core::abi::{ABI_MAJOR, ABI_MINOR, PluginError, PluginModule, PluginModuleRef, PluginResult, TokenEventSink, TokenSink};
use inference_pio_core::__abi_stable::export_root_module;
use inference_pio_core::__abi_stable::prefix_type::PrefixTypeTrait;
use inference_pio_core::__abi_stable::std_types::{RResult, RStr, RString};

fn refuse<T>() -> PluginResult<T> {
    RResult::RErr(PluginError::invalid("wrong-abi test plugin must never be called"))
}
extern "C" fn metadata() -> PluginResult<RString> { refuse() }
extern "C" fn supports_config(_: RStr<'_>) -> PluginResult<RString> { refuse() }
extern "C" fn initialize(_: RStr<'_>) -> PluginResult<()> { refuse() }
extern "C" fn load_model(_: RStr<'_>, _: RStr<'_>) -> PluginResult<RString> { refuse() }
extern "C" fn infer(_: u64, _: RStr<'_>, _: TokenSink<'_>) -> PluginResult<RString> { refuse() }
extern "C" fn score(_: u64, _: RStr<'_>) -> PluginResult<RString> { refuse() }
extern "C" fn update_config(_: RStr<'_>) -> PluginResult<RString> { refuse() }
extern "C" fn cleanup(_: u64) -> PluginResult<()> { refuse() }
extern "C" fn stats(_: u64) -> PluginResult<RString> { refuse() }
extern "C" fn infer_events(_: u64, _: RStr<'_>, _: TokenEventSink<'_>) -> PluginResult<RString> { refuse() }

#[export_root_module]
pub fn root_module() -> PluginModuleRef {
    PluginModule {
        abi_major: ABI_MAJOR + 1,
        abi_minor: ABI_MINOR,
        metadata,
        supports_config,
        initialize,
        load_model,
        infer,
        generate_text: infer,
        chat_completion: infer,
        score,
        update_config,
        cleanup,
        infer_batch: score,
        stats,
        infer_events,
    }
    .leak_into_prefix()
}
