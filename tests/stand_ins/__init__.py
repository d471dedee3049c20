"""Pure-PyTorch stand-ins of the optional fused kernels, implementing their documented contracts,
so the code that dispatches to those kernels is tested on CPU."""
