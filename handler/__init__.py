"""imgtocap's TorchServe handler; it travels inside the .mar (training/stages/package.py builds it)."""
