"""forge-toolkit: build, fine-tune and ship language models on the Hugging Face stack.

Importing the package imports nothing heavy (no torch, no modelling code), so commands that need no model
start in a fraction of a second. `toolkit.models.register_auto_classes()` makes transformers' Auto classes
resolve the toolkit's architectures; every command, the recipe runner and the exporters call it before they
build or load a model, and so does importing a model class from `toolkit.models`.
"""

__version__ = "0.1.0"


def _quiet_optional_kernel_notice() -> None:
    """bitsandbytes on an AVX512-BF16 CPU tries an optional kernel from the Hub (`kernels` package) at import
    and logs a warning on every command when it is absent; its own CPU kernel then runs 4-bit layers, so the
    notice says nothing the user must act on. Only that message is dropped; the logger's others still show."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")
    )


_quiet_optional_kernel_notice()
