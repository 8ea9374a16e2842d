"""imgtocap training pipeline: one module per DVC stage (`python -m training.<stage>`)."""
