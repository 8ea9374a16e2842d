"""imgtocap's training pipeline: the DVC stages (`training.stages`) over libraries named for their
concern (`data`, `evaluation`, `tracking`, `runtime`); `params` and `paths` are what they share."""
