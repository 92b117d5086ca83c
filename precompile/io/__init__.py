"""Reading and writing files: safe paths, OUT_DIR, safetensors, SOURCE and the hub, progress."""
