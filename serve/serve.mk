# TorchServe targets, included from the Makefile (it defines BIN and `setup`, and exports the
# no-telemetry variables). The logic lives in serve/serve.sh and serve/demo.py.
MAR := model-store/imgtocap.mar
# TMPDIR of the TorchServe that `make serve` and `make demo` start: it holds TorchServe's
# .model_server.pid, by which `make stop` finds this checkout's server (and no other checkout's).
# serve/serve.sh and serve/demo.py use the same folder.
RUN := $(CURDIR)/logs/torchserve/run

.PHONY: serve demo stop image $(MAR)

# DVC, not make, decides whether the archive is out of date: it depends on handler/, model/,
# the checkpoint and params (dvc.yaml), and make's timestamps would keep serving an old archive
# after an edit to handler/. So the recipe always runs: `dvc repro` runs whatever stage is out of
# date (everything on a fresh clone, only `package` after a handler edit) and nothing when
# nothing changed. The stages run `python -m training.<stage>`: the venv's python must come
# first on PATH.
$(MAR): | setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

## serve: TorchServe in the foreground with serve/config.properties (token auth on); Ctrl-C stops it
serve: $(MAR)
	BIN=$(BIN) serve/serve.sh

## demo: train if needed, serve on 127.0.0.1 in the background, caption sample images, and the
## page at http://127.0.0.1:5000/ (nginx)
demo: $(MAR)
	$(BIN)/python -m serve.demo

## stop: stop the TorchServe and the page `make demo` started (or `make serve` in another terminal)
stop:
	$(BIN)/python -m serve.proxy stop logs/nginx
	mkdir -p $(RUN)  # a missing TMPDIR would make Python fall back to /tmp: a global pid file
	touch $(RUN)/stop-requested  # for serve/serve.sh: this exit is no crash to restart from
	TMPDIR=$(RUN) $(BIN)/torchserve --stop --foreground

## image: the serving image around the archive, with docker or podman (whichever is installed);
## IMAGE=name:tag, and serve/image.sh's variables (bases, torch's source) for offline machines
image: $(MAR)
	serve/image.sh
