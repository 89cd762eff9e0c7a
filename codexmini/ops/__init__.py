"""The numerics of codexmini, in one place: torch and the standard library only, nothing else from codexmini.

The student model (`codexmini.models`), the quantizers (`codexmini.quantize`), the `.cmx` format
(`codexmini.export.cmx`) and the on-device runtime (`codexmini.runtime`) all compute with these functions, so they
cannot drift apart; the runtime's fused C++ kernels are tested against them.

- `names`: the layer-type and feature-map names every part validates against.
- `layouts`: quantization schemes and the portable int8 / int4 layouts: pack, unpack, quantize, dequantize.
- `feature_maps`: the feature maps of linear attention as plain functions (elu, relu, taylor, hedgehog).
- `linear_attn`: causal linear attention, naive / chunked / recurrent, one signature; the shared normaliser.
- `hybrid`: sliding-window softmax plus linear attention over older keys, and its quadratic reference.
- `rope`: rotary position embedding tables and their application.
- `norm`: RMSNorm.

Import the module you need (`from codexmini.ops.linear_attn import chunk_linear_attn`); this package re-exports
nothing, so every function has one import path.
"""
