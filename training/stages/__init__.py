"""The DVC stages, one module each (`python -m training.stages.<stage>`): `stage(cfg)` + `main()`."""
