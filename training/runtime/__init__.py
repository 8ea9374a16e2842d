"""How stages run: torchrun's process group, one process per workspace, resumable state."""
