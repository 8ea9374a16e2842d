"""imgtocap's TorchServe handler; it travels inside the .mar (training/package.py builds it)."""
