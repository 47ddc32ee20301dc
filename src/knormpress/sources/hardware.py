"""The devices and dtypes a run may ask for, by name: torch-free, so a config is checked without it."""

DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("float32", "bfloat16", "float16", "auto")  # "auto": the checkpoint's own dtype
