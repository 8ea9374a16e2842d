"""TorchServe for imgtocap: the configuration, `make serve` / `make demo`, and a runner
(serve.runner.TorchServe) that starts one, waits until it is READY and stops it."""
